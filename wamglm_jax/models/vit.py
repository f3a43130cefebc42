"""SigLIP-compatible ViT (Hugging Face `SiglipVisionModel`, no attention-pooling head).

    images float[B,S,S,C] -> patch conv (stride P, HWIO kernel) + learned position embeddings
    -> num_layers pre-LN blocks (layer_norm1, self_attn, layer_norm2, mlp with tanh GELU)
    -> post_layernorm.

Returns (features, pooled):
    features float[B,N,K*Dv] = HF `hidden_states[vit.feature_layer]` (hidden_states[0] is the
        embedding output, -1 the last block), taken BEFORE post_layernorm (what Llava feeds its
        projector); with a list of K layers (HF `vision_feature_layer` as a list, as Granite
        Vision uses it), their hidden states concatenated on the last axis in list order;
    pooled float[B,Dv] = mean over the N tokens of post_layernorm(last block output) (stage 1);
        with pooling='mean_max', float[B,2Dv] = [mean, max] over the tokens (a pattern that
        covers a few tokens, a thin scratch, is not averaged away). Pooling has no parameters
        and is not exported: the Llava projector reads `features`.

Param names mirror HF (`embeddings/patch_embedding`, `encoder/layers_i/self_attn/q_proj`, ...)
so that export/hf_weights.py is a rename plus transposes. With scan_layers the blocks are one
`encoder/layers` stack and the feature output is selected inside the scan (no per-layer copy).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wamglm_jax.models.layers import (DenseND, LayerNorm, compute_dtype, constrain, maybe_remat,
                                      scan_stack)

ACT = ("batch", "length", "act_embed")


def num_patches(cfg) -> int:
    """N = (S / P)^2 for config.model (raises if P does not divide S)."""
    s, p = cfg.vit.image_size, cfg.vit.patch_size
    if s % p:
        raise ValueError(f"config.model.vit.image_size={s} is not a multiple of patch_size={p}")
    return (s // p) ** 2


def feature_layers(cfg) -> tuple[int, ...]:
    """config.model.vit.feature_layer as a tuple of HF hidden_states indices (an int, or a
    non-empty list/tuple of ints, as HF `vision_feature_layer` takes it)."""
    f = cfg.vit.feature_layer
    layers = (f,) if isinstance(f, int) else tuple(f) if isinstance(f, (list, tuple)) else None
    if not layers or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
        raise ValueError(f"config.model.vit.feature_layer={f!r}: expected a layer index or a "
                         "non-empty list of layer indices (HF hidden_states indices)")
    return layers


def set_feature_layer(cfg, layer) -> None:
    """Sets config.model.vit.feature_layer to an int or a list of ints whatever type the field
    had (a config rebuilt from JSON types it by its saved value)."""
    cfg.vit.feature_layer = ml_collections.FieldReference(
        tuple(layer) if isinstance(layer, (list, tuple)) else layer, field_type=object)
    feature_layers(cfg)


def feature_blocks(cfg) -> tuple[int, ...]:
    """0-based indices of the blocks whose outputs make `features` (-1 = the embeddings), in
    config order."""
    n, out = cfg.vit.num_layers, []
    for f in feature_layers(cfg):
        k = f + n + 1 if f < 0 else f         # HF hidden_states index, 0..n
        if not 0 <= k <= n:
            raise ValueError(f"config.model.vit.feature_layer={cfg.vit.feature_layer!r}: layer "
                             f"{f} out of range for num_layers={n} (valid: {-(n + 1)}..{n})")
        out.append(k - 1)
    return tuple(out)


def feature_dim(cfg) -> int:
    """Dv times the number of feature layers: the projector's input width."""
    return cfg.vit.hidden_size * len(feature_layers(cfg))


