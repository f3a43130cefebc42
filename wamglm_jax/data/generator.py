"""Procedural wafer-map generator: the 9 WM-811K classes and the 38 MixedWM38 mixtures.

Deterministic from a seed and vectorised: maps are made in batches that share a die grid
(one numpy pass per batch and pattern), so 100k maps take seconds, not minutes.

Geometry (wafer units: the wafer radius is 1; a grid H x W covers the wafer, so a die is
2/W wide and 2/H tall and a round wafer is an ellipse in index space when H != W):
  * on-wafer dies: centre within the usable radius rho (edge exclusion, 0.96..1.03), optional
    flat / notch cut; the grid is cropped to the dies on the wafer.
  * Center: disc at the centre, radius 0.15..0.38. Donut: annulus, inner 0.26..0.45, width
    0.12..0.25, arc 270..360 deg. Loc: ellipse 0.13..0.30 at radius 0.3..0.85-size (clear of
    the edge and of the centre). Edge-Loc: crescent at the edge, 0.15..0.38 deep (>= 2.5 dies)
    over 50..120 deg. Edge-Ring: band of 0.9..1.8 dies (at least 0.03) over 300..360 deg. Scratch: 1-4 joined thin
    segments (0.25..0.9 long each, >= 0.6 in all, turns <= 40 deg, 1-2 dies thick, density
    >= 0.85) or an arc, centred within 0.45 of the wafer centre. Random: 25..60 % of dies
    fail anywhere. Near-full: 78..99 % fail.
  * Every pattern fails its dies with a density (0.6..1) and soft borders, on top of
    background random failures (median ~5 %, <= 18 %) that rise slightly near the edge.
  * Lots: wafers come in lots (8..25 wafers, indices from 1..25) of one product (one die grid,
    one die count) and mostly one cause (same class, similar angle / position). In a mixed
    map each pattern has its own angle, so its patterns do not pile up in one place, and a
    pattern the others cover (more than half of its core under them, e.g. a scratch inside a
    Center disc) is drawn again: the label names only what the map shows.
Shapes follow WM-811K: the common grids (25x27, 27x25, 26x26, 38x36, 33x37, 53x52, 32x29,
49x39, ...) and a log-uniform tail from small (12 dies across, plus one 8x7 grid) to ~300x205. For the mixedwm38
label space the grid is 52x52 by default, like the MixedWM38 file.
"""
from __future__ import annotations

import numpy as np

from wamglm_jax.data import labels as L
from wamglm_jax.data.dataset import WaferDataset

# (H, W) -> weight, from the counts of the most frequent WM-811K grids.
COMMON_SHAPES = {
    (25, 27): 12.6, (27, 25): 7.5, (26, 26): 5.6, (38, 36): 1.7, (33, 37): 1.5, (53, 52): 1.2,
    (63, 62): 1.1, (39, 37): 0.8, (45, 43): 0.8, (48, 48): 0.6, (30, 34): 0.6, (35, 31): 0.5,
    (44, 41): 0.5, (32, 29): 1.0, (49, 39): 0.8, (29, 26): 0.45, (25, 26): 0.45,
}
TAIL_FRACTION = 0.2         # share of wafers whose grid comes from the long tail
# Labeled WM-811K class counts (FACTS.md), WM811K_CLASSES order.
WM811K_COUNTS = dict(Center=4294, Donut=555, **{"Edge-Loc": 5189, "Edge-Ring": 9680},
                     Loc=3593, **{"Near-full": 149}, Random=866, Scratch=1193, none=147431)
_TYPES = L.MIXED_TYPES      # pattern type names


def _tail_shapes() -> list[tuple[int, int]]:
    """A fixed catalogue of 200 less common grids (log-uniform size, mild aspect ratio)."""
    r = np.random.default_rng(811)
    side = np.exp(r.uniform(np.log(12), np.log(250), 200))
    aspect = np.exp(np.clip(r.normal(0, 0.15, 200), -0.4, 0.4))
    h = np.clip(np.round(side * np.sqrt(aspect)), 6, 300).astype(int)
    w = np.clip(np.round(side / np.sqrt(aspect)), 4, 205).astype(int)
    out = [(int(a), int(b)) for a, b in zip(h, w)] + [(300, 202), (212, 204), (8, 7)]
    return out


