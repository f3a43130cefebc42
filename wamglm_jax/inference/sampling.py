"""Next-token choice from logits: greedy, temperature, nucleus (top-p). Pure, jit-friendly."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_filter(logits, top_p: float):
    """Sets logits outside the smallest set whose probability mass >= top_p to -inf.

    logits float[B,V]. The most likely token is always kept. top_p >= 1 is a no-op.
    """
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)                                # int[B,V]
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                     # mass of better tokens
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def choose(logits, rng, temperature: float, top_p: float):
    """int32[B] next tokens. temperature <= 0 -> greedy (rng unused)."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_p_filter(logits / temperature, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): static shapes so jit compiles once per bucket."""
    b = minimum
    while b < n:
        b *= 2
    return b