class SiglipAttention(nn.Module):
    cfg: Any
    dtype: Any

    @nn.compact
    def __call__(self, x):                                  # x float[B,N,Dv]
        v = self.cfg.vit
        h = v.num_heads
        if v.hidden_size % h:
            raise ValueError(f"config.model.vit.hidden_size={v.hidden_size} not divisible by "
                             f"num_heads={h}")
        hd = v.hidden_size // h

        def proj(name):
            return DenseND((h, hd), ("embed", "heads", "kv"), ("heads", "kv"),
                           dtype=self.dtype, name=name)(x)
        q, k, vv = proj("q_proj"), proj("k_proj"), proj("v_proj")   # float[B,N,H,hd]
        q = constrain(q, ("batch", "length", "heads", "kv"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * hd ** -0.5
        p = jax.nn.softmax(s, axis=-1).astype(self.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, vv)                       # float[B,N,H,hd]
        return DenseND((v.hidden_size,), ("heads", "kv", "embed"), ("embed",), in_dims=2,
                       dtype=self.dtype, name="out_proj")(o)


class SiglipMLP(nn.Module):
    cfg: Any
    dtype: Any

    @nn.compact
    def __call__(self, x):
        v = self.cfg.vit
        h = DenseND((v.intermediate_size,), ("embed", "mlp"), ("mlp",), dtype=self.dtype,
                    name="fc1")(x)
        h = constrain(jax.nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        return DenseND((v.hidden_size,), ("mlp", "embed"), ("embed",), dtype=self.dtype,
                       name="fc2")(h)


def drop_path_rate(cfg) -> float:
    """config.model.vit.drop_path_rate (stochastic depth at the last block; 0 = off)."""
    r = float(cfg.vit.get("drop_path_rate", 0.0))
    if not 0.0 <= r < 1.0:
        raise ValueError(f"config.model.vit.drop_path_rate={r}: expected 0 <= rate < 1")
    return r


class EncoderLayer(nn.Module):
    """One pre-LN block. Scan-compatible: (carry=(x, feats), layer_idx) -> ((x, feats), None);
    feats[j] is replaced by this block's output when layer_idx == feat_blocks[j].

    Stochastic depth (Huang et al. 2016; as DeiT/timm): in training (`deterministic=False`)
    each residual branch of block i is dropped per example with probability
    rate * i / (n - 1) (0 for the first block, `drop_path_rate` for the last) and kept ones
    are scaled by 1 / keep, so evaluation uses the full network. Needs a 'dropout' rng."""
    cfg: Any
    dtype: Any
    feat_blocks: tuple
    deterministic: bool = True

    def _drop_path(self, h, layer_idx):                      # h float[B,N,Dv]
        rate = drop_path_rate(self.cfg)
        if self.deterministic or rate == 0.0:
            return h
        n = self.cfg.vit.num_layers
        keep = 1.0 - rate * jnp.asarray(layer_idx, jnp.float32) / max(n - 1, 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (h.shape[0], 1, 1))
        return h * (mask / keep).astype(h.dtype)

    @nn.compact
    def __call__(self, carry, layer_idx):
        x, feats = carry
        eps = self.cfg.vit.layer_norm_eps
        h = SiglipAttention(self.cfg, self.dtype, name="self_attn")(
            LayerNorm(eps, self.dtype, name="layer_norm1")(x))
        x = constrain(x + self._drop_path(h, layer_idx), ACT)
        h = SiglipMLP(self.cfg, self.dtype, name="mlp")(
            LayerNorm(eps, self.dtype, name="layer_norm2")(x))
        x = constrain(x + self._drop_path(h, layer_idx), ACT)
        if feats is not None:
            feats = tuple(jnp.where(layer_idx == b, x, f) for b, f in zip(self.feat_blocks, feats))
        return (x, feats), None


class Encoder(nn.Module):
    cfg: Any
    dtype: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        """x: embeddings float[B,N,Dv] -> (last float[B,N,Dv], features float[B,N,K*Dv])."""
        cfg = self.cfg
        n, fbs = cfg.vit.num_layers, feature_blocks(cfg)
        block = maybe_remat(EncoderLayer, cfg.remat, cfg.scan_layers)
        if cfg.scan_layers:
            stack = scan_stack(block, n, in_axes=(0,))(cfg, self.dtype, fbs, self.deterministic,
                                                       name="layers")
            (x, feats), _ = stack((x, (x,) * len(fbs)), jnp.arange(n))  # start: embeddings
        else:
            feats = [x] * len(fbs)
            for i in range(n):
                (x, _), _ = block(cfg, self.dtype, fbs, self.deterministic,
                                  name=f"layers_{i}")((x, None), i)
                feats = [x if b == i else f for b, f in zip(fbs, feats)]
        return x, feats[0] if len(feats) == 1 else jnp.concatenate(feats, axis=-1)


POOLINGS = ("mean", "mean_max")
STEMS = ("patch", "conv")   # config.model.vit.stem; only 'patch' is SigLIP (exportable)


def stem_kind(cfg) -> str:
    """config.model.vit.stem ('patch' when absent: configs written before the conv stem)."""
    stem = cfg.vit.get("stem", "patch")
    if stem not in STEMS:
        raise ValueError(f"config.model.vit.stem={stem!r}, expected one of {STEMS}")
    return stem


def stem_depth(cfg) -> int:
    """config.model.vit.stem_depth: 3x3 convs per conv-stem stage (1 when absent)."""
    depth = int(cfg.vit.get("stem_depth", 1))
    if depth < 1:
        raise ValueError(f"config.model.vit.stem_depth={depth}: expected >= 1 (3x3 convs "
                         "per stem stage)")
    return depth


class VisionTransformer(nn.Module):
    config: Any          # config.model
    pooling: str = "mean"   # POOLINGS: how `pooled` summarises the tokens (stage 1 only)

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        """images float[B,S,S,C] -> (features float[B,N,Dv], pooled float[B,Dv]).
        `deterministic=False` turns on stochastic depth when config.model.vit.drop_path_rate
        > 0 (then `apply` needs rngs={'dropout': key}); otherwise it changes nothing."""
        cfg, v = self.config, self.config.vit
        dtype = compute_dtype(cfg)
        want = (v.image_size, v.image_size, v.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"VisionTransformer: images shape {images.shape}, expected "
                             f"[B,{want[0]},{want[1]},{want[2]}] (config.model.vit)")
        embed = _PatchEmbed if stem_kind(cfg) == "patch" else _ConvStemEmbed
        x = embed(cfg, dtype, name="embeddings")(images)               # float[B,N,Dv]
        x = constrain(x, ACT)
        last, feats = Encoder(cfg, dtype, deterministic, name="encoder")(x)
        post = LayerNorm(v.layer_norm_eps, dtype, name="post_layernorm")(last)
        post = post.astype(jnp.float32)                                # float[B,N,Dv]
        if self.pooling == "mean":
            pooled = post.mean(axis=1)                                  # float[B,Dv]
        elif self.pooling == "mean_max":
            pooled = jnp.concatenate([post.mean(axis=1), post.max(axis=1)], -1)  # [B,2Dv]
        else:
            raise ValueError(f"VisionTransformer: pooling={self.pooling!r}, expected one of "
                             f"{POOLINGS} (config.stage1.pooling)")
        return feats, pooled


class _PatchEmbed(nn.Module):
    """SiglipVisionEmbeddings: conv patch_embedding (HWIO, VALID, stride P) + position_embedding."""
    cfg: Any
    dtype: Any

    @nn.compact
    def __call__(self, images):
        v = self.cfg.vit
        p, d, n = v.patch_size, v.hidden_size, num_patches(self.cfg)
        fan_in = p * p * v.num_channels
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(fan_in ** -0.5), (None, None, "channels", "embed")),
            (p, p, v.num_channels, d), jnp.float32)
        y = jax.lax.conv_general_dilated(
            images.astype(self.dtype), kernel.astype(self.dtype), (p, p), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))                # float[B,S/P,S/P,Dv]
        return _add_bias_and_positions(self, y, n, self.dtype)