TAIL_SHAPES = _tail_shapes()


def class_weights(label_space: str, balance) -> np.ndarray:
    """'balanced' -> uniform; 'wm811k' / 'natural' -> the real dataset's class frequencies
    (WM-811K labeled rows, or MixedWM38's per-class counts); or explicit weights."""
    names = L.class_names(label_space)
    if isinstance(balance, str):
        if balance == "balanced":
            w = np.ones(len(names))
        elif balance in ("wm811k", "natural", "mixedwm38"):
            if label_space == "wm811k":
                w = np.array([WM811K_COUNTS[n] for n in names], float)
            else:
                w = np.full(38, 1000.0)
                w[6], w[8] = 149, 866   # Near-full, Random (FACTS.md)
        else:
            raise ValueError(f"balance={balance!r}: expected 'balanced', 'wm811k' (natural "
                             "frequencies) or a list of per-class weights")
    else:
        w = np.asarray(balance, float).reshape(-1)
        if w.shape != (len(names),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"balance weights: expected {len(names)} non-negative values, "
                             f"got {w!r}")
    return w / w.sum()


def _exact_counts(num: int, w: np.ndarray, rng) -> np.ndarray:
    """Largest-remainder rounding of num * w (ties broken at random)."""
    raw = num * w
    c = np.floor(raw).astype(int)
    rem = raw - c + rng.uniform(0, 1e-6, len(w))
    c[np.argsort(-rem)[: num - c.sum()]] += 1
    return c


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _angdiff(a, b):
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


class _Batch:
    """Maps sharing one H x W grid. Parameter arrays are [n] (broadcast as [n,1,1])."""

    def __init__(self, H, W, n, rng):
        self.H, self.W, self.n, self.rng = H, W, n, rng
        u = ((np.arange(W, dtype=np.float32) + 0.5) / W * 2 - 1)[None, None, :]
        v = ((np.arange(H, dtype=np.float32) + 0.5) / H * 2 - 1)[None, :, None]
        self.u, self.v = u, v
        self.r = np.sqrt(u * u + v * v)                     # [1,H,W]
        self.t = np.arctan2(v, u)
        self.pitch = np.float32(2.0 / np.sqrt(H * W))       # one die, wafer units

    def col(self, x):
        return np.asarray(x, np.float32)[:, None, None]


