"""Batched generation with the KV cache: prefill once, then one token per step.

    gen = Generator(model_cfg, params)                       # params: plain (merged) WamGLM params
    outs = gen.generate(images float[B,S,S,3], prompts list[list[int]],
                        GenerationConfig(max_new_tokens=64, stop_tokens=(eos,)))
    # -> list of B token lists (the stop token and everything after it removed)

Static shapes: prompts are left-padded to a power-of-two bucket P (>= 16), the cache holds
P + bucket(max_new_tokens) slots, and the decode loop is a `jax.lax.while_loop` inside one jit;
so a new prompt length or a new max_new_tokens below the bucket does not recompile. Passing
`stream=fn` runs the same jitted step from a Python loop and calls fn(int32[B] tokens, step)
after every step (used by the chat for streaming; one step per call, still no recompiles).

Padding: `generate_padded(images, tokens, mask, ...)` accepts any left/right/mixed padding:
the first token is chosen from the logits at each row's last real position, and the decoded
tokens get positions mask.sum() + step (the decoder's cache ignores pad slots).
Rows that hit a stop token keep running (static batch) but emit `pad_id` afterwards.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wamglm_jax.inference.sampling import bucket, choose
from wamglm_jax.models.wamglm import WamGLM, check_image_tokens, init_cache


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0          # <= 0: greedy
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0
    seed: int = 0


class Generator:
    """Holds the model and params; compiles prefill/decode once per (batch, bucket) shape."""

    def __init__(self, model_cfg, params, *, min_bucket: int = 16):
        self.cfg = model_cfg
        self.model = WamGLM(model_cfg)
        self.params = nn.unbox(params)
        self.min_bucket = min_bucket
        self._prefill = jax.jit(self._prefill_impl, static_argnums=(4,))
        self._loop = jax.jit(self._loop_impl, static_argnums=(4, 5, 6))
        self._step = jax.jit(self._step_impl, static_argnums=(3, 4, 5))

    # ---- jitted pieces ------------------------------------------------------------------
    def _prefill_impl(self, params, images, tokens, mask, cache_len):
        """-> (logits float32[B,V] at each row's last real token, cache, next positions int32[B])."""
        v = {"params": params}
        img = self.model.apply(v, images, method=WamGLM.encode_images)           # float[B,N,D]
        cache = init_cache(self.cfg, batch=tokens.shape[0], max_len=cache_len)
        logits, cache = self.model.apply(v, img, tokens, mask, cache, method=WamGLM.prefill)
        t = tokens.shape[1]
        last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)                          # int[B]
        first = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]    # float[B,V]
        return first, cache, mask.sum(axis=1).astype(jnp.int32)

    def _step_impl(self, params, carry, stop, temperature, top_p, pad_id):
        """Choose one token per row from carry['logits'], then run it through the decoder."""
        rng, sub = jax.random.split(carry["rng"])
        tok = choose(carry["logits"], sub, temperature, top_p)                    # int32[B]
        tok = jnp.where(carry["done"], pad_id, tok)
        done = carry["done"] | jnp.isin(tok, stop)
        logits, cache = self.model.apply({"params": params}, tok[:, None],
                                         carry["pos"][:, None], carry["cache"],
                                         method=WamGLM.decode_step)
        out = carry["out"].at[:, carry["i"]].set(tok)
        return dict(i=carry["i"] + 1, out=out, done=done, cache=cache, logits=logits[:, 0],
                    pos=carry["pos"] + 1, rng=rng), tok

    def _loop_impl(self, params, carry, stop, max_new, temperature, top_p, pad_id):
        def cond(c):
            return (c["i"] < max_new) & ~jnp.all(c["done"])

        def body(c):
            return self._step_impl(params, c, stop, temperature, top_p, pad_id)[0]

        return jax.lax.while_loop(cond, body, carry)

    # ---- public API ---------------------------------------------------------------------
    def generate(self, images, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                 stream: Callable[[np.ndarray, int], None] | None = None) -> list[list[int]]:
        """Left-pads `prompts` (token id lists, each with the N image tokens) and generates."""
        if len(prompts) == 0:
            raise ValueError("generate: no prompts")
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise ValueError("generate: empty prompt")
        p_len = bucket(max(lens), self.min_bucket)
        tokens = np.full((len(prompts), p_len), gen.pad_id, np.int32)
        mask = np.zeros((len(prompts), p_len), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, p_len - len(p):] = p
            mask[b, p_len - len(p):] = 1
        return self.generate_padded(images, tokens, mask, gen, stream)

    def generate_padded(self, images, tokens, mask, gen: GenerationConfig,
                        stream: Callable[[np.ndarray, int], None] | None = None):
        """tokens/mask int32[B,T] with any padding (T should already be bucketed)."""
        tokens = np.asarray(tokens, np.int32)
        mask = np.asarray(mask, np.int32)
        if tokens.shape != mask.shape or tokens.ndim != 2:
            raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be int[B,T]")
        if not mask.any(axis=1).all():
            raise ValueError("generate: a row of the attention mask has no real token")
        check_image_tokens(np.where(mask > 0, tokens, gen.pad_id), self.cfg)
        images = jnp.asarray(images, jnp.float32)
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {tokens.shape[0]} prompts")
        if gen.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {gen.max_new_tokens}")
        new_cap = bucket(gen.max_new_tokens, self.min_bucket)
        cache_len = tokens.shape[1] + new_cap
        logits, cache, pos = self._prefill(self.params, images, tokens, mask, cache_len)
        b = tokens.shape[0]
        carry = dict(i=jnp.zeros((), jnp.int32), out=jnp.full((b, new_cap), gen.pad_id, jnp.int32),
                     done=jnp.zeros((b,), bool), cache=cache, logits=logits, pos=pos,
                     rng=jax.random.key(gen.seed))
        stop = jnp.asarray(list(gen.stop_tokens) or [-1], jnp.int32)
        statics = (float(gen.temperature), float(gen.top_p), int(gen.pad_id))
        if stream is None:
            carry = self._loop(self.params, carry, stop, jnp.int32(gen.max_new_tokens), *statics)
            steps = int(carry["i"])
        else:
            steps = 0
            while steps < gen.max_new_tokens:
                carry, tok = self._step(self.params, carry, stop, *statics)
                steps += 1
                stream(np.asarray(tok), steps - 1)
                if bool(jnp.all(carry["done"])):
                    break
        out = np.asarray(carry["out"])[:, :steps]
        stops = set(gen.stop_tokens)
        results = []
        for row in out:
            toks = []
            for t in row.tolist():
                if t in stops:
                    break
                toks.append(t)
            results.append(toks)
        return results
