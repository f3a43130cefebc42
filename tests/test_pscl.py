"""PSCL / BalSCL loss against an independent brute-force loop implementation (FACTS.md formula)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from wamglm_jax.losses import balanced_contrastive_loss, stage1_loss


def brute_balscl(z2, z3, labels, protos, valid, t, xp=np):
    """Straight from FACTS.md, one anchor and one contrast member at a time.

    Works on numpy float64 arrays (xp=np) and on torch tensors (xp=torch, differentiable).
    """
    keep = [b for b in range(len(labels)) if valid[b]]
    members = ([(z2[b], int(labels[b])) for b in keep] + [(z3[b], int(labels[b])) for b in keep]
               + [(protos[c], c) for c in range(protos.shape[0])])
    n = {}
    for _, y in members:
        n[y] = n.get(y, 0) + 1
    num_anchors = 2 * len(keep)
    total = 0.0
    for i in range(num_anchors):
        z_i, y_i = members[i]
        d_i = 0.0
        pos = []
        for j, (a_j, y_j) in enumerate(members):
            if j == i:
                continue
            s_ij = (z_i * a_j).sum() / t
            d_i = d_i + xp.exp(s_ij) / (n[y_j] - (1 if y_j == y_i else 0))
            if y_j == y_i:
                pos.append(s_ij)
        assert len(pos) >= 2
        log_d = xp.log(d_i)
        total = total + (-sum(p - log_d for p in pos) / len(pos))
    return total / num_anchors


def unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_case(seed, b=6, c=5, d=8, present=None, pad=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(present if present is not None else np.arange(c), size=b)
    z2, z3, protos = unit(rng, b, d), unit(rng, b, d), unit(rng, c, d)
    valid = np.ones(b, bool)
    if pad:
        valid[-pad:] = False
        labels[-pad:] = rng.choice([-1, 0, c + 3], size=pad)  # garbage labels on padding
    return z2, z3, labels.astype(np.int32), protos, valid


_jit_loss = jax.jit(balanced_contrastive_loss, static_argnums=(5,))


def jax_loss(z2, z3, labels, protos, valid, t, dtype=jnp.float32):
    return _jit_loss(jnp.asarray(z2, dtype), jnp.asarray(z3, dtype), jnp.asarray(labels),
                     jnp.asarray(protos, dtype), jnp.asarray(valid), t)


CASES = {
    "all_present": dict(b=12, c=4),
    "absent_classes": dict(b=8, c=9, present=[0, 2, 5]),
    "single_member": dict(b=7, c=3, present=[0, 1]),   # plus one forced singleton below
    "padding": dict(b=10, c=6, pad=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("t", [0.08, 0.5])
def test_matches_brute_force(name, t):
    z2, z3, labels, protos, valid = make_case(sorted(CASES).index(name), **CASES[name])
    if name == "single_member":
        labels[3] = 2
        assert (labels == 2).sum() == 1
    want = brute_balscl(z2, z3, labels, protos, valid, t)
    got = jax_loss(z2, z3, labels, protos, valid, t)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_padding_equals_dropping_rows():
    z2, z3, labels, protos, valid = make_case(3, b=9, c=4, pad=4)
    got = float(jax_loss(z2, z3, labels, protos, valid, 0.08))
    k = valid.sum()
    want = brute_balscl(z2[:k], z3[:k], labels[:k], protos, np.ones(k, bool), 0.08)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_batch_permutation_invariance():
    z2, z3, labels, protos, valid = make_case(4, b=11, c=5, pad=2)
    perm = np.random.default_rng(0).permutation(len(labels))
    a = float(jax_loss(z2, z3, labels, protos, valid, 0.08))
    b = float(jax_loss(z2[perm], z3[perm], labels[perm], protos, valid[perm], 0.08))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bf16_inputs_finite_and_close():
    z2, z3, labels, protos, valid = make_case(5, b=16, c=9, present=[0, 1, 4, 8], pad=2)
    got = jax_loss(z2, z3, labels, protos, valid, 0.08, dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32 and np.isfinite(float(got))
    # fp32 accumulation: exact (to fp32) on the bf16-rounded inputs, close to the fp64 loss.
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
               for x in (z2, z3, protos)]
    want_rounded = brute_balscl(rounded[0], rounded[1], labels, rounded[2], valid, 0.08)
    np.testing.assert_allclose(float(got), want_rounded, rtol=1e-5)
    np.testing.assert_allclose(float(got), brute_balscl(z2, z3, labels, protos, valid, 0.08),
                               rtol=3e-2)
    grads = jax.jit(jax.grad(lambda a, b, p: jax_loss(a, b, labels, p, valid, 0.08,
                                                      jnp.bfloat16), argnums=(0, 1, 2)))(
        z2.astype(np.float32), z3.astype(np.float32), protos.astype(np.float32))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_gradient_matches_torch_autograd_of_brute_force():
    z2, z3, labels, protos, valid = make_case(6, b=5, c=4, present=[0, 1, 3], pad=1)
    t = 0.3
    tz = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (z2, z3, protos)]
    # The torch port of the brute force is itself checked against finite differences.
    assert torch.autograd.gradcheck(
        lambda a, b, p: brute_balscl(a, b, labels, p, valid, t, xp=torch), tz)
    loss_t = brute_balscl(tz[0], tz[1], labels, tz[2], valid, t, xp=torch)
    loss_t.backward()
    grads = jax.jit(jax.grad(lambda a, b, p: jax_loss(a, b, labels, p, valid, t),
                             argnums=(0, 1, 2)))(*(x.astype(np.float32) for x in (z2, z3, protos)))
    for g, x in zip(grads, tz):
        np.testing.assert_allclose(np.asarray(g), x.grad.numpy(), rtol=1e-4, atol=1e-5)
    # Padding rows get exactly zero gradient.
    assert np.all(np.asarray(grads[0])[~valid] == 0) and np.all(np.asarray(grads[1])[~valid] == 0)


def test_no_nan_gradients_with_extreme_inputs():
    # Identical features, tiny temperature: large logits, all padding except one row.
    b, c, d = 4, 3, 5
    z = np.zeros((b, d), np.float32)
    z[:, 0] = 1.0
    protos = np.tile(z[:1], (c, 1))
    valid = np.array([True, False, False, False])
    labels = np.array([1, -7, 50, 2], np.int32)
    f = lambda a, b_, p: jax_loss(a, b_, labels, p, valid, 1e-3)
    loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(z, z, protos)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    # No valid rows at all: loss 0, gradients 0.
    none = jax.jit(jax.grad(lambda a: jax_loss(a, z, labels, protos, np.zeros(b, bool), 0.08)))(z)
    assert float(jax_loss(z, z, labels, protos, np.zeros(b, bool), 0.08)) == 0.0
    assert np.all(np.asarray(none) == 0)


def test_bad_shapes_raise_clear_errors():
    z2, z3, labels, protos, valid = make_case(7)
    with pytest.raises(ValueError, match="pscl.py.*prototypes"):
        jax_loss(z2, z3, labels, protos[:, :3], valid, 0.08)
    with pytest.raises(ValueError, match="pscl.py.*z2/z3"):
        jax_loss(z2, z3[:3], labels, protos, valid, 0.08)
    with pytest.raises(ValueError, match="pscl.py.*labels"):
        jax_loss(z2, z3, labels[:2], protos, valid, 0.08)


def _outputs(rng, b, c, d):
    return dict(logits=jnp.asarray(rng.standard_normal((b, c)) * 3, jnp.float32),
                z=jnp.asarray(unit(rng, b, d), jnp.float32),
                prototypes=jnp.asarray(unit(rng, c, d), jnp.float32))


def _loss_case(seed, b, c, d, padded):
    """Three views' outputs (views 2 and 3 share prototypes), labels, a validity mask with the
    last `padded` rows off, and class weights."""
    rng = np.random.default_rng(seed)
    v1, v2, v3 = _outputs(rng, b, c, d), _outputs(rng, b, c, d), _outputs(rng, b, c, d)
    v3["prototypes"] = v2["prototypes"]
    labels = rng.integers(0, c, b).astype(np.int32)
    valid = np.ones(b, bool)
    valid[-padded:] = False
    cw = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return (v1, v2, v3), labels, valid, cw


def _torch_ce(view, labels, cw, k):
    """PyTorch's weighted CE over the first k (valid) rows."""
    return torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(view["logits"])[:k], dtype=torch.float64),
        torch.tensor(labels[:k], dtype=torch.long),
        weight=torch.tensor(cw, dtype=torch.float64)).item()


