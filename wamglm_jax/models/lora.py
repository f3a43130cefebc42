"""LoRA as a transform on parameter trees (no change to the modules).

A LoRA tree mirrors the parameter tree but holds only the adapted kernels; at each adapted
kernel's path it holds ``{'a': float[*batch, IN, r], 'b': float[*batch, r, OUT]}``, where a
kernel of shape ``(*batch, *in_dims, *out_dims)`` is viewed as a matrix ``[IN, OUT]`` with
``IN = prod(in_dims)``, ``OUT = prod(out_dims)`` (3-D attention kernels of ``DenseGeneral`` and
stacked ``nn.scan`` layers are handled by that flattening; ``batch`` are stacked-layer axes).

    effective W = W + (alpha / r) * (A @ B).reshape(W.shape)

``apply_lora`` is meant to be called inside the jitted forward (``model.apply({'params':
apply_lora(params, lora, alpha)}, ...)``): the gradient then flows to ``params`` and ``lora``
separately and the optimizer may update only the adapters. Checkpoints keep the adapters
unmerged (``params`` and ``lora`` both saved) so training resumes; ``merge`` produces plain
parameters for export or inference. ``B`` starts at zero, so a fresh adapter changes nothing.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any

# Kernels whose *output* is the last axis and whose input spans all other (non-batch) axes:
# attention output projections of DenseGeneral form [H, Dh, D].
_OUT_PROJ = re.compile(r"(o_proj|out_proj|attn_out|/out)(/|$)")


def path_str(path) -> str:
    """'lm/layers_0/attn/q_proj/kernel' from a jax key path."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def default_layout(path: str, shape: tuple[int, ...], num_batch_dims: int = 0) -> tuple[int, int]:
    """(number of leading batch axes, number of input axes) of a kernel.

    2-D: [in, out]. 3-D DenseGeneral: [D, H, Dh] for q/k/v-style projections (1 input axis)
    and [H, Dh, D] for output projections (matched by name: o_proj / out_proj / out).
    """
    core = len(shape) - num_batch_dims
    if core < 2:
        raise ValueError(f"LoRA target {path!r} has shape {shape}: need at least 2 non-batch axes")
    if core == 2:
        return num_batch_dims, 1
    if _OUT_PROJ.search(path):
        return num_batch_dims, core - 1
    return num_batch_dims, 1


def _split(shape, nb, ni):
    batch, rest = tuple(shape[:nb]), tuple(shape[nb:])
    return batch, math.prod(rest[:ni]), math.prod(rest[ni:])


def _set(tree: dict, keys: list[str], value):
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def init_lora(params: PyTree, rank: int, alpha: float, target_regex: str, rng: jax.Array, *,
              stacked_regex: str | None = None,
              layout: Callable[[str, tuple, int], tuple[int, int]] = default_layout) -> PyTree:
    """Creates LoRA factors for every kernel whose path ('/'-joined) matches ``target_regex``.

    Only leaves with >= 2 dims and whose path ends in 'kernel' are considered. ``stacked_regex``
    marks scanned layer stacks (one leading layer axis gets one adapter per layer).
    ``alpha`` is accepted for symmetry with ``apply_lora`` (it does not change the init).
    A is drawn like a kaiming-uniform Linear (bound 1/sqrt(IN)); B = 0. Works on
    ``jax.ShapeDtypeStruct`` leaves too (then under ``jax.eval_shape``).
    """
    del alpha
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    pat = re.compile(target_regex)
    stk = re.compile(stacked_regex) if stacked_regex else None
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    lora: dict = {}
    n = 0
    for path, leaf in leaves:
        p = path_str(path)
        if not p.endswith("kernel") or len(leaf.shape) < 2 or not pat.search(p):
            continue
        nb = 1 if (stk is not None and stk.search(p)) else 0
        nb, ni = layout(p, tuple(leaf.shape), nb)
        batch, d_in, d_out = _split(leaf.shape, nb, ni)
        key = jax.random.fold_in(rng, n)
        n += 1
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, batch + (d_in, rank), jnp.float32, -bound, bound)
        b = jnp.zeros(batch + (rank, d_out), jnp.float32)
        _set(lora, p.split("/"), {"a": a, "b": b})
    if n == 0:
        raise ValueError(f"LoRA target_regex {target_regex!r} matched no kernel; kernels are e.g. "
                         f"{[path_str(q) for q, _ in leaves if path_str(q).endswith('kernel')][:6]}")
    return lora


def _delta(a, b, shape, dtype, scale):
    d = jnp.einsum("...ir,...ro->...io", a, b) * scale      # float[*batch, IN, OUT]
    return d.reshape(shape).astype(dtype)


def apply_lora(params: PyTree, lora: PyTree, alpha: float) -> PyTree:
    """Effective params: W + alpha/r * A@B at every adapted kernel; other leaves unchanged."""
    if not lora:
        return params

    def walk(p, l, where):
        if isinstance(l, dict) and set(l) == {"a", "b"} and not isinstance(p, dict):
            rank = l["a"].shape[-1]
            return p + _delta(l["a"], l["b"], p.shape, p.dtype, alpha / rank)
        if not isinstance(p, dict):
            raise ValueError(f"LoRA tree has adapters at {where!r} where params have a leaf")
        out = dict(p)
        for k, sub in l.items():
            if k not in p:
                raise ValueError(f"LoRA tree path {where + '/' + k!r} is not in the params")
            out[k] = walk(p[k], sub, f"{where}/{k}" if where else k)
        return out

    return walk(_as_dict(params), lora, "")


def _as_dict(tree):
    if hasattr(tree, "items") and not isinstance(tree, dict):
        return {k: _as_dict(v) for k, v in tree.items()}
    if isinstance(tree, dict):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


merge = jax.jit(apply_lora, static_argnums=2)
merge.__doc__ = "Merged (plain) params for export/inference: jitted ``apply_lora``."


def count(lora: PyTree) -> int:
    """Number of adapter parameters."""
    return sum(x.size for x in jax.tree_util.tree_leaves(lora))


def effective_params(params, alpha):
    """Params with LoRA applied (when params holds a 'lora' subtree) for model.apply."""
    if "lora" not in params:
        return params
    base = {k: v for k, v in params.items() if k != "lora"}
    return apply_lora(base, params["lora"], alpha)


def merged_params(params, alpha):
    """Plain WamGLM params (LoRA merged) for inference/export."""
    if "lora" not in params:
        return params
    base = {k: v for k, v in params.items() if k != "lora"}
    return merge(base, params["lora"], float(alpha))