def _pattern(kind: str, b: _Batch, m: int, rng, rho, ang):
    """Failure probability float32[m,H,W] of one pattern for m maps (ang: lot-shared angle)."""
    c = lambda x: np.asarray(x, np.float32)[:, None, None]  # noqa: E731
    dens = c(rng.uniform(0.6, 1.0, m))
    soft = c(rng.uniform(0.6, 1.6, m) * b.pitch)          # border width ~ one die
    rho = c(rho)
    u, v, r, t = b.u, b.v, b.r, b.t
    if kind == "Center":
        cx, cy = c(rng.normal(0, 0.05, m)), c(rng.normal(0, 0.05, m))
        rad = c(rng.uniform(0.15, 0.38, m))
        d = np.sqrt((u - cx) ** 2 + (v - cy) ** 2)
        return np.clip(dens + 0.15, 0, 1) * _sig((rad - d) / soft)
    if kind == "Donut":
        cx, cy = c(rng.normal(0, 0.04, m)), c(rng.normal(0, 0.04, m))
        rin = c(rng.uniform(0.26, 0.45, m))
        wid = c(np.maximum(rng.uniform(0.12, 0.25, m), 2.5 * float(b.pitch)))
        dens = np.maximum(dens, 0.75)
        half = c(np.where(rng.random(m) < 0.6, np.pi, rng.uniform(0.75, 1.0, m) * np.pi))
        d = np.sqrt((u - cx) ** 2 + (v - cy) ** 2)
        arc = _angdiff(t, c(ang)) <= half
        return dens * _sig((d - rin) / soft) * _sig((rin + wid - d) / soft) * arc
    if kind == "Loc":
        a = np.maximum(rng.uniform(0.13, 0.30, m), 2.2 * float(b.pitch))
        rc = rng.uniform(0.3, np.maximum(0.31, 0.85 - a), m)
        th = ang + rng.normal(0, 0.5, m)
        cx, cy = c(rc * np.cos(th)), c(rc * np.sin(th))
        bb = c(a * rng.uniform(0.7, 1.0, m))
        dens = np.maximum(dens, 0.8)
        a = c(a)
        phi = c(rng.uniform(0, np.pi, m))
        du, dv = u - cx, v - cy
        x1 = du * np.cos(phi) + dv * np.sin(phi)
        y1 = -du * np.sin(phi) + dv * np.cos(phi)
        dn = np.sqrt((x1 / a) ** 2 + (y1 / bb) ** 2)
        return dens * _sig((1 - dn) * a / soft)
    if kind == "Edge-Loc":
        half = c(rng.uniform(25, 60, m) * np.pi / 180)
        depth = c(np.maximum(rng.uniform(0.15, 0.38, m), 2.5 * float(b.pitch)))
        dens = np.maximum(dens, 0.75)
        dth = _angdiff(t, c(ang + rng.normal(0, 0.4, m)))
        prof = np.sqrt(np.clip(np.cos(0.5 * np.pi * np.minimum(dth / half, 1.0)), 0, 1))
        return dens * _sig((r - (rho - depth * prof)) / soft) * (dth < half)
    if kind == "Edge-Ring":
        w = np.maximum(rng.uniform(0.03, 0.07, m), rng.uniform(0.9, 1.8, m) * float(b.pitch))
        gap = c(rng.uniform(0, 60, m) * np.pi / 180 * (rng.random(m) < 0.5))
        inarc = _angdiff(t, c(rng.uniform(-np.pi, np.pi, m))) >= gap / 2
        return np.clip(dens + 0.2, 0, 1) * (r >= rho - c(w)) * inarc
    if kind == "Scratch":
        k = rng.integers(1, 5, m)                                   # segments
        arc = rng.random(m) < 0.35
        k = np.where(arc, 4, k)
        turn = np.where(arc, rng.uniform(0.15, 0.45, m) * rng.choice([-1, 1], m),
                        0.0)
        # total length >= 0.6 wafer radii: a scratch never shrinks to a blob
        seglen = np.maximum(rng.uniform(0.25, 0.5, m), rng.uniform(0.6, 0.9, m) / k)
        th = ang + rng.normal(0, 0.6, m)
        half_t = c(np.maximum(rng.uniform(0.55, 1.0, m) * b.pitch, 0.025))
        # vertices of the polyline (turns <= 0.7 rad keep it elongated), then centred on a
        # point within 0.45 of the wafer centre so that most of it lies on the wafer
        vx, vy = [np.zeros(m)], [np.zeros(m)]
        for s in range(4):
            th = th + (np.where(arc, turn, rng.uniform(-0.7, 0.7, m)) if s else 0.0)
            vx.append(vx[-1] + np.where(s < k, seglen * np.cos(th), 0.0))
            vy.append(vy[-1] + np.where(s < k, seglen * np.sin(th), 0.0))
        vx, vy = np.stack(vx), np.stack(vy)                           # [5,m]
        cr, ct = np.sqrt(rng.uniform(0, 0.2, m)), rng.uniform(-np.pi, np.pi, m)
        vx += cr * np.cos(ct) - (vx[0] + vx[-1]) / 2
        vy += cr * np.sin(ct) - (vy[0] + vy[-1]) / 2
        dmin = np.full((m, b.H, b.W), np.inf, np.float32)
        for s in range(4):
            ax, ay, ex, ey = c(vx[s]), c(vy[s]), c(vx[s + 1] - vx[s]), c(vy[s + 1] - vy[s])
            tt = np.clip(((u - ax) * ex + (v - ay) * ey) / np.maximum(ex * ex + ey * ey, 1e-9),
                         0, 1)
            d = np.sqrt((u - ax - tt * ex) ** 2 + (v - ay - tt * ey) ** 2)
            d = np.where(c(s < k), d, np.inf)
            np.minimum(dmin, d, out=dmin)
        return np.maximum(dens, 0.85) * (dmin <= half_t)
    if kind == "Random":
        return c(rng.uniform(0.25, 0.6, m)) * np.ones_like(r)
    if kind == "Near-full":
        base = c(np.where(rng.random(m) < 0.25, 1.0, rng.uniform(0.78, 0.97, m)))
        # a few large good regions (smooth field) for realism
        g = c(rng.uniform(0, 0.15, m)) * np.cos(c(rng.uniform(1, 3, m)) * (u * c(
            rng.normal(size=m)) + v * c(rng.normal(size=m))))
        return np.clip(base + g, 0, 1)
    raise ValueError(f"unknown pattern {kind!r}")


