"""Llama-compatible decoder LM (HF `LlamaForCausalLM`) with an explicit KV cache.

Architecture: embed_tokens -> num_layers x [input_layernorm (RMSNorm) -> self_attn (GQA,
split-half RoPE `rotate_half`, theta = lm.rope_theta, scale head_dim**-0.5, no biases) ->
residual -> post_attention_layernorm -> SwiGLU mlp (gate/up/down, no bias) -> residual]
-> norm -> lm_head (or the tied embedding matrix). Causal mask over the whole sequence, with
a key padding mask.

Full forward (training):
    logits = Decoder(cfg).apply({'params': p}, tokens, attention_mask=mask)
    # or inputs_embeds=float[B,T,D] instead of tokens (image splicing); logits float32[B,T,V].
    positions default to cumsum(attention_mask) - 1 (clipped at 0), i.e. 0,1,2,... over the real
    tokens of each row; this equals arange(T) for right padding and no padding (what HF uses).

KV cache (explicit pytree, no flax 'cache' collection, so every call is a pure function):
    cache = init_cache(cfg, batch=B, max_len=L)
        {'k','v': float[num_layers,B,L,Hkv,hd] (compute dtype), 'valid': bool[B,L],
         'index': int32[] = next slot to write, 'pos': int32[B] = next position per row}
    Prefill a prompt of T <= L tokens (left- or right-padded, mask int32[B,T]):
        logits, cache = Decoder(cfg).apply(vars, tokens, attention_mask=mask, cache=cache)
        # writes slots [index, index+T), index += T. Default positions with a cache:
        # cache['pos'][b] + cumsum(mask[b]) - 1 (clipped), so a prompt may be fed in chunks.
    Decode one token per row:
        logits, cache = Decoder(cfg).apply(vars, next_tok int32[B,1], cache=cache)
        # positions default to cache['pos'] (= number of real tokens so far in row b); an
        # explicit positions=int32[B,1] is also accepted (the generator passes
        # mask.sum(1) + step, which is the same number). cache['pos'] becomes
        # max(pos, 1 + largest position given to a real token of the chunk).
    Each query at slot s attends to cached slots <= s whose `valid` bit is set, so pad slots
    (anywhere: left pads, right pads between a short prompt and its continuation) are never
    attended; RoPE uses the explicit positions, so relative distances stay exact.
    The caller must keep index + T <= L (under jit the slot index is clamped silently).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wamglm_jax.models.layers import (DenseND, RMSNorm, compute_dtype, constrain, maybe_remat,
                                      scan_stack)

ACT = ("batch", "length", "act_embed")
NEG = jnp.finfo(jnp.float32).min


def validate_lm(cfg):
    lm = cfg.lm
    if lm.num_heads % lm.num_kv_heads:
        raise ValueError(f"config.model.lm.num_heads={lm.num_heads} is not a multiple of "
                         f"num_kv_heads={lm.num_kv_heads}")
    if lm.head_dim % 2:
        raise ValueError(f"config.model.lm.head_dim={lm.head_dim} must be even (split-half RoPE "
                         "rotates two halves of each head)")


def init_cache(cfg, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache for config.model `cfg` (see the module docstring)."""
    lm = cfg.lm
    dtype = dtype or compute_dtype(cfg)
    shape = (lm.num_layers, batch, max_len, lm.num_kv_heads, lm.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                pos=jnp.zeros((batch,), jnp.int32))


def default_positions(attention_mask):
    """int[B,T] mask -> int32[B,T] positions: cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """HF Llama RoPE tables: int[B,T] -> (cos, sin) float32[B,T,hd] (halves duplicated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # float[B,T,hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x float[B,T,H,hd]; split-half rotation (`rotate_half`), computed in fp32."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None] + rot * sin[:, :, None]).astype(x.dtype)


class LlamaAttention(nn.Module):
    cfg: Any
    dtype: Any

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, index):
        lm = self.cfg.lm
        h, kvh, hd = lm.num_heads, lm.num_kv_heads, lm.head_dim
        q = DenseND((h, hd), ("embed", "heads", "kv"), dtype=self.dtype, name="q_proj")(x)
        k = DenseND((kvh, hd), ("embed", "kv_heads", "kv"), dtype=self.dtype, name="k_proj")(x)
        v = DenseND((kvh, hd), ("embed", "kv_heads", "kv"), dtype=self.dtype, name="v_proj")(x)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "kv"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "kv"))
        if layer_cache is not None:          # write this chunk at `index`, attend to all slots
            ck = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                              (0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                              (0, index, 0, 0))
            ck = constrain(ck, ("batch", "length", "kv_heads", "kv"))
            cv = constrain(cv, ("batch", "length", "kv_heads", "kv"))
            layer_cache = dict(k=ck, v=cv)
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)
        b, t = q.shape[:2]
        qg = q.reshape(b, t, kvh, h // kvh, hd)                           # float[B,T,Hkv,G,hd]
        s = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * hd ** -0.5
        s = jnp.where(mask[:, None, None], s, NEG)                        # mask bool[B,T,S]
        p = jax.nn.softmax(s, axis=-1).astype(self.dtype)
        o = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h, hd)
        o = constrain(o, ("batch", "length", "heads", "kv"))
        out = DenseND((lm.hidden_size,), ("heads", "kv", "embed"), in_dims=2, dtype=self.dtype,
                      name="o_proj")(o)
        return out, layer_cache


