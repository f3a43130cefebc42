"""Model tests: KV cache vs full forward, causality, image splicing, scan vs unrolled, bf16."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import presets
from wamglm_jax.models import (Decoder, ImageTokenError, WamGLM, check_image_tokens, init_cache,
                               num_image_tokens)
from wamglm_jax.models.layers import stack_layers, unstack_layers
from wamglm_jax.models.vit import VisionTransformer


def small_cfg(**kw):
    cfg = presets.model_config("tiny")
    cfg.vit.image_size, cfg.vit.patch_size = 16, 4          # N = 16
    cfg.vit.num_layers, cfg.vit.feature_layer = 2, -2     # features = block 0 output
    cfg.lm.vocab_size, cfg.lm.num_layers = 97, 2
    for k, v in kw.items():
        obj = cfg
        *path, last = k.split(".")
        for p in path:
            obj = obj[p]
        obj[last] = v
    return cfg


def make_batch(cfg, b=3, t_text=7, seed=0):
    """Tokens with N image tokens after a 2-token prefix; random text elsewhere."""
    rng = np.random.default_rng(seed)
    n = num_image_tokens(cfg)
    t = n + t_text
    tokens = rng.integers(4, cfg.lm.vocab_size, (b, t)).astype(np.int32)
    tokens[:, 2:2 + n] = cfg.image_token_id
    images = rng.random((b, cfg.vit.image_size, cfg.vit.image_size, 3)).astype(np.float32)
    return images, tokens, np.ones((b, t), np.int32)


def init_model(cfg, seed=0):
    images, tokens, mask = make_batch(cfg)
    init = jax.jit(lambda k: nn.unbox(WamGLM(cfg).init(k, images, tokens, mask)["params"]))
    return init(jax.random.key(seed))


def jit_apply(model, method=None):
    """model.apply, jitted (tests run many small forwards; eager op-by-op is slow)."""
    return jax.jit(lambda v, *a: model.apply(v, *a, method=method))


@pytest.fixture(scope="module")
def cfg():
    return small_cfg()


@pytest.fixture(scope="module")
def params(cfg):
    return init_model(cfg)


# ----------------------------------------------------------------------------- decoder / cache

@pytest.fixture(scope="module")
def lm_cfg_params():
    cfg = small_cfg(**{"lm.tie_embeddings": True})
    return cfg, jax.jit(Decoder(cfg).init)(jax.random.key(0), np.zeros((1, 4), np.int32))


def test_kv_cache_matches_full_forward_with_padding(lm_cfg_params):
    cfg, p = lm_cfg_params
    dec = Decoder(cfg)
    rng = np.random.default_rng(1)
    b, t = 3, 9
    tokens = rng.integers(0, cfg.lm.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :3] = 0            # left-padded row
    mask[2, -2:] = 0           # right-padded row
    full = np.asarray(jax.jit(lambda p, t, m: dec.apply(p, t, attention_mask=m))(p, tokens, mask))
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)

    # 1) one token at a time from an empty cache (pads fed too, flagged invalid).
    step = jax.jit(lambda c, tok, m, ps: dec.apply(p, tok, attention_mask=m, positions=ps,
                                                   cache=c))
    cache = init_cache(cfg, b, max_len=16)
    for i in range(t):
        lg, cache = step(cache, tokens[:, i:i + 1], mask[:, i:i + 1], pos[:, i:i + 1])
        real = mask[:, i] == 1
        np.testing.assert_allclose(np.asarray(lg)[real, 0], full[real, i], atol=1e-5, rtol=0)
    assert int(cache["index"]) == t

    # 2) prefill in two chunks (default positions continue from cache['pos']), then decode
    #    the rest one by one.
    cache = init_cache(cfg, b, max_len=16)
    prefill = jax.jit(lambda c, t, m: dec.apply(p, t, attention_mask=m, cache=c))
    lg1, cache = prefill(cache, tokens[:, :3], mask[:, :3])
    lg2, cache = prefill(cache, tokens[:, 3:5], mask[:, 3:5])
    lg = np.concatenate([lg1, lg2], axis=1)
    real = mask[:, :5] == 1
    np.testing.assert_allclose(lg[real], full[:, :5][real], atol=1e-5, rtol=0)
    for i in range(5, t):
        lg, cache = step(cache, tokens[:, i:i + 1], mask[:, i:i + 1], pos[:, i:i + 1])
        real = mask[:, i] == 1
        np.testing.assert_allclose(np.asarray(lg)[real, 0], full[real, i], atol=1e-5, rtol=0)


def test_decode_after_padded_prompts_equals_unpadded_forward(lm_cfg_params):
    """A row decoded after a left- or right-padded prompt gives the logits of the same real
    tokens run alone without padding (pads invisible, positions exact)."""
    cfg, p = lm_cfg_params
    dec = Decoder(cfg)
    rng = np.random.default_rng(2)
    real_prompt = rng.integers(0, cfg.lm.vocab_size, 4).astype(np.int32)
    cont = rng.integers(0, cfg.lm.vocab_size, 3).astype(np.int32)
    alone = np.asarray(jax.jit(dec.apply)(p, np.concatenate([real_prompt, cont])[None]))[0]
    pad = 0
    prompts = np.array([[pad, pad] + list(real_prompt), list(real_prompt) + [pad, pad]],
                       np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
    cache = init_cache(cfg, 2, max_len=12)
    lg, cache = jax.jit(lambda c: dec.apply(p, prompts, attention_mask=mask, cache=c))(cache)
    np.testing.assert_allclose(np.asarray(lg)[0, -1], alone[3], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lg)[1, 3], alone[3], atol=1e-5, rtol=0)
    nxt = mask.sum(1).astype(np.int32)          # position of the first decoded token
    np.testing.assert_array_equal(cache["pos"], nxt)
    step = jax.jit(lambda c, tok, ps: dec.apply(p, tok, positions=ps, cache=c))
    step_auto = jax.jit(lambda c, tok: dec.apply(p, tok, cache=c))     # positions from cache
    for j, tok in enumerate(cont):
        tok2 = np.full((2, 1), tok, np.int32)
        if j % 2:
            lg, cache = step_auto(cache, tok2)
        else:
            lg, cache = step(cache, tok2, (nxt + j)[:, None])
        for r in range(2):
            np.testing.assert_allclose(np.asarray(lg)[r, 0], alone[4 + j], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache["pos"], nxt + len(cont))
    with pytest.raises(ValueError, match="KV cache overflow"):
        dec.apply(p, np.zeros((2, 4), np.int32), cache=cache)      # 9 + 4 > max_len 12


def test_causality(cfg, params):
    images, tokens, mask = make_batch(cfg, b=2)
    fwd = jit_apply(WamGLM(cfg))
    base = np.asarray(fwd({"params": params}, images, tokens, mask))
    n = num_image_tokens(cfg)
    for t in (n + 2, tokens.shape[1] - 1):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.lm.vocab_size
        changed[:, t] = np.where(changed[:, t] == cfg.image_token_id, 5, changed[:, t])
        out = np.asarray(fwd({"params": params}, images, changed, mask))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4


# ----------------------------------------------------------------------------- image splicing

def test_image_embeddings_land_at_placeholders(cfg, params):
    images, tokens, mask = make_batch(cfg, b=2)
    n = num_image_tokens(cfg)
    # Row 1: image tokens not contiguous and at a different offset.
    rng = np.random.default_rng(3)
    pos1 = np.sort(rng.choice(np.arange(1, tokens.shape[1]), n, replace=False))
    tokens[1] = np.where(tokens[1] == cfg.image_token_id, 9, tokens[1])
    tokens[1, pos1] = cfg.image_token_id
    model = WamGLM(cfg)
    v = {"params": params}
    img = np.asarray(jit_apply(model, WamGLM.encode_images)(v, images))      # [B,N,D]
    assert img.shape == (2, n, cfg.lm.hidden_size)
    table = np.asarray(params["lm"]["embed_tokens"]["embedding"])
    expect = table[tokens].copy()                                            # numpy oracle
    for b in range(2):
        j = 0
        for t in range(tokens.shape[1]):
            if tokens[b, t] == cfg.image_token_id:
                expect[b, t] = img[b, j]
                j += 1
    got = np.asarray(jit_apply(model, WamGLM.embed_inputs)(v, images, tokens))
    np.testing.assert_array_equal(got, expect)
    # The full forward is the decoder run on exactly these embeddings.
    logits = np.asarray(jit_apply(model)(v, images, tokens, mask))
    ref = np.asarray(jax.jit(lambda v, e, m: Decoder(cfg).apply(v, inputs_embeds=e,
                                                                attention_mask=m))(
        {"params": params["lm"]}, expect, mask))
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)


def test_wrong_placeholder_count_is_a_clear_error(cfg, params):
    images, tokens, mask = make_batch(cfg, b=2)
    bad = tokens.copy()
    bad[1, 2] = 5                                   # row 1 now has N-1 image tokens
    n = num_image_tokens(cfg)
    with pytest.raises(ImageTokenError, match=rf"exactly N={n}.*row 1: {n - 1}"):
        check_image_tokens(bad, cfg)
    with pytest.raises(ImageTokenError, match="row 1"):
        WamGLM(cfg).apply({"params": params}, images, bad, mask)
    check_image_tokens(tokens, cfg)                 # the good batch passes
    with pytest.raises(ImageTokenError, match="no images"):
        WamGLM(cfg).apply({"params": params}, None, tokens, mask)


# ----------------------------------------------------------------------------- scan / remat / bf16

def test_scan_equals_unrolled_and_remat(cfg, params):
    images, tokens, mask = make_batch(cfg, b=2)
    ref = np.asarray(jit_apply(WamGLM(cfg))({"params": params}, images, tokens, mask))
    stacked = stack_layers(params)
    assert "layers" in stacked["lm"] and "layers" in stacked["vision"]["encoder"]
    assert stacked["lm"]["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == cfg.lm.num_layers
    # Decoder gradients: scanned + remat "dots" vs unrolled without remat (ViT gradients with
    # scan + "full" remat: test_scan_vit_features_and_gradients).
    def loss(p, c):
        lg = Decoder(c).apply({"params": p}, tokens[:, -6:])
        return jax.nn.logsumexp(lg, -1).mean() - lg[..., 7].mean()
    g = jax.jit(jax.grad(lambda p: loss(p, cfg)))(params["lm"])
    dcfg = small_cfg(scan_layers=True, remat="dots")
    sg = unstack_layers(jax.jit(jax.grad(lambda p: loss(p, dcfg)))(stacked["lm"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g, sg)

    # Cached prefill + one decode step through the scanned stack match the unrolled model.
    caches = {}
    for c, prm in ((cfg, params), (small_cfg(scan_layers=True), stacked)):
        def run(v, img, tok, m, c=c):
            model = WamGLM(c)
            emb = model.apply(v, img, method=WamGLM.encode_images)
            cache = init_cache(c, tok.shape[0], max_len=tok.shape[1] + 2)
            lg, cache = model.apply(v, emb, tok, m, cache, method=WamGLM.prefill)
            lg2, cache = model.apply(v, tok[:, -1:], None, cache, method=WamGLM.decode_step)
            return lg, lg2, cache
        caches[c.scan_layers] = jax.jit(run)({"params": prm}, images, tokens, mask)
    np.testing.assert_allclose(caches[True][0], ref, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(caches[True]), jax.tree.leaves(caches[False])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # The scanned model's own init has the same tree as the stacked params; round trip works.
    scfg = small_cfg(scan_layers=True)
    shapes = jax.eval_shape(lambda: nn.unbox(WamGLM(scfg).init(
        jax.random.key(0), images, tokens, mask)["params"]))
    assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, shapes, stacked))
    back = unstack_layers(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, params))


def test_scan_vit_features_and_gradients(cfg, params):
    images, _, _ = make_batch(cfg, b=2)
    vit_p = params["vision"]
    feats, pooled = jax.jit(VisionTransformer(cfg).apply)({"params": vit_p}, images)
    scfg = small_cfg(scan_layers=True, remat="full")
    sfeats, spooled = jax.jit(VisionTransformer(scfg).apply)({"params": stack_layers(vit_p)},
                                                             images)
    np.testing.assert_allclose(sfeats, feats, atol=1e-5, rtol=0)
    np.testing.assert_allclose(spooled, pooled, atol=1e-5, rtol=0)
    # feature_layer=-2 really differs from the last block.
    lcfg = small_cfg(**{"vit.feature_layer": -1})
    last, _ = jax.jit(VisionTransformer(lcfg).apply)({"params": vit_p}, images)
    assert np.abs(np.asarray(last) - np.asarray(feats)).max() > 1e-3

    def loss(p, c):
        f, pl = VisionTransformer(c).apply({"params": p}, images)
        return (f ** 2).mean() + (pl ** 2).mean()
    g = jax.jit(jax.grad(lambda p: loss(p, cfg)))(vit_p)
    sg = unstack_layers(jax.jit(jax.grad(lambda p: loss(p, scfg)))(stack_layers(vit_p)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, sg)


@pytest.mark.parametrize("scan", [False, True])
def test_stochastic_depth_is_unchanged_by_remat(cfg, params, scan):
    """Training-mode stochastic depth draws the same masks, outputs and gradients whether the
    blocks are rematerialised or not (remat recomputes, it must not redraw)."""
    images, _, _ = make_batch(cfg, b=4)
    vit_p = stack_layers(params["vision"]) if scan else params["vision"]

    def loss(p, c):
        f, pl = VisionTransformer(c).apply({"params": p}, images, deterministic=False,
                                           rngs={"dropout": jax.random.key(7)})
        return (f ** 2).mean() + (pl ** 2).mean()
    out = {}
    for remat in ("none", "full", "dots"):
        c = small_cfg(scan_layers=scan, remat=remat, **{"vit.drop_path_rate": 0.5})
        out[remat] = jax.jit(jax.value_and_grad(lambda p, c=c: loss(p, c)))(vit_p)
    for remat in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(out[remat]), jax.tree.leaves(out["none"])):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    det = jax.jit(lambda p: loss(p, small_cfg(scan_layers=scan)))(vit_p)
    assert abs(float(out["none"][0]) - float(det)) > 1e-4    # the masks really dropped


def test_bf16_compute_is_close(cfg, params):
    images, tokens, mask = make_batch(cfg, b=2)
    ref = np.asarray(jit_apply(WamGLM(cfg))({"params": params}, images, tokens, mask))
    bcfg = small_cfg(dtype="bfloat16")
    out = jit_apply(WamGLM(bcfg))({"params": params}, images, tokens, mask)
    assert out.dtype == jnp.float32
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 0.05
    # Same argmax for most tokens.
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_bad_config_errors():
    for bad in (-5, (0, 3), (), "last", (0, 1.5), True):
        with pytest.raises(ValueError, match="config.model.vit.feature_layer="):
            VisionTransformer(small_cfg(**{"vit.feature_layer": bad})).init(
                jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        num_image_tokens(small_cfg(**{"vit.image_size": 18}))
    with pytest.raises(ValueError, match="num_kv_heads"):
        Decoder(small_cfg(**{"lm.num_kv_heads": 3})).init(jax.random.key(0),
                                                           np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="head_dim=15 must be even"):
        Decoder(small_cfg(**{"lm.head_dim": 15})).init(jax.random.key(0),
                                                        np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="image_token_id=97 is outside the vocabulary"):
        cfg = small_cfg(image_token_id=97)
        init_model(cfg)
    with pytest.raises(ValueError, match="remat='some'"):
        init_model(small_cfg(remat="some"))
    with pytest.raises(ValueError, match="dtype='float16'"):
        init_model(small_cfg(dtype="float16"))
    with pytest.raises(ValueError, match="images shape"):
        VisionTransformer(small_cfg()).init(jax.random.key(0), np.zeros((1, 8, 8, 3)))
