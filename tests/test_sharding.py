"""Sharded WamGLM train step == single-device train step, on 8 simulated CPU devices (fp32).

One jitted step (forward, LM cross-entropy on text tokens, grads, one optax AdamW update) runs
on one device without any mesh (the reference), then on meshes (data, fsdp, tensor) = (8,1,1),
(2,4,1), (2,2,2) with the trainer path of wamglm_jax.parallel (sharded init, global batch,
jit with in/out shardings and donation).

Tolerances (fp32; sharding only changes the order of reductions):
- logits and loss: |diff| <= 1e-5 (absolute; the loss is ~ln(512) = 6.2).
- gradients, per leaf: max|g - g_ref| <= 1e-5 * max|g_ref| (+1e-9 for all-zero leaves).
- parameters after one AdamW step: max|p - p_ref| <= 1e-3 * lr. Adam's first bias-corrected
  step moves each parameter by lr * g / (|g| + eps) (+ the identical weight decay), i.e. at most
  lr. A gradient difference d moves it by <= lr * d * eps / (|g| + eps)^2 <= lr * d / eps.
  fp32 reduction-order noise on single elements is d ~ 1e-8 (some gradients are mathematically
  zero, e.g. the ViT key bias, and come out as +-1e-10 noise), so with eps = 1e-4 the
  difference is ~1e-4 lr and 1e-3 lr leaves margin (with the usual eps = 1e-8 the sign of that
  noise would move such parameters by a full +-lr). Any real sharding error (a missing or
  doubled reduction changes g by O(1)) moves parameters by O(lr).
Measured here (tiny preset, 1 layer per tower): loss <= 5e-7, logits <= 3.1e-6, gradients
<= 1.5e-6 x max|g_ref| per leaf, parameters <= 1.7e-4 lr, on all three meshes. Because Adam's first step is invariant to a global
  gradient scale, the gradients are also compared directly (above).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import presets
from configs.common import SHARDING_RULES
from wamglm_jax.models.wamglm import WamGLM, num_image_tokens
from wamglm_jax.parallel import mesh as mesh_lib
from wamglm_jax.parallel import sharding

LR, EPS = 1e-3, 1e-4
B, TEXT_BEFORE, TEXT_AFTER = 8, 3, 9        # tokens: [text, N image tokens, text (+ padding)]


def _cfg():
    cfg = presets.model_config("tiny")
    cfg.vit.num_layers = cfg.lm.num_layers = 1     # compile time; sharding is per-layer anyway
    return cfg


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    n = num_image_tokens(cfg)
    t = TEXT_BEFORE + n + TEXT_AFTER
    s = cfg.vit.image_size
    v = cfg.lm.vocab_size
    tokens = rng.integers(4, v, size=(B, t)).astype(np.int32)
    tokens[:, TEXT_BEFORE:TEXT_BEFORE + n] = cfg.image_token_id
    mask = np.ones((B, t), np.int32)
    for b in range(B):                        # right padding of 0..3 tokens
        pad = b % 4
        if pad:
            mask[b, t - pad:] = 0
            tokens[b, t - pad:] = 0
    loss_mask = (mask == 1) & (tokens != cfg.image_token_id)
    return dict(image=rng.random((B, s, s, 3), dtype=np.float32), tokens=tokens,
                mask=mask, loss_mask=loss_mask.astype(np.float32))


def _make_step(model, tx):
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["image"], batch["tokens"],
                             batch["mask"])                                   # float32[B,T,V]
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
        w = batch["loss_mask"][:, 1:]
        return (nll * w).sum() / w.sum(), logits

    def step(state, batch):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return dict(params=optax.apply_updates(state["params"], updates), opt=opt), \
            dict(loss=loss, logits=logits, grads=grads)
    return step


def _make_state(model, tx, cfg):
    n = num_image_tokens(cfg)
    tokens = jnp.concatenate([jnp.full((B, 2), 4, jnp.int32),
                              jnp.full((B, n), cfg.image_token_id, jnp.int32)], axis=1)
    images = jnp.zeros((B, cfg.vit.image_size, cfg.vit.image_size, 3), jnp.float32)

    def make(rng):            # boxed params -> AdamW moments inherit the logical axes
        params = model.init(rng, images, tokens, jnp.ones_like(tokens))["params"]
        return dict(params=params, opt=tx.init(params))
    return make


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    model = WamGLM(config=cfg)
    tx = optax.adamw(LR, eps=EPS, weight_decay=0.1)
    make = _make_state(model, tx, cfg)
    batch = _batch(cfg)
    dev0 = jax.devices()[0]
    # Reference: one device, no mesh in context (constraints are no-ops), plain jit.
    state = jax.jit(lambda r: sharding.unbox_values(make(r)))(jax.random.key(0))
    assert {d for leaf in jax.tree.leaves(state) for d in leaf.devices()} == {dev0}
    init_state = jax.tree.map(np.asarray, state)
    new_state, out = jax.jit(_make_step(model, tx))(state, jax.device_put(batch, dev0))
    logical = [tuple(spec) for spec in jax.tree.leaves(
        nn.get_partition_spec(jax.eval_shape(make, jax.random.key(0))["params"]),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))]
    ref = dict(init=init_state["params"], init_state=init_state, logical=logical,
               params=jax.tree.map(np.asarray, new_state["params"]),
               **jax.tree.map(np.asarray, out))
    return cfg, model, tx, make, batch, ref


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_single_device(setup, shape):
    cfg, model, tx, make, batch, ref = setup
    mesh = mesh_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    rules = sharding.rules_from_config(SHARDING_RULES)
    sharding.check_model_config(cfg, mesh)

    # --- the trainer path: sharded init, global batch, jit with in/out shardings + donation
    if shape == (2, 2, 2):    # compile budget: the sharded-init path once, device_put otherwise
        state, state_sh = sharding.jit_init(make, jax.random.key(0), mesh=mesh, rules=rules)
    else:
        with sharding.activate(mesh, rules):
            state_sh = sharding.shardings_of(jax.eval_shape(make, jax.random.key(0)), mesh, rules)
        state = jax.device_put(ref["init_state"], state_sh)
    gbatch = sharding.global_batch(batch, mesh)
    with sharding.activate(mesh, rules):
        metrics_sh = dict(loss=sharding.replicated(mesh),
                          logits=sharding.data_sharding(mesh), grads=state_sh["params"])
        step = jax.jit(_make_step(model, tx), in_shardings=(state_sh, sharding.data_sharding(mesh)),
                       out_shardings=(state_sh, metrics_sh), donate_argnums=0)
        hlo = step.lower(state, gbatch).as_text()
        init_params = jax.tree.map(np.asarray, state["params"])
        new_state, out = step(state, gbatch)

    # sharded init produced the same initial values (threefry is partitionable)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), init_params, ref["init"])

    # every large parameter is really split. Expected per-device fraction, from the logical
    # names and SHARDING_RULES read by hand: 'embed' dims over fsdp; one of mlp/heads/kv_heads/
    # vocab over tensor.
    fsdp, tensor = shape[1], shape[2]
    leaves = jax.tree_util.tree_flatten_with_path(new_state["params"])[0]
    n_large = 0
    for (path, p), want, names in zip(leaves, jax.tree.leaves(state_sh["params"]),
                                      ref["logical"]):
        assert p.sharding == want          # out_shardings kept (donated state round-trips)
        name = jax.tree_util.keystr(path)
        shard = p.addressable_shards[0].data
        assert len(p.addressable_shards) == 8
        split = (fsdp if "embed" in names else 1) * (
            tensor if {"mlp", "heads", "kv_heads", "vocab"} & set(names) else 1)
        assert shard.size * split == p.size, (name, names, p.shape, shard.shape)
        if p.size >= 4096:
            n_large += 1
            assert "embed" in names, name          # so fsdp always splits large params
            if fsdp * tensor > 1:
                assert shard.size < p.size, (name, p.shape, shard.shape)
    assert n_large >= 10
    # and the optimizer moments are sharded like their parameters
    mu = new_state["opt"][0].mu
    jax.tree.map(lambda m, p: (m.sharding.spec == p.sharding.spec) or pytest.fail(
        f"mu {m.sharding.spec} != param {p.sharding.spec}"), mu, new_state["params"])

    # activation sharding constraints made it into the lowered step
    constraints = [l for l in hlo.splitlines() if "sdy.sharding_constraint" in l]
    batch_constraints = [l for l in constraints if '[{"data", "fsdp"}' in l]
    assert len(batch_constraints) >= cfg.lm.num_layers + cfg.vit.num_layers, constraints[:5]
    if shape[2] > 1:
        assert any('{"tensor"}' in l for l in constraints)

    # numbers: forward, loss, gradients, parameters after one AdamW step
    assert _max_abs(out["logits"], ref["logits"]) <= 1e-5
    assert abs(float(out["loss"]) - float(ref["loss"])) <= 1e-5
    for (path, g), g_ref in zip(jax.tree_util.tree_flatten_with_path(out["grads"])[0],
                                jax.tree.leaves(ref["grads"])):
        tol = 1e-5 * float(np.max(np.abs(g_ref))) + 1e-9
        assert _max_abs(g, g_ref) <= tol, (jax.tree_util.keystr(path), _max_abs(g, g_ref), tol)
    dp = max(_max_abs(a, b) for a, b in zip(jax.tree.leaves(new_state["params"]),
                                            jax.tree.leaves(ref["params"])))
    assert dp <= 1e-3 * LR, dp
    # the step did move the parameters (by about lr each)
    moved = max(_max_abs(a, b) for a, b in zip(jax.tree.leaves(ref["params"]),
                                               jax.tree.leaves(ref["init"])))
    assert 0.5 * LR < moved < 2 * LR


def test_init_sharded_and_divisibility_errors():
    cfg = _cfg()
    model = WamGLM(config=cfg)
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=8))
    with pytest.raises(sharding.ShardingError, match=r"model.lm.num_kv_heads=2"):
        sharding.check_model_config(cfg, mesh)
    n = num_image_tokens(cfg)
    tokens = jnp.full((2, n), cfg.image_token_id, jnp.int32)
    images = jnp.zeros((2, cfg.vit.image_size, cfg.vit.image_size, 3))
    with pytest.raises(sharding.ShardingError, match=r"kv_heads.*not divisible by mesh axes "
                                                      r"tensor of size 8"):
        sharding.init_sharded(model, jax.random.key(0), images, tokens, jnp.ones_like(tokens),
                              mesh=mesh, rules=SHARDING_RULES)
    # a logical name without a rule is an error, not silent replication
    rules = tuple(r for r in SHARDING_RULES if r[0] != "mlp")
    mesh2 = mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    with pytest.raises(sharding.ShardingError, match=r"\['mlp'\] have no rule"):
        sharding.init_sharded(model, jax.random.key(0), images, tokens, jnp.ones_like(tokens),
                              mesh=mesh2, rules=rules)


def test_batch_helpers():
    mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    g = sharding.global_batch({"x": x}, mesh)["x"]
    assert g.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert g.addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(g), x)
    with pytest.raises(sharding.ShardingError, match=r"not divisible by data\*fsdp = 2\*2 = 4"):
        sharding.global_batch({"x": x[:6]}, mesh)
    assert sharding.pad_vocab(32000, 128 * 8) == 32768
    assert sharding.pad_vocab(512, 128) == 512 and sharding.pad_vocab(513, 128) == 640
    assert math.prod(mesh.shape.values()) == 8


def test_rules_from_config():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(sharding_rules=SHARDING_RULES))
    assert sharding.rules_from_config(cfg) == SHARDING_RULES
    # rules reloaded from config.json come back as lists
    as_lists = [[k, list(v) if isinstance(v, tuple) else v] for k, v in SHARDING_RULES]
    assert sharding.rules_from_config(as_lists) == SHARDING_RULES
    with pytest.raises(sharding.ShardingError, match=r"sharding_rules\[1\]"):
        sharding.rules_from_config([("batch", "data"), ("embed",)])
    with pytest.raises(sharding.ShardingError, match=r"mesh axis must be a str"):
        sharding.rules_from_config([("embed", 3)])


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_annotated_and_scan_stack_shards(scan):
    """Every WamGLM parameter carries logical names (one per dim; nothing silently
    replicated), scanned stacks lead with 'layers', and a scanned model's params and
    activation constraints map onto a (2,2,2) mesh (shape-only + lowering, no compile)."""
    cfg = _cfg()
    cfg.vit.num_layers = cfg.lm.num_layers = 2
    cfg.scan_layers = scan
    model = WamGLM(config=cfg)
    batch = _batch(cfg)
    mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
    rules = sharding.rules_from_config(SHARDING_RULES)
    with sharding.activate(mesh, rules):
        boxed = sharding.abstract_init(model, jax.random.key(0), batch["image"], batch["tokens"],
                                       batch["mask"])["params"]
        sharding.check_shardable(boxed, mesh, rules)
        shs = sharding.shardings_of(boxed, mesh, rules)
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    assert len(leaves) > 20
    for (path, leaf), sh in zip(leaves, jax.tree.leaves(shs)):
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), name
        names = leaf.names
        assert len(names) == leaf.value.ndim, (name, names, leaf.value.shape)
        if "'layers'" in name:      # a scanned stack (only exists with scan_layers)
            assert names[0] == "layers" and sh.spec[0] is None, (name, names, sh.spec)
        if "embed" in names:        # d_model dims of weights are FSDP-sharded
            assert sh.spec[names.index("embed")] == "fsdp", (name, sh.spec)
    n_stacked = sum("'layers'" in jax.tree_util.keystr(p) for p, _ in leaves)
    assert (n_stacked > 0) == scan
    if scan:
        with sharding.activate(mesh, rules):
            hlo = jax.jit(lambda p, b: model.apply({"params": p}, b["image"], b["tokens"],
                                                   b["mask"])).lower(
                sharding.unbox_values(boxed), batch).as_text()
        constraints = [l for l in hlo.splitlines() if "sdy.sharding_constraint" in l]
        assert any('[{"data", "fsdp"}' in l for l in constraints)
        assert any('{"tensor"}' in l for l in constraints)
