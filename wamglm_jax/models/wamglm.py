"""WamGLM: SigLIP-style ViT -> LLaVA projector -> Llama-style decoder (HF Llava layout).

Params: {'vision': VisionTransformer, 'projector': Projector, 'lm': Decoder}.

Image tokens: the tokenizer expands each `<image>` into N = num_image_tokens(cfg) = (S/P)^2
copies of cfg.image_token_id (as HF's Llava processor does). Every row of `tokens` must hold
exactly N of them (one image per row); the model replaces them, in order, by the N projected
patch embeddings of that row's image (a cumsum + gather, jit-friendly). Llava semantics: a plain
causal mask over the whole sequence plus the padding mask.

Checking the placeholder count: when `tokens` is concrete (numpy / non-traced jax array) the
model checks it eagerly and raises `ImageTokenError`. Under jit the count is traced and cannot
be checked, so callers MUST run `check_image_tokens(tokens, cfg)` on the host batch before
calling a jitted step (the data pipeline / train step / generator do this).

Training / scoring:
    logits = WamGLM(cfg).apply({'params': p}, images, tokens, attention_mask)   # float32[B,T,V]

Inference pieces (for wamglm_jax.inference; all pure functions of (params, inputs)):
    img = model.apply(v, images, method=WamGLM.encode_images)               # float[B,N,D]
    cache = decoder.init_cache(cfg, batch=B, max_len=L)
    logits, cache = model.apply(v, img, tokens, attention_mask, cache, method=WamGLM.prefill)
    logits, cache = model.apply(v, tok int32[B,1], pos int32[B,1] or None, cache,
                                method=WamGLM.decode_step)
  prefill positions default to cumsum(mask)-1, so the first decoded token of row b has position
  attention_mask[b].sum(), then +1 per step; with pos=None decode_step uses cache['pos'], which
  tracks exactly that. See models/decoder.py for the cache layout.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wamglm_jax.models.decoder import Decoder, init_cache  # noqa: F401  (re-exported)
from wamglm_jax.models.projector import Projector
from wamglm_jax.models.vit import VisionTransformer, num_patches


class ImageTokenError(ValueError):
    """A row of tokens does not hold exactly N image placeholder tokens."""


def num_image_tokens(cfg) -> int:
    """N = (image_size / patch_size)^2 image tokens per image for config.model `cfg`."""
    return num_patches(cfg)


def check_image_tokens(tokens, cfg) -> None:
    """Raise ImageTokenError unless every row of int[B,T] `tokens` holds exactly N copies of
    cfg.image_token_id. Call on host (numpy) batches before a jitted step."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ImageTokenError(f"tokens must be int[B,T], got shape {tokens.shape}")
    n = num_image_tokens(cfg)
    counts = (tokens == cfg.image_token_id).sum(axis=1)
    bad = np.nonzero(counts != n)[0]
    if bad.size:
        rows = ", ".join(f"row {i}: {counts[i]}" for i in bad[:8])
        raise ImageTokenError(
            f"each row must contain exactly N={n} image tokens (id {cfg.image_token_id} = "
            f"config.model.image_token_id; N = (vit.image_size/vit.patch_size)^2); found {rows}"
            + (" ..." if bad.size > 8 else ""))


def splice_image_embeddings(token_embeds, image_embeds, tokens, image_token_id: int):
    """Put image_embeds float[B,N,D] at the image-token positions of token_embeds float[B,T,D].

    The j-th image token of row b (in sequence order) gets image_embeds[b, j]."""
    is_img = tokens == image_token_id                                  # bool[B,T]
    n = image_embeds.shape[1]
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, n - 1)           # int[B,T]
    gathered = jnp.take_along_axis(image_embeds, idx[..., None], axis=1)  # float[B,T,D]
    return jnp.where(is_img[..., None], gathered.astype(token_embeds.dtype), token_embeds)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class WamGLM(nn.Module):
    config: Any          # config.model

    def setup(self):
        tid, v = self.config.image_token_id, self.config.lm.vocab_size
        if not 0 <= tid < v:
            raise ValueError(f"config.model.image_token_id={tid} is outside the vocabulary "
                             f"[0, lm.vocab_size={v})")
        self.vision = VisionTransformer(self.config)
        self.projector = Projector(self.config)
        self.lm = Decoder(self.config)

    def __call__(self, images, tokens, attention_mask, positions=None):
        """images float[B,S,S,3], tokens int32[B,T], attention_mask int32[B,T] ->
        logits float32[B,T,V]. images=None: text only (no image tokens allowed).
        positions int32[B,T] default to cumsum(attention_mask) - 1 (clipped at 0)."""
        embeds = self.embed_inputs(images, tokens)
        hidden, _ = self.lm.hidden_states(embeds, attention_mask, positions)
        return self.lm.logits(hidden)

    def encode_images(self, images):
        """float[B,S,S,3] -> projected image embeddings float[B,N,D] (compute dtype)."""
        features, _ = self.vision(images)
        return self.projector(features)

    def embed_inputs(self, images, tokens, image_embeds=None):
        """LM input embeddings float[B,T,D]: token embeddings with the image embeddings spliced
        in. Give `images` (encoded here) or precomputed `image_embeds` (or neither: text only)."""
        cfg = self.config
        if _is_concrete(tokens):
            if images is None and image_embeds is None:
                if np.any(np.asarray(tokens) == cfg.image_token_id):
                    raise ImageTokenError("tokens contain image tokens but no images were given")
            else:
                check_image_tokens(tokens, cfg)
        embeds = self.lm.embed(tokens)
        if images is not None:
            image_embeds = self.encode_images(images)
        if image_embeds is None:
            return embeds
        if image_embeds.shape[0] != tokens.shape[0]:
            raise ValueError(f"batch mismatch: {image_embeds.shape[0]} images for "
                             f"{tokens.shape[0]} token rows")
        return splice_image_embeddings(embeds, image_embeds, tokens, cfg.image_token_id)

    def prefill(self, image_embeds, tokens, attention_mask, cache, positions=None):
        """Run the prompt through the LM into `cache`. image_embeds float[B,N,D] (from
        encode_images) or None; returns (logits float32[B,T,V], cache)."""
        embeds = self.embed_inputs(None, tokens, image_embeds=image_embeds)
        hidden, cache = self.lm.hidden_states(embeds, attention_mask, positions, cache)
        return self.lm.logits(hidden), cache

    def decode_step(self, tokens, positions, cache, attention_mask=None):
        """One (or a few) new text tokens int32[B,t] at positions int32[B,t] (None: continue
        from cache['pos']) -> (logits float32[B,t,V], cache)."""
        hidden, cache = self.lm.hidden_states(self.lm.embed(tokens), attention_mask, positions,
                                              cache)
        return self.lm.logits(hidden), cache
