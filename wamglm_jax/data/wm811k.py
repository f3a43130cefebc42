"""WM-811K ``LSWMD.pkl`` reader (a Python-2 pickle of a pandas DataFrame, FACTS.md).

Pickle runs code while loading, so ``read_lswmd`` refuses to open the file unless the caller
passes ``trust_pickle=True``. Convert it once with ``python -m tools.make_dataset --source=wm811k
--input=LSWMD.pkl --output=DIR --trust_pickle``; training reads the safe ArrayRecord copy and
never unpickles.

Format handled: ``pickle.load(f, encoding='latin1')`` (Python-2 ``str`` holds numpy buffers);
legacy pandas module paths are aliased (``pandas.indexes.*`` -> ``pandas.core.indexes.*``,
``pandas.core.indexes.numeric.*Index`` -> ``pandas.core.indexes.base.Index`` on pandas >= 2,
plus pandas' own ``pickle_compat`` table). Columns ``waferMap, dieSize, lotName, waferIndex,
trianTestLabel, failureType`` (``trian`` is the file's spelling). ``failureType`` and
``trianTestLabel`` are 2-D object arrays such as ``array([['Center']])``; an empty array means
unlabeled. Labelled rows get split 'train' (``Training``) or 'test' (``Test``); unlabeled rows
are returned apart (label -1, split 'unlabeled').
"""
from __future__ import annotations

import pickle

import numpy as np

from wamglm_jax.data import labels as L
from wamglm_jax.data.dataset import DatasetFormatError, UNLABELED, WaferDataset
from wamglm_jax.data.readers import require_file
from wamglm_jax.data.wafer import check_map

COLUMNS = ("waferMap", "dieSize", "lotName", "waferIndex", "trianTestLabel", "failureType")
REQUIRED = ("waferMap", "failureType", "trianTestLabel")
SPLITS = {"training": "train", "train": "train", "test": "test"}

# (module, name or None = any name) -> (module, name or None = same name)
_ALIASES = {
    ("pandas.core.indexes.numeric", None): ("pandas.core.indexes.base", "Index"),
    ("pandas.indexes.numeric", None): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.internals", "BlockManager"): ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.internals", "SingleBlockManager"):
        ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas.core.base", "FrozenNDArray"): ("numpy", "ndarray"),
    ("pandas.indexes.frozen", "FrozenNDArray"): ("numpy", "ndarray"),
}
_PREFIXES = (("pandas.indexes.", "pandas.core.indexes."), ("pandas.indexes", "pandas.core.indexes"))


class UntrustedPickleError(PermissionError):
    """Raised when a pickle would be loaded without ``trust_pickle=True``."""


def _unpickler_class():
    try:
        from pandas.compat.pickle_compat import Unpickler as Base
    except ImportError:  # pragma: no cover - very old / new pandas
        Base = pickle._Unpickler

    class LegacyUnpickler(Base):
        def find_class(self, module, name):
            for key in ((module, name), (module, None)):
                if key in _ALIASES:
                    mod, nm = _ALIASES[key]
                    return super().find_class(mod, nm or name)
            for old, new in _PREFIXES:
                if module == old.rstrip(".") or module.startswith(old):
                    module = new + module[len(old):]
                    break
            return super().find_class(module, name)

    return LegacyUnpickler


def unpickle_legacy(path: str, trust_pickle: bool):
    require_file(path)
    if not trust_pickle:
        raise UntrustedPickleError(
            f"{path}: refusing to unpickle without trust_pickle=True (pickle runs code when "
            "loaded). Only for files you trust; convert once with tools.make_dataset "
            "--source=wm811k --trust_pickle and train from the converted dataset.")
    try:
        with open(path, "rb") as f:
            return _unpickler_class()(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise DatasetFormatError(f"{path}: not a readable WM-811K pickle (truncated, corrupt or "
                                 f"an unknown pandas layout?): {type(e).__name__}: {e}") from None


def cell_text(v) -> str | None:
    """2-D object array cell (array([['Center']])), plain string, or empty -> text or None."""
    if v is None:
        return None
    if isinstance(v, (np.ndarray, list, tuple)):
        a = np.asarray(v, dtype=object).reshape(-1)
        if a.size == 0:
            return None
        v = a[0]
    if isinstance(v, bytes):
        v = v.decode("latin1")
    if isinstance(v, float) and np.isnan(v):
        return None
    s = str(v).strip()
    return s or None


def frame_to_datasets(df, path: str) -> tuple[WaferDataset, WaferDataset]:
    cols = list(getattr(df, "columns", []))
    if not hasattr(df, "columns"):
        raise DatasetFormatError(f"{path}: the pickle holds a {type(df).__name__}, expected a "
                                 "pandas DataFrame with columns " + ", ".join(COLUMNS))
    miss = [c for c in REQUIRED if c not in cols]
    if miss:
        raise DatasetFormatError(f"{path}: missing columns {miss}; found {cols}; expected the "
                                 "WM-811K columns " + ", ".join(COLUMNS))
    get = lambda c: df[c].tolist() if c in cols else [None] * len(df)  # noqa: E731
    wmaps, ftype, split = get("waferMap"), get("failureType"), get("trianTestLabel")
    lots, widx, dsize = get("lotName"), get("waferIndex"), get("dieSize")
    parts = {True: ([], [], [], []), False: ([], [], [], [])}
    for i in range(len(wmaps)):
        lab = cell_text(ftype[i])
        m = check_map(wmaps[i], f"{path}:waferMap", i)
        meta = dict(lot=cell_text(lots[i]), row=i,
                    wafer_index=None if widx[i] is None else int(float(np.asarray(widx[i]))),
                    die_size=None if dsize[i] is None else float(np.asarray(dsize[i])))
        maps, ids, sp, me = parts[lab is not None]
        maps.append(m)
        me.append(meta)
        if lab is None:
            ids.append(UNLABELED)
            sp.append("unlabeled")
            continue
        ids.append(L.wm811k_id(lab, f"{path}:failureType[{i}]"))
        s = cell_text(split[i])
        if s is not None and s.lower() not in SPLITS:
            raise DatasetFormatError(f"{path}: trianTestLabel[{i}] is {s!r}; expected "
                                     "'Training' or 'Test'")
        sp.append(SPLITS[s.lower()] if s else "unsplit")
    out = [WaferDataset(p[0], np.array(p[1], np.int32), "wm811k", np.array(p[2], dtype=str),
                        p[3], path) for p in (parts[True], parts[False])]
    return out[0], out[1]


def read_lswmd(path: str, trust_pickle: bool = False) -> tuple[WaferDataset, WaferDataset]:
    """(labelled rows with split train/test, unlabeled rows with label -1)."""
    return frame_to_datasets(unpickle_legacy(path, trust_pickle), path)
