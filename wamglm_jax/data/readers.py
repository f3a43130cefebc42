"""Readers for every map file layout; ``dataset.load_dataset`` dispatches here.

All readers validate every map with ``wafer.check_map`` and name file, field and expectation
in their errors (``DatasetFormatError``, ``WaferMapError``, ``UnknownLabelError``).

MixedWM38 value-3 policy (``value3``): the public ``Wafer_Map_Datasets.npz`` holds 105
Near-full maps with a stray value 3. With ``value3='fail'`` (default) every 3 becomes 2
(failing die: the maps are Near-full, so a failing die is the reading that keeps the label
true); the number of maps and dies changed is reported with ``warnings.warn`` and kept in
``WaferDataset.meta`` (``value3_dies``). With ``value3='error'`` such a file is rejected.

PNG colour mapping (one pixel = one die): a grayscale PNG whose values are all in {0,1,2}
holds the die states directly. Otherwise (RGB, RGBA, palette) each pixel's colour is matched to the
nearest palette colour (within distance 100): off-wafer = white (255,255,255), black (0,0,0)
or alpha < 128; good = #8fbc8f (the gallery's green), pure/dark green (0,255,0)/(0,128,0),
grey (128,128,128); fail = #b22222 (the gallery's red), red (255,0,0). Other colours are an
error naming the pixel.

CSV of die coordinates (what wafer testers export): a header with ``x``, ``y`` and a status
column named ``pass``/``status``/``result``/``pass_fail``/``bin`` whose values are
pass/p/good/1 (good die) or fail/f/bad/0 (failing die), case-insensitive. Optional ``wafer``
(or ``wafer_id``) column for several wafers per file and ``label`` (one per wafer). The map is
the bounding box of the listed dies: row = y - min(y), col = x - min(x); dies not listed are
off-wafer; a die listed twice is an error.
"""
from __future__ import annotations

import csv
import os
import warnings
import zipfile

import numpy as np

from wamglm_jax.data import labels as L
from wamglm_jax.data.dataset import DatasetFormatError, UNLABELED, WaferDataset
from wamglm_jax.data.wafer import FAIL, GOOD, OFF, WaferMapError, check_map