def _render(b: _Batch, types: list[frozenset], rho, flat, ang, bg, rng) -> np.ndarray:
    """uint8[n,H,W] maps for one grid batch; ang float[n,len(_TYPES)]: each pattern's angle."""
    n = b.n
    c = b.col
    on = b.r <= c(rho)
    has_flat = flat[:, 0] > 0
    fa, fd = c(flat[:, 1]), c(np.where(has_flat, flat[:, 2], 9.0))
    on = on & ((b.u * np.cos(fa) + b.v * np.sin(fa)) <= fd)
    edge = _sig((b.r - c(rho) + 0.15) / 0.05)
    p = (c(bg) * (1 + c(rng.uniform(0, 1.0, n)) * edge)).astype(np.float32)
    p = np.broadcast_to(p, (n, b.H, b.W)).copy()
    drawn = {}                                          # kind -> (idx int[m], q float[m,H,W])
    for k, kind in enumerate(_TYPES):
        idx = np.array([i for i in range(n) if kind in types[i]], np.int64)
        if len(idx):
            drawn[kind] = (idx, _pattern(kind, b, len(idx), rng, rho[idx], ang[idx, k]))
    if any(len(t) > 1 for t in types):
        _redraw_hidden(drawn, b, on, rho, ang, rng)
    for idx, q in drawn.values():
        p[idx] = 1 - (1 - p[idx]) * (1 - q)
    fail = rng.random(p.shape, dtype=np.float32) < p
    return (on.astype(np.uint8) * (1 + fail)).astype(np.uint8)


# A pattern of a mixed map counts as visible when at least VISIBLE_MIN of its core dies (on
# the wafer, own failure probability > 0.5) lie where the map's other patterns fail with
# probability < CLEAR_MAX; a hidden one is drawn again (new shape and place), up to
# MAX_REDRAWS times.
VISIBLE_MIN, CLEAR_MAX, MAX_REDRAWS = 0.5, 0.3, 16


def visible_fractions(drawn: dict, on: np.ndarray) -> dict:
    """kind -> float[m]: the share of each drawn pattern's core dies that the map's other
    patterns leave clear. drawn: kind -> (idx int[m], q float[m,H,W]); on bool[n,H,W]."""
    n, shape = on.shape[0], on.shape[1:]
    clear_of = {}
    for kind in drawn:                  # product of (1 - q) over the other patterns: [n,H,W]
        free = np.ones((n,) + shape, np.float32)
        for other, (idx, q) in drawn.items():
            if other != kind:
                free[idx] *= 1 - q
        clear_of[kind] = free
    out = {}
    for kind, (idx, q) in drawn.items():
        core = (q > 0.5) & on[idx]
        clear = core & (1 - clear_of[kind][idx] < CLEAR_MAX)
        ncore = core.sum(axis=(1, 2))
        out[kind] = np.where(ncore > 0, clear.sum(axis=(1, 2)) / np.maximum(ncore, 1), 0.0)
    return out