def _add_bias_and_positions(module, y, n, dtype):
    """y float[B,S/P,S/P,Dv] -> tokens float[B,N,Dv]: + `bias`, + `position_embedding`. The
    two params are created here, after the embedding kernel (both embeddings share them)."""
    d = y.shape[-1]
    bias = module.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
    pos = module.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("patch", "embed")), (n, d), jnp.float32)
    y = y + bias.astype(dtype)
    return y.reshape(y.shape[0], n, d) + pos.astype(dtype)[None]


def stem_widths(cfg) -> list[int]:
    """Channel widths of the conv stem's log2(P) stages: ..., Dv/4, Dv/2, Dv (at least 8)."""
    p, d = cfg.vit.patch_size, cfg.vit.hidden_size
    k = p.bit_length() - 1
    if p < 2 or 1 << k != p:
        raise ValueError(f"config.model.vit.patch_size={p}: stem='conv' needs a power of 2 "
                         f">= 2 (one stride-2 conv per halving)")
    return [max(d >> (k - 1 - i), 8) for i in range(k)]


class _ConvStemEmbed(nn.Module):
    """Convolutional stem in place of the patch conv (Xiao et al. 2021, "Early convolutions
    help transformers see better"; with stem_depth > 1 a small hybrid in the sense of the ViT
    paper). Stage i of log2(P): a 3x3 stride-2 conv (padding 1, as torch) to width
    stem_widths[i], LayerNorm over channels, GELU; then stem_depth - 1 residual units
    y + GELU(LN(conv3x3(y))) at that resolution. A 1x1 conv to Dv and the learned position
    embeddings close it: the same N = (S/P)^2 tokens as the patch conv, so everything after
    the embeddings is unchanged.

    Why: a linear 8x8 patch embedding has no locality prior inside the patch; in a few epochs
    of wafer maps the small convs learn thin scratches and small blobs much faster (README).
    It is not SigLIP, so `export/to_hf` refuses a model built with it (stage-1 / JAX only).
    Params: stem_{i}_kernel float[3,3,Cin,W], stem_{i}_norm; unit j >= 1: stem_{i}_{j}_kernel,
    stem_{i}_{j}_norm; kernel float[1,1,W,Dv], bias, position_embedding (as the patch conv)."""
    cfg: Any
    dtype: Any

    @nn.compact
    def __call__(self, images):                               # images float[B,S,S,C]
        v = self.cfg.vit
        d, n, depth = v.hidden_size, num_patches(self.cfg), stem_depth(self.cfg)
        widths = stem_widths(self.cfg)

        def conv_norm_gelu(y, w, stride, name):
            kernel = self.param(f"{name}_kernel", nn.with_logical_partitioning(
                nn.initializers.normal((9 * y.shape[-1]) ** -0.5), (None, None, None, None)),
                (3, 3, y.shape[-1], w), jnp.float32)
            y = jax.lax.conv_general_dilated(
                y, kernel.astype(self.dtype), (stride, stride), ((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jax.nn.gelu(LayerNorm(v.layer_norm_eps, self.dtype, name=f"{name}_norm")(y))

        y = images.astype(self.dtype)
        for i, w in enumerate(widths):
            y = conv_norm_gelu(y, w, 2, f"stem_{i}")                    # float[B,h/2,h/2,w]
            for j in range(1, depth):
                y = y + conv_norm_gelu(y, w, 1, f"stem_{i}_{j}")
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(widths[-1] ** -0.5), (None, None, "channels", "embed")),
            (1, 1, widths[-1], d), jnp.float32)
        y = jnp.einsum("bhwc,cd->bhwd", y, kernel[0, 0].astype(self.dtype))  # [B,S/P,S/P,Dv]
        return _add_bias_and_positions(self, y, n, self.dtype)