class LlamaMLP(nn.Module):
    cfg: Any
    dtype: Any

    @nn.compact
    def __call__(self, x):
        lm = self.cfg.lm
        dense = lambda f, ax, name: DenseND((f,), ax, dtype=self.dtype, name=name)
        g = dense(lm.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        u = dense(lm.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        hidden = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
        return dense(lm.hidden_size, ("mlp", "embed"), "down_proj")(hidden)


class DecoderLayer(nn.Module):
    """Scan-compatible: (x, layer_cache, cos, sin, mask, index) -> (x, new_layer_cache)."""
    cfg: Any
    dtype: Any

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, index):
        eps = self.cfg.lm.rms_norm_eps
        h, layer_cache = LlamaAttention(self.cfg, self.dtype, name="self_attn")(
            RMSNorm(eps, self.dtype, name="input_layernorm")(x), layer_cache, cos, sin, mask,
            index)
        x = constrain(x + h, ACT)
        h = LlamaMLP(self.cfg, self.dtype, name="mlp")(
            RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x))
        return constrain(x + h, ACT), layer_cache


class Decoder(nn.Module):
    config: Any          # config.model

    def setup(self):
        cfg = self.config
        validate_lm(cfg)
        lm = cfg.lm
        self.dtype = compute_dtype(cfg)
        self.embed_tokens = nn.Embed(
            lm.vocab_size, lm.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        block = maybe_remat(DecoderLayer, cfg.remat, cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = scan_stack(block, lm.num_layers, in_axes=(
                0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast))(cfg, self.dtype)
        else:
            self.layers = [block(cfg, self.dtype) for _ in range(lm.num_layers)]
        self.norm = RMSNorm(lm.rms_norm_eps, self.dtype)
        if not lm.tie_embeddings:
            self.lm_head = DenseND((lm.vocab_size,), ("embed", "vocab"), dtype=self.dtype)

    def embed(self, tokens):
        """int32[B,T] -> float[B,T,D] token embeddings (compute dtype)."""
        # Gather from a table whose embed (FSDP) dim is all-gathered first: gathering from an
        # embed-sharded table forces XLA into an involuntary full rematerialisation.
        table = nn.with_logical_constraint(self.embed_tokens.embedding, ("vocab", None))
        return constrain(jnp.take(table, tokens, axis=0).astype(self.dtype), ACT)

    def __call__(self, tokens=None, attention_mask=None, positions=None, cache=None,
                 inputs_embeds=None):
        """tokens int32[B,T] or inputs_embeds float[B,T,D]; attention_mask int[B,T] (1 = real,
        default all ones); positions int32[B,T]. Returns logits float32[B,T,V], or
        (logits, new_cache) when `cache` is given."""
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("Decoder: pass exactly one of tokens / inputs_embeds")
        x = self.embed(tokens) if tokens is not None else constrain(
            inputs_embeds.astype(self.dtype), ACT)
        hidden, new_cache = self.hidden_states(x, attention_mask, positions, cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def hidden_states(self, x, attention_mask=None, positions=None, cache=None):
        """Blocks + final norm on input embeddings x float[B,T,D] -> (float[B,T,D], cache)."""
        lm = self.config.lm
        b, t = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
            if cache is not None:
                positions = positions + cache["pos"][:, None]
        cos, sin = rope_cos_sin(positions, lm.head_dim, lm.rope_theta)
        valid = attention_mask.astype(bool)
        if cache is None:
            index, layer_caches = None, None
            q_slot = jnp.arange(t)
        else:
            index = cache["index"]
            max_len = cache["valid"].shape[1]
            if not isinstance(index, jax.core.Tracer) and int(index) + t > max_len:
                raise ValueError(f"KV cache overflow: {int(index)} slots used + {t} new tokens "
                                 f"> max_len={max_len} (init_cache(..., max_len=...))")
            valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
            layer_caches = dict(k=cache["k"], v=cache["v"])
            q_slot = index + jnp.arange(t)
        k_slot = jnp.arange(valid.shape[1])
        mask = (k_slot[None, :] <= q_slot[:, None])[None] & valid[:, None, :]  # bool[B,T,S]

        if self.config.scan_layers:
            x, layer_caches = self.layers(x, layer_caches, cos, sin, mask, index)
        else:
            for i, layer in enumerate(self.layers):
                lc = None if layer_caches is None else jax.tree.map(lambda a: a[i], layer_caches)
                x, lc = layer(x, lc, cos, sin, mask, index)
                if lc is not None:      # in-place update of layer i (with a donated cache)
                    layer_caches = jax.tree.map(lambda a, n: a.at[i].set(n), layer_caches, lc)
        x = self.norm(x)
        new_cache = None
        if cache is not None:
            chunk_valid = attention_mask.astype(bool)
            last = jnp.max(jnp.where(chunk_valid, positions + 1, 0), axis=1)
            new_cache = dict(k=layer_caches["k"], v=layer_caches["v"], valid=valid,
                             index=index + t,
                             pos=jnp.maximum(cache["pos"], last).astype(jnp.int32))
        return x, new_cache

    def logits(self, hidden):
        """float[B,T,D] -> float32[B,T,V]."""
        if self.config.lm.tie_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))