def require_file(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    return path


def read_npz(path: str) -> dict:
    """All arrays of an .npz (no pickle); truncated or corrupt files -> DatasetFormatError."""
    require_file(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise DatasetFormatError(f"{path}: not a readable .npz (truncated or corrupt?): "
                                 f"{type(e).__name__}: {e}") from None


def _need(d: dict, keys, path, layout):
    miss = [k for k in keys if k not in d]
    if miss:
        raise DatasetFormatError(f"{path}: {layout} layout needs keys {list(keys)}; missing "
                                 f"{miss} (found {sorted(d)})")


def mixed_id_from_name(name: str, source: str) -> int:
    """'Center+Edge-Loc' / 'C+EL' (any spelling or abbreviation of each type, '+'-joined) or
    'Normal' -> 38-class id."""
    toks = [t.strip() for t in name.split("+")]
    types = {L._ABBREV.get(t.upper()) or L.canonical_label(t, source) for t in toks}
    types.discard(L.NONE)
    return L.mixed_id_from_multihot([t in types for t in L.MIXED_TYPES], source)


def _labels_1d(lab, n, path, field="labels", label_space="wm811k") -> np.ndarray:
    lab = np.asarray(lab)
    if lab.shape != (n,):
        raise DatasetFormatError(f"{path}: field {field!r} has shape {lab.shape}, expected ({n},)")
    if lab.dtype.kind in "US":
        if label_space == "mixedwm38":
            return np.array([mixed_id_from_name(x, f"{path}:{field}[{i}]")
                             for i, x in enumerate(lab.astype(str).tolist())], np.int32)
        return L.to_ids(lab.astype(str).tolist(), f"{path}:{field}")
    if lab.dtype.kind in "iu":
        return lab.astype(np.int32)
    raise DatasetFormatError(f"{path}: field {field!r} has dtype {lab.dtype}; expected class "
                             "names (strings) or integer ids")


def _split(d, n, path):
    if "split" not in d:
        return None
    s = np.asarray(d["split"])
    if s.shape != (n,) or s.dtype.kind not in "US":
        raise DatasetFormatError(f"{path}: field 'split' has shape {s.shape} dtype {s.dtype}; "
                                 f"expected ({n},) strings")
    return s.astype(str)


def _meta(d, n):
    """Optional per-map columns lot / wafer_index / die_size ('' or negative = unknown)."""
    cols = {k: np.asarray(d[k]) for k in ("lot", "wafer_index", "die_size")
            if k in d and np.asarray(d[k]).shape == (n,)}

    def val(k, i):
        if k not in cols:
            return None
        v = cols[k][i].item()
        return None if v == "" or (not isinstance(v, str) and v < 0) else v
    return [{k: val(k, i) for k in ("lot", "wafer_index", "die_size")} for i in range(n)]


def _space(d, default):
    """Label space stored in the file (key 'label_space'), else the caller's / default."""
    if "label_space" in d:
        return str(np.asarray(d["label_space"]))
    return default


def read_ragged(d: dict, path: str, label_space: str | None = None) -> WaferDataset:
    _need(d, ("maps_flat", "offsets", "shapes", "labels"), path, "ragged")
    flat, off, shp = np.asarray(d["maps_flat"]).reshape(-1), np.asarray(d["offsets"]), \
        np.asarray(d["shapes"])
    n = len(off)
    if off.ndim != 1 or shp.shape != (n, 2):
        raise DatasetFormatError(f"{path}: 'offsets' must be [N] and 'shapes' [N,2]; got "
                                 f"{off.shape} and {shp.shape}")
    ends = off.astype(np.int64) + shp[:, 0].astype(np.int64) * shp[:, 1]
    if n and ((off < 0).any() or ends.max() > len(flat)):
        i = int(np.argmax((off < 0) | (ends > len(flat))))
        raise DatasetFormatError(f"{path}: map {i} (offset {off[i]}, shape {tuple(shp[i])}) runs "
                                 f"past the end of 'maps_flat' ({len(flat)} values)")
    maps = [check_map(flat[off[i]:ends[i]].reshape(shp[i]), f"{path}:maps_flat", i)
            for i in range(n)]
    space = label_space or _space(d, "wm811k")
    return WaferDataset(maps, _labels_1d(d["labels"], n, path, label_space=space), space,
                        _split(d, n, path), _meta(d, n), path)


def _fix_value3(maps: np.ndarray, path: str, field: str, value3: str):
    """Applies the value-3 policy to a stack [N,H,W]; returns (maps, per-map count of 3s)."""
    threes = (maps == 3).reshape(len(maps), -1).sum(1)
    if threes.any():
        k = int((threes > 0).sum())
        if value3 == "error":
            raise WaferMapError(f"{path}:{field}: {k} maps hold value 3 ({int(threes.sum())} "
                                f"dies; first map {int(np.argmax(threes > 0))}); expected "
                                "0/1/2 (use value3='fail' to map 3 -> 2)")
        if value3 != "fail":
            raise ValueError(f"value3={value3!r}: expected 'fail' or 'error'")
        warnings.warn(f"{path}:{field}: {k} maps held value 3 ({int(threes.sum())} dies); "
                      "mapped 3 -> 2 (failing die), the documented MixedWM38 policy",
                      stacklevel=3)
        maps = np.where(maps == 3, np.uint8(FAIL), maps)
    return maps, threes


def _mixed_ids(lab: np.ndarray, cols: list[str], path: str, field: str) -> np.ndarray:
    """Multi-hot [N,8] in `cols` order -> 38-class ids."""
    try:
        canon = [L.canonical_label(c, f"{path}:label_names") for c in cols]
    except L.UnknownLabelError as e:
        raise DatasetFormatError(str(e)) from None
    if sorted(canon) != sorted(L.MIXED_TYPES):
        raise DatasetFormatError(f"{path}: label_names {cols} do not name the 8 MixedWM38 "
                                 f"types {list(L.MIXED_TYPES)}")
    perm = [canon.index(t) for t in L.MIXED_TYPES]
    lab = lab[:, perm]
    return np.array([L.mixed_id_from_multihot(r, f"{path}:{field}[{i}]")
                     for i, r in enumerate(lab)], np.int32)


def read_dense(d: dict, path: str, value3: str = "fail", raw: bool = False) -> WaferDataset:
    mk, lk = ("arr_0", "arr_1") if raw else ("maps", "labels")
    _need(d, (mk, lk), path, "raw MixedWM38" if raw else "dense")
    maps, lab = np.asarray(d[mk]), np.asarray(d[lk])
    if maps.ndim != 3:
        raise DatasetFormatError(f"{path}: field {mk!r} has shape {maps.shape}; expected "
                                 "[N, H, W] maps")
    n = len(maps)
    multihot = lab.ndim == 2
    if multihot and lab.shape != (n, 8):
        raise DatasetFormatError(f"{path}: field {lk!r} has shape {lab.shape}; expected "
                                 f"[{n}, 8] multi-hot (MixedWM38) or [{n}] names/ids")
    if multihot:
        cols = (list(np.asarray(d["label_names"]).astype(str)) if "label_names" in d
                else list(L.MIXED_TYPES))
        maps, threes = _fix_value3(maps, path, mk, value3)
        ids, space = _mixed_ids(lab, cols, path, lk), "mixedwm38"
    else:
        threes = np.zeros(n, int)
        space = _space(d, "wm811k")
        ids = _labels_1d(lab, n, path, lk, space)
    out = [check_map(maps[i], f"{path}:{mk}", i) for i in range(n)]
    meta = _meta(d, n)
    for m, t in zip(meta, threes):
        m["value3_dies"] = int(t)
    return WaferDataset(out, ids, space, _split(d, n, path), meta, path)


def read_simple_npz(d: dict, path: str, label_space: str = "wm811k") -> WaferDataset:
    """npz with ``map`` [H,W] or ``maps`` [N,H,W] (or a list of arrays map_0, map_1, ...),
    optional ``labels`` (names or ids)."""
    if "map" in d:
        maps = [d["map"]]
    elif "maps" in d:
        maps = list(np.asarray(d["maps"])) if np.asarray(d["maps"]).ndim == 3 else [d["maps"]]
    else:
        keys = sorted((k for k in d if k.startswith("map_")), key=lambda k: int(k[4:]) if
                      k[4:].isdigit() else -1)
        if not keys:
            raise DatasetFormatError(
                f"{path}: no map arrays; expected one of the layouts: ragged (maps_flat, "
                "offsets, shapes, labels), dense (maps, labels), raw MixedWM38 (arr_0, arr_1), "
                f"or simple (map | maps | map_0, map_1, ...); found keys {sorted(d)}")
        maps = [d[k] for k in keys]
    n = len(maps)
    maps = [check_map(m, f"{path}:maps", i) for i, m in enumerate(maps)]
    lab = _labels_1d(np.asarray(d["labels"]).reshape(-1), n, path, label_space=label_space) \
        if "labels" in d else np.full(n, UNLABELED, np.int32)
    return WaferDataset(maps, lab, label_space, _split(d, n, path), _meta(d, n), path)


def read_npz_any(path: str, value3: str = "fail", label_space: str | None = None):
    d = read_npz(path)
    if "maps_flat" in d:
        return read_ragged(d, path, label_space)
    if "arr_0" in d and "arr_1" in d:
        return read_dense(d, path, value3, raw=True)
    if "maps" in d and "labels" in d and np.asarray(d["labels"]).ndim == 2:
        return read_dense(d, path, value3)
    return read_simple_npz(d, path, label_space or _space(d, "wm811k"))


def read_npy(path: str, label_space: str = "wm811k") -> WaferDataset:
    require_file(path)
    try:
        a = np.load(path, allow_pickle=False)
    except (EOFError, OSError, ValueError) as e:
        raise DatasetFormatError(f"{path}: not a readable .npy (truncated, corrupt or an object "
                                 f"array?): {e}") from None
    if a.ndim == 3:
        maps = [check_map(a[i], path, i) for i in range(len(a))]
    elif a.ndim == 2:
        maps = [check_map(a, path)]
    else:
        raise WaferMapError(f"{path}: array of shape {a.shape}; expected one map [H, W] or a "
                            "stack [N, H, W]")
    return WaferDataset(maps, np.full(len(maps), UNLABELED), label_space, None, None, path)


_PALETTE = np.array([[255, 255, 255], [0, 0, 0], [143, 188, 143], [0, 255, 0], [0, 128, 0],
                     [128, 128, 128], [178, 34, 34], [255, 0, 0]], np.float32)
_PALETTE_STATE = np.array([OFF, OFF, GOOD, GOOD, GOOD, GOOD, FAIL, FAIL], np.uint8)


def png_to_map(path: str) -> np.ndarray:
    require_file(path)
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "I", "I;16") and np.asarray(im).max() <= 2:
                return check_map(np.asarray(im), path)   # grayscale holding the states
            rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetFormatError(f"{path}: not a readable PNG: {e}") from None
    dist = np.linalg.norm(rgba[..., None, :3] - _PALETTE, axis=-1)      # [H,W,8]
    near = dist.argmin(-1)
    state = _PALETTE_STATE[near]
    state[rgba[..., 3] < 128] = OFF
    bad = (dist.min(-1) > 100) & (rgba[..., 3] >= 128)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise WaferMapError(f"{path}: pixel (row {r}, col {c}) has colour "
                            f"{tuple(int(x) for x in rgba[r, c, :3])}, not one of the die "
                            "colours (off: white/black/transparent, good: green/grey, "
                            "fail: red); see readers.py")
    return check_map(state, path)


def read_png(path: str, label_space: str = "wm811k") -> WaferDataset:
    return WaferDataset([png_to_map(path)], [UNLABELED], label_space, None, None, path)


_STATUS_COLS = ("pass", "status", "result", "pass_fail", "passfail", "bin")
_PASS = {"pass", "p", "good", "1", "ok", "true"}
_FAIL = {"fail", "f", "bad", "0", "ng", "false"}


def read_csv(path: str, label_space: str = "wm811k") -> WaferDataset:
    require_file(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DatasetFormatError(f"{path}: empty CSV; expected a header x,y,pass")
    head = [h.strip().lower().replace("/", "_").replace("-", "_") for h in rows[0]]
    status = next((c for c in _STATUS_COLS if c in head), None)
    if "x" not in head or "y" not in head or status is None:
        raise DatasetFormatError(f"{path}: header {rows[0]} lacks columns x, y and a status "
                                 f"column (one of {list(_STATUS_COLS)})")
    ix, iy, ist = head.index("x"), head.index("y"), head.index(status)
    iw = next((head.index(c) for c in ("wafer", "wafer_id") if c in head), None)
    il = head.index("label") if "label" in head else None
    wafers: dict = {}
    for ln, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(head):
            raise DatasetFormatError(f"{path}: line {ln} has {len(row)} fields, expected "
                                     f"{len(head)}")
        try:
            x, y = int(float(row[ix])), int(float(row[iy]))
        except ValueError:
            raise DatasetFormatError(f"{path}: line {ln}: x={row[ix]!r}, y={row[iy]!r} are not "
                                     "integer die coordinates") from None
        s = row[ist].strip().lower()
        if s not in _PASS | _FAIL:
            raise DatasetFormatError(f"{path}: line {ln}: column {status!r} is {row[ist]!r}; "
                                     f"expected pass ({sorted(_PASS)}) or fail ({sorted(_FAIL)})")
        w = row[iw].strip() if iw is not None else ""
        dies, labs = wafers.setdefault(w, ({}, set()))
        if (x, y) in dies:
            raise DatasetFormatError(f"{path}: line {ln}: die (x={x}, y={y}) of wafer {w!r} "
                                     "listed twice")
        dies[(x, y)] = GOOD if s in _PASS else FAIL
        if il is not None and row[il].strip():
            labs.add(row[il].strip())
    if not wafers:
        raise WaferMapError(f"{path}: no dies listed; expected rows x,y,pass")
    maps, lab = [], []
    for k, (w, (dies, labs)) in enumerate(wafers.items()):
        xy = np.array(list(dies), np.int64)
        m = np.zeros((xy[:, 1].max() - xy[:, 1].min() + 1, xy[:, 0].max() - xy[:, 0].min() + 1),
                     np.uint8)
        m[xy[:, 1] - xy[:, 1].min(), xy[:, 0] - xy[:, 0].min()] = list(dies.values())
        maps.append(check_map(m, path, w or k))
        if len(labs) > 1:
            raise DatasetFormatError(f"{path}: wafer {w!r} has several labels {sorted(labs)}")
        lab.append(L.wm811k_id(labs.pop(), f"{path}:label") if labs else UNLABELED)
    return WaferDataset(maps, lab, label_space, None,
                        [dict(lot=None, wafer_index=w or None, die_size=len(dies))
                         for w, (dies, _) in wafers.items()], path)
