"""Presets: each builds (shape-only, never materialised) and its parameter count matches a
formula written here from the config fields alone."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import presets
from wamglm_jax.models import WamGLM


def formula(cfg):
    """Parameter count of a WamGLM from config.model fields (independent of the model code)."""
    v, lm = cfg.vit, cfg.lm
    dv, fv, c, p = v.hidden_size, v.intermediate_size, v.num_channels, v.patch_size
    n = (v.image_size // p) ** 2
    if v.get("stem", "patch") == "conv":       # stages of widths ..., dv/4, dv/2, dv
        k = int(math.log2(p))
        widths = [max(dv // 2 ** (k - 1 - i), 8) for i in range(k)]
        ins = [c] + widths[:-1]
        vit = sum(9 * a * w + 2 * w for a, w in zip(ins, widths))    # 3x3/2 conv + LayerNorm
        vit += (v.stem_depth - 1) * sum(9 * w * w + 2 * w for w in widths)  # residual units
        vit += widths[-1] * dv + dv             # 1x1 conv + bias
    else:
        vit = (p * p * c * dv + dv)             # patch conv + bias
    vit += n * dv                               # position embeddings
    vit += v.num_layers * (
        2 * 2 * dv                              # layer_norm1/2 weight+bias
        + 4 * (dv * dv + dv)                    # q, k, v, out projections with bias
        + (dv * fv + fv) + (fv * dv + dv))      # fc1, fc2 with bias
    vit += 2 * dv                               # post_layernorm
    d = lm.hidden_size
    proj = (dv * d + d) + (d * d + d)
    q = d * lm.num_heads * lm.head_dim
    kv = 2 * d * lm.num_kv_heads * lm.head_dim
    o = lm.num_heads * lm.head_dim * d
    llm = lm.vocab_size * d
    llm += lm.num_layers * (q + kv + o + 3 * d * lm.intermediate_size + 2 * d)
    llm += d                                    # final norm
    llm += 0 if lm.tie_embeddings else d * lm.vocab_size
    return dict(vision=vit, projector=proj, lm=llm)


def abstract_params(cfg):
    s, n = cfg.vit.image_size, (cfg.vit.image_size // cfg.vit.patch_size) ** 2
    images = jax.ShapeDtypeStruct((1, s, s, cfg.vit.num_channels), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, n + 1), jnp.int32)
    return jax.eval_shape(lambda i, t: nn.unbox(WamGLM(cfg).init(
        jax.random.key(0), i, t, jnp.ones(t.shape, jnp.int32))["params"]), images, tokens)


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_param_count_matches_formula(name):
    cfg = presets.model_config(name)
    shapes = abstract_params(cfg)
    want = formula(cfg)
    for tower in ("vision", "projector", "lm"):
        assert count(shapes[tower]) == want[tower], (name, tower)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))   # fp32 params


@pytest.mark.parametrize("depth", [1, 3])
def test_conv_stem_param_count(depth):
    cfg = presets.model_config("small")                 # P=8: three stem stages
    cfg.vit.update(stem="conv", stem_depth=depth)
    shapes = abstract_params(cfg)
    assert count(shapes["vision"]) == formula(cfg)["vision"]


@pytest.mark.parametrize("scan", [False, True])
def test_tied_and_scan_counts(scan):
    cfg = presets.model_config("tiny")
    cfg.lm.tie_embeddings, cfg.scan_layers = True, scan
    shapes = abstract_params(cfg)
    assert count(shapes) == sum(formula(cfg).values())
    assert "lm_head" not in shapes["lm"]


def test_preset_sizes():
    pod = formula(presets.model_config("pod7b"))
    assert 6.5e9 < pod["lm"] < 7.5e9                    # 7B-class LM
    assert 3.5e8 < pod["vision"] < 4.5e8                # 400M-class ViT
    tiny = formula(presets.model_config("tiny"))
    assert sum(tiny.values()) < 1e6                     # CPU quickstart size
    for name in presets.PRESETS:
        cfg = presets.model_config(name)
        assert cfg.vit.image_size % cfg.vit.patch_size == 0, name
        assert cfg.vit.hidden_size % cfg.vit.num_heads == 0, name
        assert cfg.lm.num_heads % cfg.lm.num_kv_heads == 0, name
        assert cfg.lm.head_dim % 2 == 0, name
        assert cfg.image_token_id < cfg.lm.vocab_size, name
        n = (cfg.vit.image_size // cfg.vit.patch_size) ** 2
        assert cfg.lm.max_seq_len > n, name             # room for text after the image


def test_get_config_and_unknown_name():
    assert presets.get_config("small").model.lm.hidden_size == \
        presets.model_config("small").lm.hidden_size
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        presets.model_config("huge")
