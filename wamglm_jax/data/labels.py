"""Canonical label spaces and the one alias table that maps every spelling to them.

Two label spaces exist:
  * ``wm811k``: the 9 WM-811K classes, ids 0..8 in ``WM811K_CLASSES`` order.
  * ``mixedwm38``: the 38 MixedWM38 class ids 0..37 (C1..C38 of the paper, 0-based), each a
    set of the 8 MixedWM38 defect types; its multi-hot view (``MIXED_TYPES`` order, the
    column order of ``Wafer_Map_Datasets.npz``) is derived from the id.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

WM811K_CLASSES: tuple[str, ...] = (
    "Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Random", "Scratch", "none")
NONE = "none"

# Column order of MixedWM38's multi-hot labels (arr_1 / `labels` [N,8]).
MIXED_TYPES: tuple[str, ...] = (
    "Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch", "Random")

_ABBREV = {"C": "Center", "D": "Donut", "EL": "Edge-Loc", "ER": "Edge-Ring", "L": "Loc",
           "NF": "Near-full", "S": "Scratch", "R": "Random"}
# C1..C38 in the commonly used public order (FACTS.md); index = 0-based class id.
_MIXED_38 = (
    "", "C", "D", "EL", "ER", "L", "NF", "S", "R",
    "C+EL", "C+ER", "C+L", "C+S", "D+EL", "D+ER", "D+L", "D+S", "EL+L", "EL+S", "ER+L", "ER+S",
    "L+S", "C+EL+L", "C+EL+S", "C+ER+L", "C+ER+S", "C+L+S", "D+EL+L", "D+EL+S", "D+ER+L",
    "D+ER+S", "D+L+S", "EL+L+S", "ER+L+S", "C+L+EL+S", "C+L+ER+S", "D+L+EL+S", "D+L+ER+S")
MIXEDWM38_CLASSES: tuple[frozenset[str], ...] = tuple(
    frozenset(_ABBREV[a] for a in code.split("+")) if code else frozenset() for code in _MIXED_38)
MIXEDWM38_NAMES: tuple[str, ...] = tuple(
    "+".join(t for t in MIXED_TYPES if t in s) if s else "Normal" for s in MIXEDWM38_CLASSES)
assert len(set(MIXEDWM38_CLASSES)) == 38

# Every spelling seen in the wild, normalised (lower case, separators removed) -> canonical.
_ALIASES = {
    "center": "Center", "centre": "Center", "donut": "Donut", "doughnut": "Donut",
    "edgeloc": "Edge-Loc", "edgering": "Edge-Ring", "loc": "Loc", "local": "Loc",
    "nearfull": "Near-full", "random": "Random", "scratch": "Scratch",
    "none": NONE, "normal": NONE, "nopattern": NONE,
}


class UnknownLabelError(ValueError):
    pass


def canonical_label(name: str, source: str = "<label>") -> str:
    """Maps any known spelling (`Edge_Loc`, `edge-loc`, `Near_Full`, `Normal`, ...) to the
    canonical WM-811K name; raises UnknownLabelError naming the source otherwise."""
    key = re.sub(r"[\s_\-]+", "", str(name).strip().lower())
    if key not in _ALIASES:
        raise UnknownLabelError(
            f"{source}: unknown label {name!r}; expected one of {list(WM811K_CLASSES)} "
            "(spellings such as Edge_Loc, Near_Full, Normal are accepted)")
    return _ALIASES[key]


def wm811k_id(name: str, source: str = "<label>") -> int:
    return WM811K_CLASSES.index(canonical_label(name, source))


def mixed_id_from_multihot(row: Sequence[int] | np.ndarray, source: str = "<label>") -> int:
    """8-way multi-hot (MIXED_TYPES order) -> 38-class id; error if the combination is not one
    of the 38."""
    row = np.asarray(row).reshape(-1)
    if row.shape != (8,) or not np.isin(row, (0, 1)).all():
        raise ValueError(f"{source}: expected a multi-hot row of 8 values in {{0,1}}, got {row!r}")
    types = frozenset(t for t, v in zip(MIXED_TYPES, row) if v)
    try:
        return MIXEDWM38_CLASSES.index(types)
    except ValueError:
        raise ValueError(f"{source}: the type combination {sorted(types)} is not one of the "
                         "38 MixedWM38 classes") from None


def multihot_from_mixed_id(class_id: int) -> np.ndarray:
    types = MIXEDWM38_CLASSES[int(class_id)]
    return np.array([t in types for t in MIXED_TYPES], np.uint8)


def mixed_types(class_id: int) -> list[str]:
    """Defect types of a 38-class id, in MIXED_TYPES order ([] for Normal)."""
    return [t for t in MIXED_TYPES if t in MIXEDWM38_CLASSES[int(class_id)]]


def class_names(label_space: str) -> tuple[str, ...]:
    if label_space == "wm811k":
        return WM811K_CLASSES
    if label_space == "mixedwm38":
        return MIXEDWM38_NAMES
    raise ValueError(f"unknown label space {label_space!r}; expected 'wm811k' or 'mixedwm38'")


def defect_set(label_space: str, class_id: int) -> frozenset[str]:
    """The set of defect types a class id stands for (empty for none/Normal)."""
    if label_space == "wm811k":
        name = WM811K_CLASSES[int(class_id)]
        return frozenset() if name == NONE else frozenset([name])
    return MIXEDWM38_CLASSES[int(class_id)]


def to_ids(names: Iterable[str], source: str) -> np.ndarray:
    return np.array([wm811k_id(n, f"{source}[{i}]") for i, n in enumerate(names)], np.int32)
