"""Parity with Hugging Face PyTorch models (the serving format): SigLIP vision, Llama, Llava.

Random torch models (every weight randomised, so biases and norm weights are exercised) are
mapped into JAX params with wamglm_jax/export/hf_weights.py; outputs must agree in fp32.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from configs import presets  # noqa: E402
from wamglm_jax.export import hf_weights  # noqa: E402
from wamglm_jax.models import Decoder, VisionTransformer, WamGLM, num_image_tokens  # noqa: E402

TOL = 1e-4


def cfg_for_parity(**kw):
    cfg = presets.model_config("tiny")
    cfg.vit.update(dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48,
                        num_layers=3, num_heads=4, layer_norm_eps=1e-6, feature_layer=-2))
    cfg.lm.update(dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_embeddings=False, max_seq_len=64))
    cfg.image_token_id = 5
    for k, v in kw.items():
        setattr(cfg, k, v) if "." not in k else cfg[k.split(".")[0]].__setattr__(
            k.split(".")[1], v)
    return cfg


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise * 2)
    return model.eval()


def hf_models(cfg):
    kw = hf_weights.hf_config_kwargs(cfg)
    vc = transformers.SiglipVisionConfig(**kw["vision"])
    tc = transformers.LlamaConfig(**kw["text"])
    return vc, tc, kw


def test_siglip_vision_parity():
    cfg = cfg_for_parity()
    vc, _, _ = hf_models(cfg)
    vc._attn_implementation = "eager"
    hf = randomise(transformers.SiglipVisionModel(vc))
    sd = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    images = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                 output_hidden_states=True)
    hs = [h.numpy() for h in out.hidden_states]
    pooled_ref = out.last_hidden_state.numpy().mean(1)
    for scan, fl in ((False, -2), (False, 0), (True, -1), (True, 1), (False, (0, -1)),
                     (True, (2, 0, -2)), (True, (-1, -1))):
        c = cfg_for_parity(**{"vit.feature_layer": fl, "scan_layers": scan})
        p = hf_weights.tower_from_hf(sd, "vision", c)
        feats, pooled = jax.jit(VisionTransformer(c).apply)({"params": p}, images)
        # A list of layers: HF's hidden states concatenated in list order (Llava's hs_pool).
        want = np.concatenate([hs[k] for k in fl], -1) if isinstance(fl, tuple) else hs[fl]
        assert feats.shape == want.shape and np.abs(np.asarray(feats) - want).max() < TOL, \
            (scan, fl)
        assert np.abs(np.asarray(pooled) - pooled_ref).max() < TOL
    # Stage-1 'mean_max' pooling: [mean, max] over HF's post-layernorm tokens.
    p = hf_weights.tower_from_hf(sd, "vision", cfg)
    _, pooled = jax.jit(VisionTransformer(cfg, pooling="mean_max").apply)({"params": p}, images)
    want = np.concatenate([pooled_ref, out.last_hidden_state.numpy().max(1)], -1)
    assert pooled.shape == (2, 64) and np.abs(np.asarray(pooled) - want).max() < TOL
    with pytest.raises(ValueError, match="pooling='sum'.*config.stage1.pooling"):
        VisionTransformer(cfg, pooling="sum").init(jax.random.key(0), images)
    # Round trip back to HF names and layouts is exact.
    back = hf_weights.tower_to_hf(hf_weights.tower_from_hf(sd, "vision", cfg), "vision")
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k].numpy())


@pytest.mark.parametrize("depth", [1, 2])
def test_conv_stem_vit_matches_torch(depth):
    """stem='conv': an independent PyTorch stem (per stage: Conv2d 3x3/2 padding 1, LayerNorm
    over channels, tanh GELU, then depth-1 residual units y + GELU(LN(Conv2d 3x3/1(y))); a 1x1
    Conv2d and the position embeddings at the end) in place of SigLIP's patch embedding, under
    HF's encoder, gives the JAX ViT's features and pooled output."""
    import flax.linen as nn
    F = torch.nn.functional
    cfg = cfg_for_parity(**{"vit.stem": "conv", "vit.stem_depth": depth,
                            "vit.feature_layer": 0})                    # P=4: two stages
    vc, _, _ = hf_models(cfg_for_parity())
    vc._attn_implementation = "eager"
    hf = randomise(transformers.SiglipVisionModel(vc))
    g = torch.Generator().manual_seed(1)

    def unit(cin, w):
        return (torch.randn(w, cin, 3, 3, generator=g) / 3,
                1 + 0.1 * torch.randn(w, generator=g), 0.1 * torch.randn(w, generator=g))

    stages = [[unit(3, 16)] + [unit(16, 16) for _ in range(depth - 1)],       # Dv/2, Dv
              [unit(16, 32)] + [unit(32, 32) for _ in range(depth - 1)]]
    proj_w, proj_b = torch.randn(32, 32, 1, 1, generator=g) / 6, torch.randn(32, generator=g)
    tower = getattr(hf, "vision_model", hf)          # transformers 4.x nests the tower
    pos = tower.embeddings.position_embedding.weight.detach()

    def conv_ln_gelu(x, k, s, b, stride):
        x = F.conv2d(x, k, stride=stride, padding=1)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (k.shape[0],), s, b, 1e-6)
        return F.gelu(x, approximate="tanh").permute(0, 3, 1, 2)

    class TorchStem(torch.nn.Module):
        def forward(self, x, interpolate_pos_encoding=False):
            for first, *rest in stages:
                x = conv_ln_gelu(x, *first, stride=2)
                for u in rest:
                    x = x + conv_ln_gelu(x, *u, stride=1)
            x = F.conv2d(x, proj_w, proj_b)                             # [B,D,h,w]
            return x.flatten(2).transpose(1, 2) + pos[None]

    images = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    p = hf_weights.tower_from_hf({k.removeprefix("vision_model."): v
                                  for k, v in hf.state_dict().items()}, "vision", cfg_for_parity())
    tower.embeddings = TorchStem()
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                 output_hidden_states=True)
    emb = {"kernel": proj_w.numpy().transpose(2, 3, 1, 0), "bias": proj_b.numpy(),
           "position_embedding": pos.numpy()}
    for i, units in enumerate(stages):
        for j, (k, s, b) in enumerate(units):
            name = f"stem_{i}" if j == 0 else f"stem_{i}_{j}"
            emb[f"{name}_kernel"] = k.numpy().transpose(2, 3, 1, 0)
            emb[f"{name}_norm"] = {"scale": s.numpy(), "bias": b.numpy()}
    p["embeddings"] = emb
    feats, pooled = jax.jit(VisionTransformer(cfg).apply)({"params": p}, images)
    assert np.abs(np.asarray(feats) - out.hidden_states[0].numpy()).max() < TOL
    assert np.abs(np.asarray(pooled) - out.last_hidden_state.numpy().mean(1)).max() < TOL
    # The JAX init builds exactly this tree; a bad stem, depth or patch size is named.
    init = nn.unbox(VisionTransformer(cfg).init(jax.random.key(0), images))
    assert jax.tree.map(np.shape, init["params"]["embeddings"]) == jax.tree.map(np.shape, emb)
    with pytest.raises(ValueError, match="stem='pixel', expected one of"):
        VisionTransformer(cfg_for_parity(**{"vit.stem": "pixel"})).init(
            jax.random.key(0), images)
    with pytest.raises(ValueError, match="stem_depth=0: expected >= 1"):
        VisionTransformer(cfg_for_parity(**{"vit.stem": "conv", "vit.stem_depth": 0})).init(
            jax.random.key(0), images)
    bad = cfg_for_parity(**{"vit.stem": "conv", "vit.patch_size": 6, "vit.image_size": 24})
    with pytest.raises(ValueError, match="patch_size=6: stem='conv' needs a power of 2"):
        VisionTransformer(bad).init(jax.random.key(0), np.zeros((1, 24, 24, 3), np.float32))
    with pytest.raises(ValueError, match="stem='conv'.*cannot be exported"):
        hf_weights.hf_config_kwargs(cfg)


@pytest.mark.parametrize("scan", [False, True])
def test_stochastic_depth_matches_torch_branch_choices(scan):
    """drop_path_rate: with deterministic=True the ViT is HF's exactly; in training each
    example's output is HF's with every residual branch of the last block either dropped or
    scaled by 1/keep (candidates built in PyTorch from HF's submodules), the first block is
    never touched, and the dropped fraction matches the rate."""
    rate, b = 0.6, 96
    cfg = cfg_for_parity(**{"vit.num_layers": 2, "vit.feature_layer": -1, "scan_layers": scan,
                            "vit.drop_path_rate": rate})
    vc, _, _ = hf_models(cfg)
    vc._attn_implementation = "eager"
    hf = randomise(transformers.SiglipVisionModel(vc))
    sd = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    images = np.random.default_rng(1).random((b, 16, 16, 3)).astype(np.float32)
    vm = getattr(hf, "vision_model", hf)    # transformers 5 flattened the wrapper

    def block(i, x):                       # HF encoder layer (a tuple in older transformers)
        y = vm.encoder.layers[i](x, None)
        return y[0] if isinstance(y, tuple) else y

    with torch.no_grad():
        x = block(0, vm.embeddings(torch.from_numpy(images.transpose(0, 3, 1, 2))))  # kept
        last = vm.encoder.layers[1]
        cands = {}
        for a in (0.0, 1 / (1 - rate)):
            h1 = x + a * last.self_attn(last.layer_norm1(x), None)[0]
            for m in (0.0, 1 / (1 - rate)):
                h2 = h1 + m * last.mlp(last.layer_norm2(h1))
                cands[(a == 0, m == 0)] = vm.post_layernorm(h2).mean(1).numpy()   # [B,Dv]
        full = vm.post_layernorm(block(1, x)).mean(1).numpy()
    p = hf_weights.tower_from_hf(sd, "vision", cfg)
    model = VisionTransformer(cfg)
    _, pooled = jax.jit(model.apply)({"params": p}, images)              # deterministic
    assert np.abs(np.asarray(pooled) - full).max() < TOL
    _, pooled = jax.jit(lambda v, k: model.apply(v, images, deterministic=False,
                                                 rngs={"dropout": k}))({"params": p},
                                                                       jax.random.key(3))
    pooled = np.asarray(pooled)
    dropped = []
    for i in range(b):
        hit = [k for k, c in cands.items() if np.abs(pooled[i] - c[i]).max() < TOL]
        assert len(hit) == 1, (i, hit)
        dropped.append(hit[0])
    dropped = np.asarray(dropped)                                      # bool[B,2] (attn, mlp)
    assert abs(dropped.mean() - rate) < 0.12, dropped.mean()
    assert (dropped[:, 0] != dropped[:, 1]).any()                      # independent branches
    with pytest.raises(ValueError, match="drop_path_rate=1.0: expected 0 <= rate < 1"):
        VisionTransformer(cfg_for_parity(**{"vit.drop_path_rate": 1.0})).init(
            jax.random.key(0), images, deterministic=False)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_parity(tie):
    cfg = cfg_for_parity(**{"lm.tie_embeddings": tie})
    _, tc, _ = hf_models(cfg)
    tc._attn_implementation = "eager"
    hf = randomise(transformers.LlamaForCausalLM(tc), seed=1)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    sd = hf.state_dict()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.lm.vocab_size, (2, 11)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, -3:] = 0                                   # right padding
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens).long(),
                 attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    p = hf_weights.tower_from_hf(sd, "lm", cfg)
    assert ("lm_head" in p) == (not tie)
    got = np.asarray(jax.jit(lambda p, t, m: Decoder(cfg).apply(p, t, attention_mask=m))(
        {"params": p}, tokens, mask))
    real = mask == 1
    assert np.abs(got[real] - ref[real]).max() < TOL
    assert (got[real].argmax(-1) == ref[real].argmax(-1)).all()
    back = hf_weights.tower_to_hf(p, "lm")
    assert set(back) == {k for k in sd if not (tie and k == "lm_head.weight")}


@pytest.mark.parametrize("feature_layer", [-2, (0, -1)])
def test_llava_parity_and_layouts(feature_layer):
    """transformers' Llava and ours agree, also with a list of vision feature layers (the
    projector reads their concatenation: HF vision_feature_layer as a list)."""
    cfg = cfg_for_parity(**{"vit.feature_layer": feature_layer})
    vc, tc, kw = hf_models(cfg)
    lc = transformers.LlavaConfig(vision_config=vc, text_config=tc, **kw["llava"])
    lc._attn_implementation = "eager"
    lc.vision_config._attn_implementation = "eager"
    lc.text_config._attn_implementation = "eager"
    hf = randomise(transformers.LlavaForConditionalGeneration(lc), seed=2)
    n = num_image_tokens(cfg)
    rng = np.random.default_rng(2)
    tokens = rng.integers(6, cfg.lm.vocab_size, (2, n + 9)).astype(np.int32)
    tokens[0, 1:1 + n] = cfg.image_token_id
    tokens[1, 4:4 + n] = cfg.image_token_id
    mask = np.ones_like(tokens)
    images = rng.random((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens).long(),
                 pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                 attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    sd = hf.state_dict()
    params = hf_weights.from_hf(sd, cfg)
    got = np.asarray(jax.jit(WamGLM(cfg).apply)({"params": params}, images, tokens, mask))
    assert np.abs(got - ref).max() < TOL
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    # v5 layout == the torch model's own state dict names; loads strictly.
    v5 = hf_weights.to_hf(params, cfg, layout="v5")
    assert set(v5) == set(sd)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in v5.items()}, strict=True)
    # classic layout: the names that transformers 4.5x/5.x and vLLM load; round trip exact.
    classic = hf_weights.to_hf(params, cfg, layout="classic")
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in classic
    assert "language_model.model.layers.1.mlp.gate_proj.weight" in classic
    assert "language_model.lm_head.weight" in classic
    assert "multi_modal_projector.linear_2.bias" in classic
    again = hf_weights.from_hf(classic, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 again, params)
    # A scanned model imports the same weights and gives the same logits.
    scfg = cfg_for_parity(scan_layers=True, **{"vit.feature_layer": feature_layer})
    sparams = hf_weights.from_hf(classic, scfg)
    sgot = np.asarray(jax.jit(WamGLM(scfg).apply)({"params": sparams}, images, tokens, mask))
    assert np.abs(sgot - ref).max() < TOL


def test_missing_or_misshapen_weight_is_named():
    cfg = cfg_for_parity()
    shapes = hf_weights._abstract_params(cfg)["vision"]
    sd = hf_weights.tower_to_hf(jax.tree.map(lambda s: np.zeros(s.shape), shapes), "vision")
    del sd["post_layernorm.weight"]
    with pytest.raises(KeyError, match=r"missing: \['post_layernorm.weight'\]"):
        hf_weights.tower_from_hf(sd, "vision", cfg)
    sd["post_layernorm.weight"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match="does not fit JAX shape"):
        hf_weights.tower_from_hf(sd, "vision", cfg)
    sd["post_layernorm.weight"] = np.ones(32, np.float32)
    # a deeper checkpoint than config.model (or biases it lacks) is an error, not dropped
    deeper = dict(sd, **{k.replace("layers.2.", "layers.3."): v for k, v in sd.items()
                         if k.startswith("encoder.layers.2.")})
    with pytest.raises(KeyError, match=r"unexpected .*encoder\.layers\.3\."):
        hf_weights.tower_from_hf(deeper, "vision", cfg)
    # ... while SigLIP's pooling head and a full SigLIP checkpoint's text tower are skipped
    full = {f"vision_model.{k}": v for k, v in sd.items()}
    full.update({"vision_model.head.probe": np.zeros((1, 1, 32)),
                 "text_model.embeddings.token_embedding.weight": np.zeros((5, 32)),
                 "logit_scale": np.zeros(1)})
    got = hf_weights.tower_from_hf(full, "vision", cfg)
    np.testing.assert_array_equal(got["post_layernorm"]["scale"], np.ones(32))
    with pytest.raises(KeyError, match=r"outside .*image_newline"):
        hf_weights.from_hf({"image_newline": np.zeros(3)}, cfg)


def test_tied_import_rejects_a_different_lm_head():
    cfg = cfg_for_parity(**{"lm.tie_embeddings": True})
    shapes = hf_weights._abstract_params(cfg)["lm"]
    rng = np.random.default_rng(0)
    sd = hf_weights.tower_to_hf(jax.tree.map(lambda s: rng.normal(size=s.shape), shapes), "lm")
    assert "lm_head.weight" not in sd
    emb = sd["model.embed_tokens.weight"]
    hf_weights.tower_from_hf(dict(sd, **{"lm_head.weight": emb.copy()}), "lm", cfg)  # tied copy
    with pytest.raises(ValueError, match="lm_head.weight differs from embed_tokens"):
        hf_weights.tower_from_hf(dict(sd, **{"lm_head.weight": emb + 1}), "lm", cfg)
    with pytest.raises(KeyError, match=r"unexpected .*q_proj\.bias"):
        hf_weights.tower_from_hf(dict(sd, **{"model.layers.0.self_attn.q_proj.bias":
                                             np.zeros(32)}), "lm", cfg)