def _check_scl_and_accuracy(views, labels, valid, aux, loss, ce_want):
    v1, v2, v3 = views
    k = valid.sum()
    scl = brute_balscl(np.asarray(v2["z"], np.float64), np.asarray(v3["z"], np.float64), labels,
                       np.asarray(v2["prototypes"], np.float64), valid, 0.08)
    np.testing.assert_allclose(float(aux["ce"]), ce_want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["scl"]), scl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce_want + 0.35 * scl, rtol=1e-5)
    acc = (np.asarray(v1["logits"]).argmax(-1)[:k] == labels[:k]).mean()
    np.testing.assert_allclose(float(aux["accuracy"]), acc, rtol=1e-6)


def test_stage1_loss_components():
    views, labels, valid, cw = _loss_case(8, 10, 5, 6, padded=2)
    loss, aux = jax.jit(lambda *a: stage1_loss(*a, pscl_weight=0.35, temperature=0.08,
                                               class_weights=cw))(*views, labels, valid)
    _check_scl_and_accuracy(views, labels, valid, aux, loss,
                            _torch_ce(views[0], labels, cw, valid.sum()))


def test_stage1_loss_ce_on_all_views():
    """ce_all_views: the CE is the mean of the three views' weighted CEs (PyTorch), padding
    and class weights as for view 1; the contrastive term and the accuracy are unchanged."""
    views, labels, valid, cw = _loss_case(12, 9, 4, 5, padded=3)
    loss, aux = jax.jit(lambda *a: stage1_loss(*a, pscl_weight=0.35, temperature=0.08,
                                               class_weights=cw, ce_all_views=True))(
        *views, labels, valid)
    ces = [_torch_ce(v, labels, cw, valid.sum()) for v in views]
    _check_scl_and_accuracy(views, labels, valid, aux, loss, np.mean(ces))
    with pytest.raises(ValueError, match="ce_all_views"):
        stage1_loss(views[0], None, None, labels, pscl_weight=0.0, ce_all_views=True)


