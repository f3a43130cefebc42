"""Optimizer from the config: AdamW, warm-up + cosine schedule, gradient clipping, freezing.

Config section (e.g. `config.stage1.optimizer`):
  learning_rate   peak learning rate
  warmup_steps    int, or warmup_fraction (of num_steps) when warmup_steps < 0
  end_lr_fraction final lr = learning_rate * end_lr_fraction
  weight_decay, b1, b2, eps
  grad_clip_norm  0 disables clipping
  freeze          tuple of regexes on '/'-joined param paths (e.g. 'vision/.*'): frozen params
                  get zero updates and no optimizer moments
  trainable       tuple of regexes; when non-empty, only matching params train
                  (applied before `freeze`)
Weight decay applies to params with ndim >= 2 (kernels, embeddings), not biases or norms.
"""
import re
from typing import Sequence

import jax
import ml_collections
import optax
from flax import traverse_util


def default_optimizer_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=-1, warmup_fraction=0.02, end_lr_fraction=0.01,
        weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
        freeze=(), trainable=()))
    cfg.update(overrides)
    return cfg


def path_strings(params) -> dict:
    """{flat key tuple: 'a/b/kernel'} for every leaf of a nested params dict."""
    flat = traverse_util.flatten_dict(params)
    return {k: "/".join(str(p) for p in k) for k in flat}


def trainable_mask(params, freeze: Sequence[str] = (), trainable: Sequence[str] = ()):
    """Pytree of bools like params: True = trained. Patterns use `re.search` on the path, so
    'vision' matches every path containing it; anchor with ^ when needed."""
    for pattern in tuple(freeze) + tuple(trainable):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"optimizer.freeze/trainable: bad regex {pattern!r}: {e}") from e
    flat = {}
    for key, path in path_strings(params).items():
        train = (not trainable) or any(re.search(p, path) for p in trainable)
        if any(re.search(p, path) for p in freeze):
            train = False
        flat[key] = train
    return traverse_util.unflatten_dict(flat)


def learning_rate_schedule(cfg, num_steps: int) -> optax.Schedule:
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_fraction * num_steps))
    warmup = min(max(warmup, 0), max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)


def make_optimizer(cfg, num_steps: int, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (tx, schedule). `params` (or abstract params) sets the freezing/decay masks."""
    schedule = learning_rate_schedule(cfg, num_steps)
    decay_mask = jax.tree.map(lambda p: len(p.shape) >= 2, params)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    mask = trainable_mask(params, cfg.freeze, cfg.trainable)
    if all(jax.tree.leaves(mask)):
        tx = optax.chain(*chain, adamw)
    else:
        if not any(jax.tree.leaves(mask)):
            raise ValueError("optimizer.freeze/trainable leave no trainable parameter")
        labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
        # Clipping is applied to the trained subset only (frozen grads never count).
        tx = optax.multi_transform(
            {"train": optax.chain(*chain, adamw), "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
