"""Optimizer: schedule against the closed-form formula; freezing keeps frozen params exact."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wamglm_jax.train import optim
from wamglm_jax.train.state import TrainState


def _expected_lr(step, peak, warmup, total, end):
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


def test_schedule_matches_formula():
    cfg = optim.default_optimizer_config(learning_rate=2e-3, warmup_steps=10, end_lr_fraction=0.1)
    sched = optim.learning_rate_schedule(cfg, 100)
    for s in [0, 1, 5, 10, 11, 50, 99, 100, 150]:
        assert float(sched(s)) == pytest.approx(_expected_lr(s, 2e-3, 10, 100, 2e-4), rel=1e-5, abs=1e-9)
    # warm-up given as a fraction of the run
    cfg = optim.default_optimizer_config(learning_rate=1.0, warmup_steps=-1, warmup_fraction=0.2)
    sched = optim.learning_rate_schedule(cfg, 50)
    assert float(sched(5)) == pytest.approx(0.5) and float(sched(10)) == pytest.approx(1.0)


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"vision": {"dense": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jnp.ones(3)}},
            "head": {"kernel": jax.random.normal(k[1], (3, 2)), "bias": jnp.zeros(2)}}


def _run(cfg, steps=3):
    params = _params()
    tx, _ = optim.make_optimizer(cfg, 10, params)
    state = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(1))
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.ones_like(p), state.params)
        state = state.apply_gradients(grads)
    return params, state


def test_freeze_by_regex_keeps_params_exact():
    cfg = optim.default_optimizer_config(learning_rate=0.1, warmup_steps=0, weight_decay=0.1,
                                         freeze=("^vision/",))
    before, state = _run(cfg)
    np.testing.assert_array_equal(state.params["vision"]["dense"]["kernel"], before["vision"]["dense"]["kernel"])
    np.testing.assert_array_equal(state.params["vision"]["dense"]["bias"], before["vision"]["dense"]["bias"])
    assert not np.allclose(state.params["head"]["kernel"], before["head"]["kernel"])
    assert int(state.step) == 3


def test_trainable_regex_and_weight_decay_mask():
    cfg = optim.default_optimizer_config(learning_rate=0.1, warmup_steps=0, weight_decay=0.5,
                                         trainable=("head/kernel",), grad_clip_norm=0.0)
    before, state = _run(cfg, steps=1)
    np.testing.assert_array_equal(state.params["head"]["bias"], before["head"]["bias"])
    # One AdamW step with warm-up 0: lr(0)=0.1, adam direction sign(g)=1, decay on the kernel.
    expected = before["head"]["kernel"] - 0.1 * (1.0 + 0.5 * before["head"]["kernel"])
    np.testing.assert_allclose(state.params["head"]["kernel"], expected, rtol=1e-5, atol=1e-6)
    mask = optim.trainable_mask(before, freeze=("bias",))
    assert mask["head"]["kernel"] and not mask["head"]["bias"]


def test_bad_freeze_config_errors():
    with pytest.raises(ValueError, match="bad regex"):
        optim.trainable_mask(_params(), freeze=("(",))
    with pytest.raises(ValueError, match="no trainable"):
        optim.make_optimizer(optim.default_optimizer_config(freeze=(".*",)), 10, _params())
