"""Map -> model image: one-hot die states, exact area resize to S x S, label-preserving views.

``area_resize_onehot`` treats die (i, j) of an H x W map as the cell [i/H, (i+1)/H) x
[j/W, (j+1)/W) of the unit square and output pixel (a, b) as [a/S, (a+1)/S) x [b/S, (b+1)/S);
channel c of the output pixel is the fraction of its area covered by dies in state c
(0 off-wafer, 1 good, 2 fail), so the 3 channels sum to 1 and a one-die-wide scratch on a
200-die grid still shows at S=32 as a faint line. The fractions are computed exactly (separable
overlap matrices, float64 then float32). The grid is stretched to a square: a round wafer whose
dies are not square is an ellipse in index space and becomes round again.
"""
from __future__ import annotations

import functools

import numpy as np

from wamglm_jax.data.wafer import NUM_STATES

# The 8 label-preserving transforms of the square (dihedral group): (k rot90, flip).
DIHEDRAL = tuple((k, f) for f in (False, True) for k in range(4))


@functools.lru_cache(maxsize=4096)
def overlap_matrix(n: int, s: int) -> np.ndarray:
    """float64[s, n]: R[a, i] = |[a/s,(a+1)/s) ∩ [i/n,(i+1)/n)| * s (rows sum to 1)."""
    edges_out = np.arange(s + 1, dtype=np.float64) / s
    edges_in = np.arange(n + 1, dtype=np.float64) / n
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    r = np.clip(hi - lo, 0, None) * s
    r.setflags(write=False)
    return r


def onehot(m: np.ndarray) -> np.ndarray:
    """uint8[H,W] -> float32[H,W,3]."""
    return (np.asarray(m)[..., None] == np.arange(NUM_STATES, dtype=np.uint8)).astype(np.float32)


def area_resize_onehot(m: np.ndarray, size: int) -> np.ndarray:
    """uint8[H,W] die states -> float32[S,S,3] area fractions of off/good/fail per pixel."""
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"area_resize_onehot: expected a 2-D map, got shape {m.shape}")
    if size < 1:
        raise ValueError(f"area_resize_onehot: size must be >= 1, got {size}")
    h, w = m.shape
    rh, rw = _overlap32(h, int(size)), _overlap32(w, int(size))     # [S,H], [S,W]
    oh = onehot(m).reshape(h, w * NUM_STATES)                       # [H,W*3]
    t = (rh @ oh).reshape(size, w, NUM_STATES).transpose(0, 2, 1)   # [S,3,W]
    return np.ascontiguousarray((t @ rw.T).transpose(0, 2, 1))      # [S,S,3]


@functools.lru_cache(maxsize=4096)
def _overlap32(n: int, s: int) -> np.ndarray:
    r = overlap_matrix(n, s).astype(np.float32)
    r.setflags(write=False)
    return r


def dihedral(img: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotates [S,S,C] (or [H,W]) by k*90 degrees after an optional left-right flip."""
    x = img[:, ::-1] if flip else img
    return np.ascontiguousarray(np.rot90(x, k, axes=(0, 1)))


def random_rotation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return dihedral(img, int(rng.integers(4)), False)


def random_flips(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img[:, ::-1] if rng.random() < 0.5 else img
    x = x[::-1] if rng.random() < 0.5 else x
    return np.ascontiguousarray(x)


def make_views(img: np.ndarray, num_views: int, rng: np.random.Generator) -> np.ndarray:
    """PSCL views (FACTS.md): v1 = random 90-degree rotation, v2 = v3 = random flips.
    Returns float32[V,S,S,3]; every view has the same label as img."""
    if num_views == 1:
        return random_rotation(img, rng)[None]
    if num_views == 3:
        return np.stack([random_rotation(img, rng), random_flips(img, rng),
                         random_flips(img, rng)])
    raise ValueError(f"num_views={num_views}: expected 1 or 3")