def _redraw_hidden(drawn: dict, b: _Batch, on, rho, ang, rng) -> None:
    """Redraws, in place, the patterns of multi-pattern maps that the others cover: a label
    must name only what the map shows (a one-die scratch inside a Center disc is invisible).
    Only maps with several patterns are checked, so single-pattern maps draw nothing more."""
    count = np.zeros(b.n, np.int64)
    for idx, _ in drawn.values():
        count[idx] += 1
    dirty = np.flatnonzero(count > 1)    # maps whose visibility is (re)checked, sorted
    for _ in range(MAX_REDRAWS):
        if not len(dirty):
            return
        local, rows_of = {}, {}
        for kind, (idx, q) in drawn.items():
            rows = np.flatnonzero(np.isin(idx, dirty))
            if len(rows):
                local[kind] = (np.searchsorted(dirty, idx[rows]), q[rows])
                rows_of[kind] = rows
        frac = visible_fractions(local, on[dirty])
        redrawn = []
        for kind, rows in rows_of.items():
            rows = rows[frac[kind] < VISIBLE_MIN]
            if len(rows):
                idx, q = drawn[kind]
                sub = idx[rows]
                q[rows] = _pattern(kind, b, len(sub), rng, rho[sub],
                                   ang[sub, _TYPES.index(kind)])
                redrawn.append(sub)
        dirty = np.unique(np.concatenate(redrawn)) if redrawn else dirty[:0]


def _lot_shapes(num_lots, rng, shapes):
    if shapes is not None:
        arr = np.asarray(shapes, int).reshape(-1, 2)
        if len(arr) == 0 or arr.min() < 3 or arr.max() > 999:
            raise ValueError(f"shapes={shapes!r}: expected (H, W) grids with 3 <= H, W <= 999")
        return [tuple(map(int, arr[i])) for i in rng.integers(0, len(arr), num_lots)]
    common = list(COMMON_SHAPES)
    wc = np.array([COMMON_SHAPES[s] for s in common])
    out = []
    tail = rng.random(num_lots) < TAIL_FRACTION
    ci = rng.choice(len(common), num_lots, p=wc / wc.sum())
    ti = rng.integers(0, len(TAIL_SHAPES), num_lots)
    for k in range(num_lots):
        out.append(TAIL_SHAPES[ti[k]] if tail[k] else common[ci[k]])
    return out


