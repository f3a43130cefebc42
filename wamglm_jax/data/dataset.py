"""WaferDataset (in memory) and ``load_dataset``: one entry point for every map file layout.

Layouts detected by their keys / suffix (see ``load_dataset``):
  * ragged npz  ``maps_flat, offsets, shapes, labels[, split]`` (WM-811K development copy);
  * dense npz   ``maps [N,H,W], labels [N,8] multi-hot, label_names[, split]`` (MixedWM38 copy);
  * raw MixedWM38 ``Wafer_Map_Datasets.npz``: ``arr_0 [N,52,52]``, ``arr_1 [N,8]``;
  * simple npz  ``maps [N,H,W]`` or ``map [H,W]`` with optional ``labels`` (names or ids);
  * a dataset directory written by ``tools.make_dataset`` (TFDS ArrayRecord, ``dataset.json``);
  * ``.npy`` (one map [H,W] or a stack [N,H,W]), ``.png`` (one map, colours below),
    ``.csv`` (die coordinates ``x,y,pass/fail``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from wamglm_jax.data import labels as L

UNLABELED = -1


class DatasetFormatError(ValueError):
    """A file does not have the expected layout (missing keys, wrong shapes, corrupt)."""


@dataclasses.dataclass
class WaferDataset:
    """Maps of varying shapes with integer labels in one label space.

    maps: list of uint8[H, W]; labels: int32[N] (class ids of ``label_space``; -1 = unlabeled);
    split: str[N] or None; meta: one dict per map (lot, wafer_index, die_size; values may be None).
    """
    maps: list
    labels: np.ndarray
    label_space: str = "wm811k"
    split: np.ndarray | None = None
    meta: list | None = None
    source: str = ""

    def __post_init__(self):
        self.labels = np.asarray(self.labels, np.int32).reshape(-1)
        if len(self.maps) != len(self.labels):
            raise DatasetFormatError(f"{self.source}: {len(self.maps)} maps but "
                                     f"{len(self.labels)} labels")
        L.class_names(self.label_space)  # validates the label space
        if self.split is not None:
            self.split = np.asarray(self.split).astype(str)
            if self.split.shape != self.labels.shape:
                raise DatasetFormatError(f"{self.source}: split has shape {self.split.shape}, "
                                         f"expected ({len(self.labels)},)")
        if self.meta is None:
            self.meta = [dict(lot=None, wafer_index=None, die_size=None) for _ in self.maps]
        nc = self.num_classes
        bad = (self.labels < UNLABELED) | (self.labels >= nc)
        if bad.any():
            raise DatasetFormatError(f"{self.source}: label ids {np.unique(self.labels[bad])[:5]} "
                                     f"outside 0..{nc - 1} (or -1 = unlabeled)")

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int) -> dict:
        return dict(map=self.maps[i], label=int(self.labels[i]), index=int(i),
                    split=None if self.split is None else str(self.split[i]), meta=self.meta[i])

    @property
    def class_names(self) -> tuple[str, ...]:
        return L.class_names(self.label_space)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices) -> "WaferDataset":
        idx = np.asarray(indices, np.int64).reshape(-1)
        return WaferDataset(
            maps=[self.maps[i] for i in idx], labels=self.labels[idx],
            label_space=self.label_space,
            split=None if self.split is None else self.split[idx],
            meta=[self.meta[i] for i in idx], source=self.source)

    def splits(self) -> list[str]:
        return [] if self.split is None else sorted(set(self.split.tolist()))

    def select(self, split: str | Sequence[str]) -> "WaferDataset":
        """Maps of the named split(s); error naming the splits that exist if absent."""
        names = [split] if isinstance(split, str) else list(split)
        if self.split is None:
            raise DatasetFormatError(f"{self.source}: has no split column; cannot select "
                                     f"{names}")
        missing = [n for n in names if n not in set(self.split.tolist())]
        if missing:
            raise DatasetFormatError(f"{self.source}: no split {missing}; available: "
                                     f"{self.splits()}")
        return self.subset(np.flatnonzero(np.isin(self.split, names)))

    def class_counts(self) -> dict[str, int]:
        names = self.class_names
        counts = {n: 0 for n in names}
        ids, c = np.unique(self.labels, return_counts=True)
        for i, k in zip(ids, c):
            counts["unlabeled" if i == UNLABELED else names[i]] = int(k)
        return counts

    def shapes(self) -> np.ndarray:
        return np.array([m.shape for m in self.maps], np.int32).reshape(-1, 2)


def load_dataset(path: str, split: str | Sequence[str] | None = None, *,
                 value3: str = "fail", label_space: str | None = None,
                 trust_pickle: bool = False, include_unlabeled: bool = False) -> WaferDataset:
    """Reads any supported file or directory (layout detected by keys / suffix, see the module
    docstring); ``split`` selects one or more splits. ``value3``: MixedWM38 value-3 policy
    ('fail' = map 3 -> 2 with a counted warning, 'error'). A WM-811K ``.pkl`` is read only with
    ``trust_pickle=True`` (pickle runs code); convert it once with ``tools.make_dataset``.
    """
    from wamglm_jax.data import readers
    path = os.fspath(path)
    readers.require_file(path)
    low = path.lower()
    if os.path.isdir(path):
        from wamglm_jax.data import builders
        ds = builders.load_prepared(path)
    elif low.endswith(".npz"):
        ds = readers.read_npz_any(path, value3, label_space)
    elif low.endswith(".npy"):
        ds = readers.read_npy(path, label_space or "wm811k")
    elif low.endswith(".png"):
        ds = readers.read_png(path, label_space or "wm811k")
    elif low.endswith(".csv"):
        ds = readers.read_csv(path, label_space or "wm811k")
    elif low.endswith((".pkl", ".pickle")):
        from wamglm_jax.data import wm811k
        lab, unl = wm811k.read_lswmd(path, trust_pickle=trust_pickle)
        ds = lab if not include_unlabeled else concat([lab, unl], source=path)
    else:
        raise DatasetFormatError(f"{path}: unknown file type; expected a directory written by "
                                 "tools.make_dataset, .npz, .npy, .png, .csv or LSWMD .pkl")
    return ds.select(split) if split is not None else ds


def concat(parts: Sequence[WaferDataset], source: str = "") -> WaferDataset:
    spaces = {p.label_space for p in parts}
    if len(spaces) != 1:
        raise DatasetFormatError(f"{source}: cannot concatenate label spaces {sorted(spaces)}")
    has_split = all(p.split is not None for p in parts)
    return WaferDataset(
        maps=[m for p in parts for m in p.maps],
        labels=np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int32),
        label_space=spaces.pop(),
        split=np.concatenate([p.split for p in parts]) if has_split else None,
        meta=[m for p in parts for m in p.meta], source=source)
