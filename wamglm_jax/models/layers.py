"""Shared building blocks: annotated dense/norm layers, remat and layer-stack helpers.

Every parameter is created through `nn.with_logical_partitioning`, so `nn.get_partition_spec`
of the abstract params gives logical axis names that `config.sharding_rules` map to mesh axes.
Logical names used: embed, mlp, heads, kv_heads, kv, vocab, patch, channels, norm, and `layers`
for the leading axis of `nn.scan` stacks.

Param trees: with `scan_layers=False` a tower's blocks are `layers_0 .. layers_{n-1}`; with
`scan_layers=True` they are one subtree `layers` whose leaves have a leading axis of size n.
`stack_layers` / `unstack_layers` convert between the two (plain, unboxed arrays).
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def compute_dtype(cfg) -> Dtype:
    """config.model.dtype ("float32" | "bfloat16") -> jnp dtype."""
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if cfg.dtype not in names:
        raise ValueError(f"config.model.dtype={cfg.dtype!r}; expected one of {sorted(names)}")
    return names[cfg.dtype]


def constrain(x, axes: Sequence[str | None]):
    """Logical sharding constraint on an activation (no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(axes))


class DenseND(nn.Module):
    """Dense layer contracting the last `in_dims` axes of x with a multi-dim kernel.

    kernel: [*in_shape, *features], bias: [*features]. Lets attention projections keep
    [embed, heads, kv] kernels (shardable by head) while staying a plain matmul.
    """
    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...] | None = None   # None -> no bias
    in_dims: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float | None = None   # None -> fan-in scaling 1/sqrt(prod(in_shape))

    @nn.compact
    def __call__(self, x):
        in_shape = tuple(x.shape[-self.in_dims:])
        kshape = in_shape + tuple(self.features)
        if len(self.kernel_axes) != len(kshape):
            raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} do not match kernel "
                             f"shape {kshape}")
        std = self.init_std if self.init_std is not None else 1.0 / math.sqrt(np.prod(in_shape))
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(std), self.kernel_axes), kshape, self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if self.bias_axes is not None:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.bias_axes), tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _norm_param(module: nn.Module, name: str, init, d: int):
    """A float32[d] norm parameter annotated with the logical axis `norm`."""
    return module.param(name, nn.with_logical_partitioning(init, ("norm",)), (d,), jnp.float32)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (torch.nn.LayerNorm semantics), statistics in fp32."""
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = _norm_param(self, "scale", nn.initializers.ones, d)
        bias = _norm_param(self, "bias", nn.initializers.zeros, d)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """Llama RMSNorm: x * rsqrt(mean(x^2) + eps) in fp32, times a learned weight."""
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = _norm_param(self, "scale", nn.initializers.ones, x.shape[-1])
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (y.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


_REMAT_POLICIES = {
    "full": None,   # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def maybe_remat(block_cls, remat: str, scan: bool):
    """Wrap a block class in nn.remat according to config.model.remat."""
    if remat == "none":
        return block_cls
    if remat not in _REMAT_POLICIES:
        raise ValueError(f"config.model.remat={remat!r}; expected one of none, full, dots")
    return nn.remat(block_cls, policy=_REMAT_POLICIES[remat], prevent_cse=not scan)


def scan_stack(block_cls, num_layers: int, in_axes: tuple):
    """nn.scan over `num_layers` copies of block_cls, params stacked on a 'layers' axis.

    block_cls.__call__(carry, xs, *rest) -> (carry, ys); `in_axes` describes (xs, *rest).
    """
    return nn.scan(block_cls, variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})


_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def stack_layers(tree):
    """Unrolled params (layers_0..layers_{n-1}) -> scanned params (`layers`, leading axis n).

    Works recursively on a dict tree of plain arrays (unbox first with nn.unbox)."""
    if not isinstance(tree, dict):
        return tree
    out, per_layer = {}, {}
    for k, v in tree.items():
        m = _LAYER_KEY.match(k)
        if m:
            per_layer[int(m.group(1))] = v
        else:
            out[k] = stack_layers(v)
    if per_layer:
        if sorted(per_layer) != list(range(len(per_layer))):
            raise ValueError(f"layer keys are not contiguous: {sorted(per_layer)}")
        items = [per_layer[i] for i in range(len(per_layer))]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *items)
    return out


def unstack_layers(tree):
    """Scanned params -> unrolled params. A subtree named `layers` (leading axis n) becomes
    layers_0..layers_{n-1}. Inverse of `stack_layers`."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if k == "layers" and isinstance(v, dict):
            n = jax.tree.leaves(v)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], v)
        else:
            out[k] = unstack_layers(v)
    return out
