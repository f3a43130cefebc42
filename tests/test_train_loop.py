"""Generic loop + checkpointing on a toy regression model fed by a real grain DataLoader.

Run as a script (`python tests/test_train_loop.py WORKDIR NUM_STEPS CKPT_EVERY [STARTED_FILE]`)
it trains the toy in a subprocess: used for the SIGTERM and SIGKILL-mid-save tests.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wamglm_jax.parallel import sharding as shd
from wamglm_jax.train import checkpoint as ckpt
from wamglm_jax.train import loop, optim
from wamglm_jax.train.state import TrainState

ROOT = Path(__file__).resolve().parents[1]


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(16)(x)))[:, 0]


def make_loader(seed=0, n=256):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8) + 0.1 * rng.normal(size=n)).astype(np.float32)
    source = [{"x": x[i], "y": y[i]} for i in range(n)]
    sampler = grain.IndexSampler(n, shard_options=grain.NoSharding(), shuffle=True,
                                 num_epochs=None, seed=seed)
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[grain.Batch(16, drop_remainder=True)], worker_count=0)


def train_step(state, batch):
    def loss_fn(p):
        return jnp.mean((Toy().apply({"params": p}, batch["x"]) - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.global_norm(grads)}


def make_state(mesh, num_steps):
    params = Toy().init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))["params"]
    tx, sched = optim.make_optimizer(optim.default_optimizer_config(learning_rate=1e-2), num_steps, params)
    state = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(1))
    return jax.device_put(state, shd.replicated(mesh)), sched


def run(workdir, num_steps, ckpt_every=2, stop_at_step=None, batch_fn=lambda b: b, **cfg):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
    state, sched = make_state(mesh, num_steps)
    cfg = loop.default_loop_config(num_steps=num_steps, log_every=2, checkpoint_every=ckpt_every,
                                   **cfg)
    return loop.train_loop(stage_dir=Path(workdir) / "toy", cfg=cfg, state=state,
                           train_step=train_step, train_iter=iter(make_loader()), mesh=mesh,
                           batch_fn=batch_fn, learning_rate=sched, stop_at_step=stop_at_step,
                           eval_fn=lambda s, step: {"neg_step": -float(step)})


def _params_np(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_resume_equals_uninterrupted(tmp_path):
    full = run(tmp_path / "a", 8)
    part = run(tmp_path / "b", 8, stop_at_step=3)
    assert part.step == 3 and part.resumed_from is None
    rest = run(tmp_path / "b", 8)
    assert rest.resumed_from == 3 and rest.step == 8
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 _params_np(full.state), _params_np(rest.state))
    assert np.isfinite(full.final_train_loss)
    # A finished run trains no further.
    again = run(tmp_path / "b", 8)
    assert again.resumed_from == 8 and again.step == 8
    jax.tree.map(np.testing.assert_array_equal, _params_np(again.state), _params_np(rest.state))
    summary = json.loads((tmp_path / "b" / "toy" / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["wall_seconds"] > 0
    assert any(p.name.startswith("events") for p in (tmp_path / "a" / "toy" / "logs").iterdir())


def test_best_checkpoint_selection(tmp_path):
    res = run(tmp_path, 6, eval_every=2, select_metric="neg_step", select_mode="max")
    assert [e["step"] for e in res.evals] == [2, 4, 6]
    assert res.best_step == 2 and res.best_score == -2.0
    keeper = ckpt.BestKeeper(tmp_path / "toy" / "best", mode="max")
    best = keeper.restore(res.state.replace(**ckpt.abstract_like(res.state.to_checkpoint())))
    assert int(best.step) == 2


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteError, match=r"metric '(grad_norm|loss)' is nan at step 5"):
        run(tmp_path, 10, ckpt_every=2, inject_nan_at_step=5)
    c = ckpt.Checkpointer(tmp_path / "toy" / "checkpoints", save_every=2)
    assert c.latest_step() == 4 and 6 not in c.all_steps()
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
    state, _ = make_state(mesh, 10)
    restored, it_state = c.restore(state.replace(**ckpt.abstract_like(state.to_checkpoint())))
    assert int(restored.step) == 4 and it_state is not None
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params_np(restored)))
    # Identical to an independent clean run stopped at step 4.
    clean = run(tmp_path / "clean", 10, stop_at_step=4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 _params_np(restored), _params_np(clean.state))
    c.close()


def test_mismatched_checkpoint_raises_and_keeps_files(tmp_path):
    run(tmp_path, 4, stop_at_step=2)
    c = ckpt.Checkpointer(tmp_path / "toy" / "checkpoints", save_every=2)
    params = {"other": jnp.zeros((3, 3))}
    tx = optax.adamw(1e-3)
    bad = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(0))
    with pytest.raises(ckpt.CheckpointMismatchError, match="Nothing was deleted"):
        c.restore(bad.replace(**ckpt.abstract_like(bad.to_checkpoint())))
    assert c.all_steps() == [2] and (tmp_path / "toy" / "checkpoints" / "2" / "state").exists()
    c.close()


def _spawn(workdir, num_steps, ckpt_every, started, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(Path(workdir).parent / f"{Path(workdir).name}.{time.time_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, __file__, str(workdir), str(num_steps),
                             str(ckpt_every), str(started)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, log


def _wait_for(path, proc, log, timeout=120):
    t = time.time()
    while not Path(path).exists():
        if proc.poll() is not None or time.time() - t > timeout:
            log.seek(0)
            proc.kill()
            raise AssertionError(f"subprocess never reached {path}:\n{log.read()[-3000:]}")
        time.sleep(0.1)


def test_sigterm_saves_and_exits_zero(tmp_path):
    started = tmp_path / "started"
    proc, log = _spawn(tmp_path / "w", 100000, 0, started)
    _wait_for(started, proc, log)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    log.seek(0)
    text = log.read()
    assert rc == 0, text[-3000:]
    c = ckpt.Checkpointer(tmp_path / "w" / "toy" / "checkpoints", save_every=0)
    step = c.latest_step()
    assert step is not None and 3 <= step < 100000, text[-3000:]
    assert (c.directory / str(step) / "data_iter").exists() and "preempted" in text
    c.close()


def test_sigkill_mid_save_resumes_from_last_complete(tmp_path):
    blocked = tmp_path / "blocked"
    proc, log = _spawn(tmp_path / "w", 10, 2, tmp_path / "unused",
                       {ckpt.BLOCK_ENV: str(blocked), ckpt.BLOCK_STEP_ENV: "6"})
    _wait_for(blocked, proc, log)
    assert blocked.read_text() == "6"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    cdir = tmp_path / "w" / "toy" / "checkpoints"
    names = sorted(p.name for p in cdir.iterdir())
    assert any(n.startswith("6.") and "tmp" in n for n in names), names     # the half save
    assert "6" not in names and {"2", "4"} <= set(names)
    proc, log = _spawn(tmp_path / "w", 10, 2, tmp_path / "unused")
    assert proc.wait(timeout=180) == 0
    log.seek(0)
    text = log.read()
    assert "resumed from" in text and text.split("resumed from")[1].split()[0].endswith("/4"), text[-3000:]
    c = ckpt.Checkpointer(cdir, save_every=2)
    assert c.latest_step() == 10 and 6 in c.all_steps()
    c.close()


if __name__ == "__main__":
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.use_absl_handler()
    workdir, num_steps, every, started = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    calls = []

    def batch_fn(b):
        calls.append(1)
        if len(calls) == 3:
            Path(started).write_text("3")
        if num_steps > 1000:
            time.sleep(0.02)
        return b
    run(workdir, num_steps, ckpt_every=every, batch_fn=batch_fn)


class _Step:
    """Stands for a dispatched step's device metrics: records when it is waited on."""

    def __init__(self, log, step):
        self.log, self.step = log, step

    def block_until_ready(self):
        self.log.append(self.step)
        return self


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_wait_for_backlog_keeps_at_most_max_in_flight_steps_computing(max_in_flight):
    # Dispatch steps 1..10 one by one, as the loop does. After step s is dispatched the loop
    # must have waited for step s - max_in_flight (the newest step that may not still be
    # computing), so steps (s - max_in_flight, s] are the only ones possibly in flight.
    waited, pending = [], []
    for s in range(1, 11):
        pending.append((s, {"loss": _Step(waited, s)}))
        loop.wait_for_backlog(pending, max_in_flight)
        must_be_done = s - max_in_flight
        if must_be_done >= 1:
            assert waited[-1] == must_be_done
        else:
            assert waited == []
    assert waited == list(range(1, 11 - max_in_flight))


def test_wait_for_backlog_zero_never_waits():
    waited = []
    pending = [(s, {"loss": _Step(waited, s)}) for s in range(1, 50)]
    loop.wait_for_backlog(pending, 0)
    assert waited == []


def test_negative_max_steps_in_flight_is_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"loop.max_steps_in_flight=-1: expected >= 0"):
        run(tmp_path, 4, max_steps_in_flight=-1)
    assert not (tmp_path / "toy").exists()


def test_unbounded_dispatch_trains_the_same_as_bounded(tmp_path):
    # The bound only changes when the host waits, never what is computed.
    bounded = run(tmp_path / "a", 6, max_steps_in_flight=1)
    unbounded = run(tmp_path / "b", 6, max_steps_in_flight=0)
    for x, y in zip(jax.tree.leaves(_params_np(bounded.state)),
                    jax.tree.leaves(_params_np(unbounded.state))):
        np.testing.assert_array_equal(x, y)
