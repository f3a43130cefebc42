"""LoRA as a param-tree transform: merge vs unmerged, zero init, gradients only on adapters."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wamglm_jax.models import lora as lora_lib


class _Attn(nn.Module):
    """DenseGeneral 3-D kernels like an attention block: q [D,H,Dh], out [H,Dh,D], mlp 2-D."""

    @nn.compact
    def __call__(self, x):                                   # float[B,T,D]
        q = nn.DenseGeneral((2, 4), name="q_proj")(x)        # float[B,T,H,Dh]
        y = nn.DenseGeneral(8, axis=(-2, -1), name="o_proj")(jnp.tanh(q))
        return nn.Dense(5, name="fc")(y + x)


def _setup():
    m = _Attn()
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    params = m.init(jax.random.key(1), x)["params"]
    return m, x, params


def _randomize_b(lora, seed=3):
    leaves, tdef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tdef, [jax.random.normal(k, l.shape) * 0.3 for k, l in zip(keys, leaves)])


def test_shapes_and_regex():
    _, _, params = _setup()
    lo = lora_lib.init_lora(params, 2, 4.0, r"(q_proj|o_proj)", jax.random.key(2))
    assert set(lo) == {"q_proj", "o_proj"}
    assert lo["q_proj"]["kernel"]["a"].shape == (8, 2) and lo["q_proj"]["kernel"]["b"].shape == (2, 8)
    assert lo["o_proj"]["kernel"]["a"].shape == (8, 2) and lo["o_proj"]["kernel"]["b"].shape == (2, 8)
    assert not np.any(np.asarray(lo["q_proj"]["kernel"]["b"]))
    with pytest.raises(ValueError, match="matched no kernel"):
        lora_lib.init_lora(params, 2, 4.0, r"nothing_here", jax.random.key(2))


def test_zero_init_is_identity():
    m, x, params = _setup()
    lo = lora_lib.init_lora(params, 2, 4.0, r".", jax.random.key(2))
    y0 = m.apply({"params": params}, x)
    y1 = m.apply({"params": lora_lib.apply_lora(params, lo, 4.0)}, x)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))


def test_merge_matches_numpy_and_unmerged_forward():
    m, x, params = _setup()
    alpha, r = 4.0, 2
    lo = _randomize_b(lora_lib.init_lora(params, r, alpha, r".", jax.random.key(2)))
    merged = lora_lib.merge(params, lo, alpha)
    # independent numpy merge: o_proj [H,Dh,D] flattens its first two axes as input
    for name in ("q_proj", "o_proj", "fc"):
        w = np.asarray(params[name]["kernel"], np.float64)
        a = np.asarray(lo[name]["kernel"]["a"], np.float64)
        b = np.asarray(lo[name]["kernel"]["b"], np.float64)
        d_in = a.shape[0]
        want = (w.reshape(d_in, -1) + alpha / r * a @ b).reshape(w.shape)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, atol=1e-6)
    unmerged = jax.jit(lambda p, l: m.apply({"params": lora_lib.apply_lora(p, l, alpha)}, x))
    y_u = unmerged(params, lo)
    y_m = m.apply({"params": merged}, x)
    np.testing.assert_allclose(np.asarray(y_u), np.asarray(y_m), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(y_m) - np.asarray(m.apply({"params": params}, x))).max() > 1e-3


def test_gradients_only_reach_adapters_when_params_frozen():
    m, x, params = _setup()
    lo = _randomize_b(lora_lib.init_lora(params, 2, 4.0, r"q_proj", jax.random.key(2)))

    def loss(l, p):
        return jnp.sum(m.apply({"params": lora_lib.apply_lora(p, l, 4.0)}, x) ** 2)

    g_lora = jax.grad(loss)(lo, params)
    assert jax.tree_util.tree_structure(g_lora) == jax.tree_util.tree_structure(lo)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g_lora))
    # finite difference on one adapter entry, independent of autodiff
    eps = 1e-3
    a = lo["q_proj"]["kernel"]["a"]
    lp = jax.tree_util.tree_map(lambda z: z, lo)
    lp["q_proj"]["kernel"]["a"] = a.at[0, 0].add(eps)
    lm = jax.tree_util.tree_map(lambda z: z, lo)
    lm["q_proj"]["kernel"]["a"] = a.at[0, 0].add(-eps)
    fd = (loss(lp, params) - loss(lm, params)) / (2 * eps)
    np.testing.assert_allclose(float(g_lora["q_proj"]["kernel"]["a"][0, 0]), float(fd), rtol=2e-2)


def test_stacked_layers_get_one_adapter_per_layer():
    params = {"layers": {"mlp": {"kernel": jax.random.normal(jax.random.key(0), (3, 4, 6))}}}
    lo = _randomize_b(lora_lib.init_lora(params, 2, 2.0, r"mlp", jax.random.key(1),
                                         stacked_regex=r"^layers/"))
    a, b = lo["layers"]["mlp"]["kernel"]["a"], lo["layers"]["mlp"]["kernel"]["b"]
    assert a.shape == (3, 4, 2) and b.shape == (3, 2, 6)
    merged = lora_lib.merge(params, lo, 2.0)["layers"]["mlp"]["kernel"]
    for i in range(3):
        want = np.asarray(params["layers"]["mlp"]["kernel"][i]) + np.asarray(a[i]) @ np.asarray(b[i])
        np.testing.assert_allclose(np.asarray(merged[i]), want, atol=1e-6)


def test_wamglm_lora_merge_and_adapter_only_training(scan=False):
    """On the real model (3-D attention kernels, optional nn.scan stacks): unmerged forward ==
    merged forward, and an optimizer step with trainable=('^lora/',) moves only adapters."""
    from configs import presets
    from wamglm_jax.models.wamglm import WamGLM, num_image_tokens
    from wamglm_jax.train import optim
    from wamglm_jax.models.lora import effective_params, merged_params
    from wamglm_jax.train.state import TrainState

    cfg = presets.model_config("tiny")
    cfg.vit.image_size, cfg.lm.vocab_size, cfg.scan_layers = 8, 64, scan
    model = WamGLM(cfg)
    n = num_image_tokens(cfg)
    toks = np.array([[1] + [cfg.image_token_id] * n + [5, 6, 7]] * 2, np.int32)
    imgs = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    import flax.linen as nn
    params = nn.unbox(model.init(jax.random.key(1), imgs, toks, np.ones_like(toks))["params"])
    lo = lora_lib.init_lora(params, 4, 8.0, r"^lm/.*(q_proj|o_proj|down_proj)|^vision/.*out_proj",
                            jax.random.key(2), stacked_regex=r"/layers/" if scan else None)
    full = dict(params, lora=_randomize_b(lo))
    fwd = jax.jit(lambda p: model.apply({"params": effective_params(p, 8.0)}, imgs, toks,
                                        np.ones_like(toks)))
    y_unmerged = fwd(full)
    y_merged = model.apply({"params": merged_params(full, 8.0)}, imgs, toks, np.ones_like(toks))
    np.testing.assert_allclose(np.asarray(y_unmerged), np.asarray(y_merged), atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(y_merged) - np.asarray(fwd(dict(params, lora=lo)))).max() > 1e-4
    # zero-B adapters: identical to the base model
    np.testing.assert_allclose(np.asarray(fwd(dict(params, lora=lo))),
                               np.asarray(model.apply({"params": params}, imgs, toks,
                                                      np.ones_like(toks))), atol=1e-5)
    ocfg = optim.default_optimizer_config(trainable=("^lora/",), learning_rate=1e-2,
                                          warmup_steps=0)
    tx, _ = optim.make_optimizer(ocfg, 10, full)
    state = TrainState.create(params=full, tx=tx, rng=jax.random.PRNGKey(0))
    grads = jax.grad(lambda p: jnp.mean(fwd(p) ** 2))(state.params)
    new = state.apply_gradients(grads).params
    for k in ("vision", "projector", "lm"):
        for a, b in zip(jax.tree.leaves(new[k]), jax.tree.leaves(full[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new["lora"]),
                                                         jax.tree.leaves(full["lora"]))]
    assert min(moved) > 0
