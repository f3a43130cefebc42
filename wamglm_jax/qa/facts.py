"""Facts computed from a wafer map (and its dataset, for lot comparisons).

Every number a dialogue states comes from here. Definitions (deterministic, documented so a test
or a person can recompute them by hand):

* Dies: cells with value > 0 (1 good, 2 failing). `total` = number of dies, `failing` = number
  of cells == 2. `yield_pct` = 100 * (total - failing) / total, `area_pct` = 100 * failing /
  total (the failing share of the wafer area, dies being equal cells), both rounded to 1 decimal
  with Python's `round`.
* Geometry: the wafer centre (cy, cx) is the mean row / column index of all dies; a die's
  distance d is the Euclidean distance of its (row, col) from the centre; R is the largest d
  over all dies (1 if that is 0); rho = d / R in [0, 1].
* Radial zones: `center` rho < 0.3, `middle` 0.3 <= rho < 0.8, `edge` rho >= 0.8.
* Concentration zones: density_z = failing_z / dies_z per zone (zones without dies skipped);
  p = failing / total. If max density >= 1.3 p, the concentration zones are the zones (in
  center, middle, edge order) with density >= 0.6 * max density AND density >= 1.3 p AND at
  least 3 failing dies; if that leaves none, or max density < 1.3 p: ["spread"]. No failing
  die at all -> [].
* Side (where the failing dies lie as the map is displayed: row 0 at the top, column 0 on the
  left): a failing die is `upper` if row < cy else `lower`, `left` if col < cx else `right`.
  If one quadrant holds >= 50 % of the failing dies the side is that quadrant
  ("upper-left", ...); else if one half (upper/lower/left/right, checked in that order) holds
  >= 70 % the side is that half; else "none" (no preferred side). No failing die -> None.
* Lot context (what the engineer's tooling knows about the lot, shown to the model as a context
  line in the first user turn, see qa.dialogues.context_line): the OTHER wafers of the same lot
  in the dataset (meta['lot'] equal and not None; unlabeled wafers, label < 0, left out):
  `n_other` of them, `n_patterned` with a defect pattern, `pattern_counts` {pattern: wafers
  showing it} (a mixed-type wafer counts under each of its patterns). Never invented: no lot
  -> {"lot": None} and no context line.
* Batch answer (from the lot context + this wafer's own patterns, so a model that reads the
  map and the context line can derive it): per pattern of this wafer, how many other wafers of
  the lot show it; the pattern is lot-wide when at least LOT_WIDE_MIN other wafers AND at
  least LOT_WIDE_SHARE of the other wafers show it (any pattern lot-wide -> lot_wide True,
  "likely a shared tool or process step"), else isolated to this wafer. A wafer without
  pattern: how many of the other wafers have a pattern. No lot: "cannot tell".
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from wamglm_jax.data.labels import WM811K_CLASSES, defect_set

ZONES = ("center", "middle", "edge")
ZONE_EDGES = (0.3, 0.8)          # rho thresholds between center|middle and middle|edge
CONCENTRATION_RATIO = 1.3         # max zone density must exceed overall density by this
ZONE_KEEP_RATIO = 0.6             # zones within this fraction of the max density are named
MIN_ZONE_FAILS = 3                # ... if they also hold at least this many failing dies
QUADRANT_SHARE = 0.5
HALF_SHARE = 0.7
QUADRANTS = ("upper-left", "upper-right", "lower-left", "lower-right")
HALVES = ("upper", "lower", "left", "right")
LOT_WIDE_MIN = 2                  # a pattern on >= this many other wafers of the lot ...
LOT_WIDE_SHARE = 0.2              # ... and on >= this share of them is lot-wide


def _geometry(m: np.ndarray):
    rows, cols = np.nonzero(m > 0)
    cy, cx = rows.mean(), cols.mean()
    d = np.sqrt((rows - cy) ** 2 + (cols - cx) ** 2)
    r_max = d.max() if d.max() > 0 else 1.0
    rho = d / r_max
    zone = np.where(rho < ZONE_EDGES[0], 0, np.where(rho < ZONE_EDGES[1], 1, 2))
    return rows, cols, cy, cx, zone


def compute_facts(m: np.ndarray) -> dict[str, Any]:
    """Facts of one map uint8[H,W] (0 off / 1 good / 2 fail) as a JSON-friendly dict:
    total, failing, yield_pct, area_pct, zones {zone: {dies, failing}}, location
    {zones: list[str], side: str|None}."""
    m = np.asarray(m)
    if m.ndim != 2 or not (m > 0).any():
        raise ValueError(f"compute_facts: expected a 2-D map with at least one die, got shape "
                         f"{m.shape} with {int((m > 0).sum())} dies")
    rows, cols, cy, cx, zone = _geometry(m)
    fail = m[rows, cols] == 2
    total, failing = int(len(rows)), int(fail.sum())
    zones = {z: {"dies": int((zone == i).sum()), "failing": int((fail & (zone == i)).sum())}
             for i, z in enumerate(ZONES)}
    return {
        "total": total,
        "failing": failing,
        "yield_pct": round(100.0 * (total - failing) / total, 1),
        "area_pct": round(100.0 * failing / total, 1),
        "zones": zones,
        "location": {"zones": _concentration(zones, failing, total),
                     "side": _side(rows[fail], cols[fail], cy, cx)},
    }


def _concentration(zones: dict, failing: int, total: int) -> list[str]:
    if failing == 0:
        return []
    dens = {z: v["failing"] / v["dies"] for z, v in zones.items() if v["dies"] > 0}
    top = max(dens.values())
    if top < CONCENTRATION_RATIO * failing / total:
        return ["spread"]
    floor = CONCENTRATION_RATIO * failing / total
    named = [z for z in ZONES if z in dens and dens[z] >= ZONE_KEEP_RATIO * top
             and dens[z] >= floor and zones[z]["failing"] >= MIN_ZONE_FAILS]
    return named or ["spread"]


def _side(frows: np.ndarray, fcols: np.ndarray, cy: float, cx: float) -> str | None:
    n = len(frows)
    if n == 0:
        return None
    up, left = frows < cy, fcols < cx
    quad = {"upper-left": up & left, "upper-right": up & ~left,
            "lower-left": ~up & left, "lower-right": ~up & ~left}
    for q in QUADRANTS:
        if quad[q].sum() >= QUADRANT_SHARE * n:
            return q
    half = {"upper": up, "lower": ~up, "left": left, "right": ~left}
    for h in HALVES:
        if half[h].sum() >= HALF_SHARE * n:
            return h
    return "none"


def type_location(m: np.ndarray, pattern: str, types: Sequence[str], facts: dict | None = None
                  ) -> dict[str, Any]:
    """Where one pattern of the map lies (see TYPE_LOCATION rules below). Value:
    {pattern, present: bool, zones: list[str] | None (None = cannot tell), side: str | None}.

    Rules: absent pattern -> present False. By the pattern's definition: Center -> [center],
    Donut -> [middle], Edge-Ring -> [edge] with side "all around", Near-full and Random ->
    [spread]. Computed from the map: Edge-Loc -> [edge] with the side of the failing dies in the
    edge zone; Loc and Scratch -> the map's own location when it is the map's only pattern
    ([] with side None if the map has no failing die), otherwise None (they overlap the other patterns, so their position cannot be told apart).
    """
    if pattern not in types:
        return {"pattern": pattern, "present": False, "zones": None, "side": None}
    fixed = {"Center": (["center"], None), "Donut": (["middle"], None),
             "Edge-Ring": (["edge"], "all around"), "Near-full": (["spread"], None),
             "Random": (["spread"], None)}
    if pattern in fixed:
        zones, side = fixed[pattern]
    elif pattern == "Edge-Loc":
        rows, cols, cy, cx, zone = _geometry(np.asarray(m))
        sel = (np.asarray(m)[rows, cols] == 2) & (zone == 2)
        zones, side = ["edge"], _side(rows[sel], cols[sel], cy, cx)
    elif len(types) == 1:
        loc = (facts or compute_facts(m))["location"]
        zones, side = list(loc["zones"]), loc["side"]
    else:
        zones, side = None, None
    return {"pattern": pattern, "present": True, "zones": zones, "side": side}


def lot_index(meta: Sequence[dict] | None) -> dict[str, list[int]]:
    """lot id -> indices of the wafers with that lot (wafers without a lot are left out)."""
    out: dict[str, list[int]] = {}
    for i, md in enumerate(meta or []):
        lot = (md or {}).get("lot")
        if lot is not None and str(lot) != "":
            out.setdefault(str(lot), []).append(i)
    return out


def lot_context(index: int, labels: Sequence[int], label_space: str,
                meta: Sequence[dict] | None, lots: dict[str, list[int]] | None = None
                ) -> dict[str, Any]:
    """{lot: None} when the wafer has no lot; else {lot, wafer (meta wafer_index or None),
    n_other, n_patterned, pattern_counts {pattern: n} (nonzero only, WM811K class order)}
    over the other labeled wafers of the lot (see the module docstring)."""
    md = (meta[index] if meta is not None and index < len(meta) else None) or {}
    lot = md.get("lot")
    if lot is None or str(lot) == "":
        return {"lot": None}
    lot = str(lot)
    lots = lots if lots is not None else lot_index(meta)
    counts = {p: 0 for p in WM811K_CLASSES}
    n_other = n_patterned = 0
    for j in lots.get(lot, [index]):
        if j == index or int(labels[j]) < 0:
            continue
        other = defect_set(label_space, int(labels[j]))
        n_other += 1
        n_patterned += bool(other)
        for p in other:
            counts[p] += 1
    wafer = md.get("wafer_index")
    return {"lot": lot, "wafer": None if wafer is None else int(wafer), "n_other": n_other,
            "n_patterned": n_patterned, "pattern_counts": {p: c for p, c in counts.items() if c}}


def batch_answer(context: dict, types: Sequence[str]) -> dict[str, Any]:
    """The batch answer value from the lot context and this wafer's patterns `types`:
    {lot: None} | {lot, n_other: 0} | {lot, n_other, n_patterned} (wafer without pattern) |
    {lot, n_other, shared {pattern: other wafers showing it}, lot_wide: bool}."""
    lot = context.get("lot")
    if lot is None:
        return {"lot": None}
    n = int(context["n_other"])
    if n == 0:
        return {"lot": lot, "n_other": 0}
    if not types:
        return {"lot": lot, "n_other": n, "n_patterned": int(context["n_patterned"])}
    shared = {p: int(context["pattern_counts"].get(p, 0)) for p in types}
    lot_wide = any(c >= LOT_WIDE_MIN and c >= LOT_WIDE_SHARE * n for c in shared.values())
    return {"lot": lot, "n_other": n, "shared": shared, "lot_wide": bool(lot_wide)}