def generate(num: int, seed: int = 0, label_space: str = "wm811k", balance="balanced",
             shapes=None, background: float = 1.0, chunk: int = 2048,
             lot_prefix: str | None = None, lot_numbers=None) -> WaferDataset:
    """Generates ``num`` labelled maps, deterministic from ``seed``.

    label_space: 'wm811k' (9 classes) or 'mixedwm38' (38 classes, MixedWM38 order).
    balance: 'balanced' | 'wm811k' (natural frequencies of the label space) | weights[C].
    shapes: None = WM-811K-like grid distribution ('wm811k' space) or 52x52 ('mixedwm38');
        or a list of (H, W) grids to draw from.
    background: scale of the background random-failure density (0 = clean maps).
    WM-811K-like grids are cropped to the dies on the wafer (as in LSWMD.pkl); fixed grids
    (``shapes`` given, or 52x52 for mixedwm38) keep their full size, as in MixedWM38.
    Maps are ordered lot by lot; meta holds lot, wafer_index (1..25), die_size (dies on the
    wafer, as WM-811K's dieSize), grid and the pattern types. Lot k (0-based) is named
    f"{lot_prefix}{lot_numbers[k]}" (default prefix f"syn{seed}-lot", numbers 1, 2, ...);
    ``lot_numbers`` needs at least num // 8 + 1 entries (the most lots ``num`` maps can form).
    """
    if num < 0:
        raise ValueError(f"num={num}: expected >= 0")
    names = L.class_names(label_space)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x3AFE]))
    crop = shapes is None and label_space == "wm811k"   # fixed grids stay whole (52x52)
    if shapes is None and label_space == "mixedwm38":
        shapes = [(52, 52)]
    counts = _exact_counts(num, class_weights(label_space, balance), rng)
    labels = rng.permutation(np.repeat(np.arange(len(names)), counts))
    # Lots: mostly one cause per lot (sort by a key equal to the label for ~75% of wafers).
    key = np.where(rng.random(num) < 0.75, labels, rng.integers(0, len(names), num))
    order = np.argsort(key * 2.0 + rng.random(num) * 0.5, kind="stable")
    labels = labels[order]
    sizes = rng.integers(8, 26, num // 8 + 1)               # wafers per lot (>= enough)
    nlots = int(np.searchsorted(np.cumsum(sizes), num)) + 1 if num else 0
    sizes = sizes[:nlots]
    if nlots:
        sizes[-1] -= int(sizes.sum()) - num
    lot_of = np.repeat(np.arange(len(sizes)), sizes)
    lot_grid = _lot_shapes(len(sizes), rng, shapes)
    lot_ang = rng.uniform(-np.pi, np.pi, len(sizes))
    lot_flat = np.stack([rng.random(len(sizes)) < 0.35,
                         np.pi / 2 * rng.integers(0, 4, len(sizes)),
                         rng.uniform(0.88, 0.97, len(sizes))], 1)
    wafer_index = np.concatenate([np.sort(rng.choice(25, s, replace=False)) + 1 for s in sizes]
                                 ) if num else np.zeros(0, int)
    if label_space == "wm811k":
        types = [frozenset() if names[y] == L.NONE else frozenset([names[y]]) for y in labels]
    else:
        types = [L.MIXEDWM38_CLASSES[y] for y in labels]
    rho = rng.uniform(0.96, 1.03, num)
    ang = lot_ang[lot_of] + rng.normal(0, 0.35, num)
    # The patterns of a mixed map lie at independent angles: each pattern kind gets its own
    # angle offset per lot (lots stay coherent), drawn from a separate stream so that maps
    # with one pattern, all of the 9-class space, are exactly as before. With one shared
    # angle, a Loc and an Edge-Loc of the same map fell on top of each other and read as one
    # larger Edge-Loc (likewise Scratch over Loc, Donut arcs over Loc).
    offsets = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0A11])).uniform(
        -np.pi, np.pi, (len(sizes), len(_TYPES)))
    multi = np.array([len(t) > 1 for t in types], bool)
    ang = ang[:, None] + np.where(multi[:, None], offsets[lot_of], 0.0)  # float[num,K]
    flat = lot_flat[lot_of]
    bg = background * np.minimum(rng.lognormal(np.log(0.05), 0.7, num), 0.18)
    grid = np.array([lot_grid[k] for k in lot_of], int).reshape(-1, 2)
    maps: list = [None] * num
    # Batches per grid (sorted for determinism), in chunks to bound memory.
    ukeys, inv = np.unique(grid[:, 0] * 1000 + grid[:, 1], return_inverse=True)
    for g, key_g in enumerate(ukeys):
        members = np.flatnonzero(inv == g)
        H, W = int(key_g // 1000), int(key_g % 1000)
        step = max(1, chunk * 700 // (H * W))
        for s in range(0, len(members), step):
            idx = members[s:s + step]
            b = _Batch(H, W, len(idx), rng)
            out = _render(b, [types[i] for i in idx], rho[idx], flat[idx], ang[idx], bg[idx],
                          rng)
            for j, i in enumerate(idx):
                maps[i] = _crop(out[j]) if crop else np.ascontiguousarray(out[j])
    prefix = lot_prefix if lot_prefix is not None else f"syn{seed}-lot"
    numbers = np.arange(1, len(sizes) + 1) if lot_numbers is None else np.asarray(lot_numbers)
    if len(numbers) < len(sizes):
        raise ValueError(f"generate: lot_numbers has {len(numbers)} entries, {len(sizes)} lots "
                         f"need names (give at least num // 8 + 1 = {num // 8 + 1})")
    meta = [dict(lot=f"{prefix}{numbers[lot_of[i]]}", wafer_index=int(wafer_index[i]),
                 die_size=int(np.count_nonzero(maps[i])), grid=tuple(map(int, grid[i])),
                 types=sorted(types[i])) for i in range(num)]
    return WaferDataset(maps=maps, labels=labels.astype(np.int32), label_space=label_space,
                        split=None, meta=meta, source=f"generator(seed={seed})")


def _crop(m: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(m.any(1))
    cols = np.flatnonzero(m.any(0))
    if len(rows) == 0:       # cannot happen for grids >= 3x3, kept as a guard
        m = m.copy()
        m[m.shape[0] // 2, m.shape[1] // 2] = 1
        return m
    return np.ascontiguousarray(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