def test_label_smoothing_matches_torch_and_a_weighted_loop():
    """label_smoothing=eps: unweighted, PyTorch's CrossEntropyLoss(label_smoothing=eps); with
    class weights and padding, a per-example loop: sum_i w_{y_i} CE(p_i, (1-eps) e_{y_i} +
    eps/C) / sum_i w_{y_i}. The contrastive term and the accuracy do not change."""
    eps = 0.1
    views, labels, valid, cw = _loss_case(10, 7, 4, 5, padded=2)
    k = int(valid.sum())
    loss, aux = jax.jit(lambda *a: stage1_loss(*a, pscl_weight=0.35, temperature=0.08,
                                               label_smoothing=eps))(*views, labels)
    want = torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(views[0]["logits"]), dtype=torch.float64),
        torch.tensor(labels, dtype=torch.long), label_smoothing=eps).item()
    np.testing.assert_allclose(float(aux["ce"]), want, rtol=1e-5)
    loss, aux = jax.jit(lambda *a: stage1_loss(*a, pscl_weight=0.35, temperature=0.08,
                                               class_weights=cw, ce_all_views=True,
                                               label_smoothing=eps))(*views, labels, valid)
    ces = []
    for v in views:
        logits = np.asarray(v["logits"], np.float64)
        num = den = 0.0
        for i in range(k):
            logp = logits[i] - np.log(np.exp(logits[i] - logits[i].max()).sum()) - logits[i].max()
            target = np.full(logits.shape[1], eps / logits.shape[1])
            target[labels[i]] += 1 - eps
            num += cw[labels[i]] * -(target * logp).sum()
            den += cw[labels[i]]
        ces.append(num / den)
    _check_scl_and_accuracy(views, labels, valid, aux, loss, np.mean(ces))
    with pytest.raises(ValueError, match="label_smoothing=1.0: expected 0 <= eps < 1"):
        stage1_loss(views[0], None, None, labels, pscl_weight=0.0, label_smoothing=1.0)


def test_pscl_weight_zero_is_plain_cross_entropy():
    rng = np.random.default_rng(9)
    b, c, d = 8, 4, 6
    v1, v2, v3 = _outputs(rng, b, c, d), _outputs(rng, b, c, d), _outputs(rng, b, c, d)
    labels = rng.integers(0, c, b).astype(np.int32)
    logits = np.asarray(v1["logits"], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -logp[np.arange(b), labels].mean()
    loss_none, aux = jax.jit(lambda o, y: stage1_loss(o, None, None, y, pscl_weight=0.0))(
        v1, labels)
    np.testing.assert_allclose(float(loss_none), want, rtol=1e-6)
    assert float(aux["scl"]) == 0.0
    # With all views given, weight 0 still reports scl but neither the loss nor its gradient
    # depend on views 2/3.
    f = lambda o2: stage1_loss(v1, o2, v3, labels, pscl_weight=0.0)
    (loss, aux), g = jax.jit(jax.value_and_grad(f, has_aux=True))(v2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(aux["scl"]) > 0
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g))
    with pytest.raises(ValueError, match="pscl.py.*outputs_v2"):
        stage1_loss(v1, None, None, labels, pscl_weight=0.35)
    assert math.isfinite(float(loss))


def test_sharded_batch_matches_single_device():
    """Data-parallel: the contrast set spans the whole global batch, not one shard."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several (simulated) devices")
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,))  # as parallel/
    z2, z3, labels, protos, valid = make_case(10, b=2 * len(devices), c=5, pad=3)
    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(np.asarray(x, np.float32 if x.dtype.kind == "f" else x.dtype), shard)
            for x in (z2, z3, labels)]
    got = jax.jit(balanced_contrastive_loss, static_argnums=5)(
        args[0], args[1], args[2], jnp.asarray(protos, jnp.float32),
        jax.device_put(valid, shard), 0.08)
    np.testing.assert_allclose(float(got), brute_balscl(z2, z3, labels, protos, valid, 0.08),
                               rtol=1e-5)
