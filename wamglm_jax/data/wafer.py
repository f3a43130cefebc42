"""The wafer-map contract shared by every reader, the generator and the pipelines.

A wafer map is a 2-D ``uint8[H, W]`` array of die states: ``OFF`` (0, no die / off the wafer),
``GOOD`` (1, die passed) and ``FAIL`` (2, die failed). ``check_map`` validates any array-like
against this contract and returns it as a contiguous uint8 array, or raises ``WaferMapError``
naming the source (file), the index (row / map number) and the problem.
"""
from __future__ import annotations

import numpy as np

OFF, GOOD, FAIL = 0, 1, 2
NUM_STATES = 3
MIN_SIDE = 3


class WaferMapError(ValueError):
    """A map (or a file of maps) breaks the wafer-map contract."""


def _where(source, index) -> str:
    return f"{source}" + (f" [map {index}]" if index is not None else "")


def check_map(m, source: str = "<array>", index=None) -> np.ndarray:
    """Validates one map and returns it as contiguous ``uint8[H, W]``.

    Rejects: non-2-D arrays, sides < 3, non-numeric dtypes, NaN/inf, non-integer values,
    values outside {0, 1, 2}, and maps with no die on the wafer (empty or all OFF).
    """
    where = _where(source, index)
    try:
        a = np.asarray(m)
    except Exception as e:  # ragged nested lists etc.
        raise WaferMapError(f"{where}: cannot convert to an array ({e})") from None
    if a.ndim != 2:
        raise WaferMapError(f"{where}: expected a 2-D map [H, W] of die states, got shape {a.shape}")
    if a.size == 0:
        raise WaferMapError(f"{where}: empty map (shape {a.shape}); expected at least "
                            f"{MIN_SIDE}x{MIN_SIDE} dies")
    if min(a.shape) < MIN_SIDE:
        raise WaferMapError(f"{where}: map of shape {a.shape} is smaller than "
                            f"{MIN_SIDE}x{MIN_SIDE}")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                               or np.issubdtype(a.dtype, np.floating)):
        raise WaferMapError(f"{where}: dtype {a.dtype} is not numeric; expected integer die "
                            "states 0=off, 1=good, 2=fail")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise WaferMapError(f"{where}: {int(bad.sum())} NaN/inf values (first at row {r}, "
                                f"col {c}); expected die states 0, 1, 2")
        if (a != np.round(a)).any():
            raise WaferMapError(f"{where}: non-integer values; expected die states 0, 1, 2")
    bad = (a < 0) | (a > 2)
    if bad.any():
        vals = np.unique(a[bad])[:5].tolist()
        raise WaferMapError(f"{where}: {int(bad.sum())} values outside {{0,1,2}} (e.g. {vals}); "
                            "expected 0=off-wafer, 1=good, 2=fail")
    out = np.ascontiguousarray(a, dtype=np.uint8)
    if not (out != OFF).any():
        raise WaferMapError(f"{where}: every die is off-wafer (all 0); expected some dies "
                            "with state 1 (good) or 2 (fail)")
    return out


def fail_fraction(m: np.ndarray) -> float:
    """Fraction of on-wafer dies that fail."""
    on = np.count_nonzero(m)
    return float(np.count_nonzero(m == FAIL)) / max(on, 1)
