"""Stage1Model: shapes, unit norms, prototypes derived from the classifier, BatchNorm modes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import presets
from wamglm_jax.models.stage1 import Stage1Model, apply_views
from wamglm_jax.models.vit import VisionTransformer

C = 5


@pytest.fixture(scope="module")
def setup():
    cfg = presets.model_config("tiny")
    model = Stage1Model(config=cfg, num_classes=C, proj_dim=16)
    s = cfg.vit.image_size
    images = jax.random.uniform(jax.random.key(1), (6, s, s, 3))
    variables = nn.unbox(jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), images, train=False))
    return cfg, model, variables, images


_JITTED = {}


def run(model, variables, images, train=False, mutable=False):
    """Jitted model.apply, compiled once per (model, mode): eager ViT dispatch is slow."""
    key = (id(model), train, tuple(mutable) if mutable else False)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=mutable))
    return _JITTED[key](variables, images)


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_head(head, pooled, bn_stats=None):
    """Independent numpy forward of the head (bn_stats=None: batch statistics)."""
    p = {k: jax.tree.map(np.asarray, v) for k, v in head.items()}
    logits = pooled @ p["classifier"]["kernel"] + p["classifier"]["bias"]
    h = pooled @ p["proj_fc1"]["kernel"] + p["proj_fc1"]["bias"]
    batch_stats = (h.mean(0), h.var(0))
    mu, var = batch_stats if bn_stats is None else (bn_stats["mean"], bn_stats["var"])
    h = (h - mu) / np.sqrt(var + 1e-5) * p["proj_bn"]["scale"] + p["proj_bn"]["bias"]
    z = np_normalize(np.maximum(h, 0) @ p["proj_fc2"]["kernel"] + p["proj_fc2"]["bias"])
    w = p["classifier"]["kernel"].T                                     # [C,Dv]
    q = np.maximum(w @ p["proto_fc1"]["kernel"] + p["proto_fc1"]["bias"], 0)
    protos = np_normalize(q @ p["proto_fc2"]["kernel"] + p["proto_fc2"]["bias"])
    return logits, z, protos, batch_stats


def test_shapes_norms_and_numpy_head_eval(setup):
    cfg, model, variables, images = setup
    out = run(model, variables, images)
    dv = cfg.vit.hidden_size
    assert out["logits"].shape == (6, C) and out["z"].shape == (6, 16)
    assert out["prototypes"].shape == (C, 16) and out["pooled"].shape == (6, dv)
    assert all(v.dtype == jnp.float32 for v in out.values())
    np.testing.assert_allclose(np.linalg.norm(out["z"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["prototypes"], axis=-1), 1.0, rtol=1e-5)
    bn = jax.tree.map(np.asarray, variables["batch_stats"]["head"]["proj_bn"])
    logits, z, protos, _ = np_head(variables["params"]["head"], np.asarray(out["pooled"]), bn)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["z"], z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["prototypes"], protos, rtol=1e-4, atol=1e-5)


def test_vision_tree_matches_vit(setup):
    cfg, model, variables, images = setup
    vit_params = nn.unbox(jax.eval_shape(lambda: VisionTransformer(config=cfg).init(
        jax.random.key(0), images)))["params"]
    assert (jax.tree.structure(vit_params) == jax.tree.structure(variables["params"]["vision"]))
    spec = nn.get_partition_spec(jax.eval_shape(lambda: model.init(jax.random.key(0), images,
                                                                   train=False)))
    assert tuple(spec["params"]["head"]["classifier"]["kernel"]) == ("embed", "classes")
    assert tuple(spec["params"]["head"]["proj_fc1"]["kernel"]) == ("embed", "mlp")


def test_prototypes_derived_from_classifier_kernel(setup):
    cfg, model, variables, images = setup
    base = run(model, variables, images)["prototypes"]
    # Changing the classifier kernel changes the prototypes ...
    v2 = jax.tree.map(lambda x: x, variables)
    k = v2["params"]["head"]["classifier"]["kernel"]
    v2["params"]["head"]["classifier"]["kernel"] = k.at[:, 2].add(0.5)
    changed = run(model, v2, images)["prototypes"]
    diff = np.abs(np.asarray(changed - base)).max(-1)
    assert diff[2] > 1e-3 and np.all(diff[np.arange(C) != 2] == 0)
    # ... while the images and the vision tower do not affect them.
    v3 = jax.tree.map(lambda x: x, variables)
    v3["params"]["vision"] = jax.tree.map(lambda x: x * 1.5, v3["params"]["vision"])
    other = run(model, v3, images[::-1] * 0.3)["prototypes"]
    np.testing.assert_array_equal(np.asarray(other), np.asarray(base))
    # and gradients of a prototype loss reach the classifier kernel.
    g = jax.jit(jax.grad(lambda p: model.apply({**variables, "params": p}, images, train=False)
                 ["prototypes"][0, 0]))(variables["params"])
    assert np.abs(np.asarray(g["head"]["classifier"]["kernel"])).max() > 0
    assert np.abs(np.asarray(g["head"]["proto_fc1"]["kernel"])).max() > 0


def test_batchnorm_updates_only_in_train(setup):
    cfg, model, variables, images = setup
    stats0 = jax.tree.map(np.asarray, variables["batch_stats"])
    out, upd = run(model, variables, images, train=True, mutable=["batch_stats"])
    logits, z, _, (mu, var) = np_head(variables["params"]["head"], np.asarray(out["pooled"]))
    np.testing.assert_allclose(out["z"], z, rtol=1e-4, atol=1e-5)       # batch statistics
    new = upd["batch_stats"]["head"]["proj_bn"]
    np.testing.assert_allclose(new["mean"], 0.9 * stats0["head"]["proj_bn"]["mean"] + 0.1 * mu,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * stats0["head"]["proj_bn"]["var"] + 0.1 * var,
                               rtol=1e-4, atol=1e-6)
    _, same = run(model, variables, images, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, same["batch_stats"]),
                 stats0)


def test_apply_views_single_forward(setup):
    cfg, model, variables, images = setup
    views = jnp.stack([images, images[:, ::-1], jnp.rot90(images, axes=(1, 2))], axis=1)
    outs, stats = jax.jit(lambda v, x: apply_views(model, v, x, train=False))(variables, views)
    assert len(outs) == 3
    jax.tree.map(np.testing.assert_array_equal, stats, variables["batch_stats"])
    for i in range(3):
        ref = run(model, variables, views[:, i])
        for k in ("logits", "z", "pooled", "prototypes"):
            np.testing.assert_allclose(outs[i][k], ref[k], rtol=1e-5, atol=1e-6)
    # train: one BN over all B*V rows (batch-major), stats updated.
    outs_t, stats_t = jax.jit(lambda v, x: apply_views(model, v, x, train=True))(variables, views)
    flat = views.reshape((-1,) + views.shape[2:])
    ref, upd = run(model, variables, flat, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(outs_t[1]["z"], ref["z"][1::3], rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_allclose, stats_t, upd["batch_stats"])
    with pytest.raises(ValueError, match="views must be"):
        apply_views(model, variables, images, train=False)


def test_bfloat16_compute_and_bad_config(setup):
    cfg, model32, variables, images = setup
    cfg16 = presets.model_config("tiny")
    cfg16.dtype = "bfloat16"
    model = Stage1Model(config=cfg16, num_classes=C, proj_dim=16)   # params stay float32
    out = run(model, variables, images)
    ref = run(model32, variables, images)
    assert out["z"].dtype == jnp.float32 and np.isfinite(np.asarray(out["logits"])).all()
    np.testing.assert_allclose(np.linalg.norm(out["z"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=0.1)
    np.testing.assert_array_equal(np.asarray(out["prototypes"]), np.asarray(ref["prototypes"]))
    with pytest.raises(ValueError, match="num_classes"):
        Stage1Model(config=cfg16, num_classes=1).init(jax.random.key(0), images)


def test_mean_max_pooling_widens_the_head(setup):
    """pooling='mean_max': the vision params are those of 'mean' (pooling has none), the
    head reads [mean, max] (classifier kernel [2Dv, C]) and `pooled` is that concatenation."""
    cfg, _, variables, images = setup
    model = Stage1Model(config=cfg, num_classes=C, proj_dim=16, pooling="mean_max")
    v2 = nn.unbox(jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), images, train=False))
    d = cfg.vit.hidden_size
    assert jax.tree.map(np.shape, v2["params"]["vision"]) == jax.tree.map(
        np.shape, variables["params"]["vision"])
    assert v2["params"]["head"]["classifier"]["kernel"].shape == (2 * d, C)
    out = run(model, v2, images)
    _, mean_pooled = VisionTransformer(cfg).apply({"params": v2["params"]["vision"]}, images)
    np.testing.assert_allclose(np.asarray(out["pooled"][:, :d]), np.asarray(mean_pooled),
                               atol=1e-6)
    assert np.all(np.asarray(out["pooled"][:, d:]) >= np.asarray(out["pooled"][:, :d]) - 1e-6)
