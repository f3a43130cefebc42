"""The training loop every stage uses (stage 1 and stage 2).

    result = train_loop(stage_dir=workdir/'stage1', cfg=config.stage1.loop, state=state,
                        train_step=step_fn, train_iter=iter(loader), mesh=mesh, rules=rules,
                        batch_fn=..., eval_fn=..., learning_rate=schedule)

- `state`: an initialised, sharded TrainState. If `stage_dir/checkpoints` holds a checkpoint,
  the loop restores the latest one into the same shardings (and the iterator position) and
  continues from there; a finished run (latest step == num_steps) trains no further.
- `train_step(state, batch) -> (state, metrics)`: pure; metrics = dict of float32 scalars with
  at least `loss`. The loop jits it with explicit in/out shardings (state: its own shardings;
  batch: split over ('data','fsdp'); metrics: replicated) and donates the state.
- `batch_fn(local_batch) -> dict of numpy`: picks/converts this process's batch fields; the
  loop assembles the global batch with parallel.sharding.global_batch.
- `eval_fn(state, step) -> dict of floats` runs every `eval_every` steps and at the end; with
  cfg.select_metric set, the params with the best value so far go to `stage_dir/best/`.
- Logging: clu metric writers (TensorBoard + log) under stage_dir; a progress line every
  `log_every` steps with steps/s and ETA.
- NaN/Inf guard: per-step metrics are checked (at every log/save/eval point, always before a
  checkpoint is written); a non-finite value raises NonFiniteError naming the step and metric;
  the bad state is never saved, so the last good checkpoint stays the latest.
- SIGTERM: the loop saves a checkpoint at the current step and raises Preempted
  (SystemExit with status 0).
- Dispatch runs ahead of the device by at most `max_steps_in_flight` steps (default 2).
  Unbounded, the host queues steps until the next log point (up to `log_every` of them, each
  holding a batch on the device), and a SIGTERM's save waits for the whole queue: with
  `stage1_wm811k.py:cpu` on 2 CPU cores, SIGTERM to saved checkpoint took 56 s once and 16 s
  in a rerun (a preemptible VM's notice is 30 s), 6 s with the bound.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from wamglm_jax.parallel import sharding as shd
from wamglm_jax.train import checkpoint as ckpt
from wamglm_jax.train.metrics import MetricAverager, first_non_finite, format_duration, make_writer
from wamglm_jax.train.signals import PreemptionFlag
from wamglm_jax.train.state import TrainState


class NonFiniteError(RuntimeError):
    """A training metric became NaN/Inf."""


class Preempted(SystemExit):
    """Raised after the SIGTERM checkpoint is written: exits the process with status 0."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


MAX_STEPS_IN_FLIGHT = 2     # default bound on dispatch run-ahead (module docstring)


def default_loop_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        num_steps=1000,
        log_every=50,
        checkpoint_every=200,     # 0: only the final (and SIGTERM) checkpoint
        eval_every=0,             # 0: evaluate only at the end
        max_to_keep=3,
        async_checkpoint=True,
        select_metric="",         # e.g. 'val_macro_f1': keep the best params in stage_dir/best
        select_mode="max",
        inject_nan_at_step=-1,    # test hook: the batch of this step (1-based) is set to NaN
        max_steps_in_flight=MAX_STEPS_IN_FLIGHT,  # steps dispatched, not computed; 0 = no bound
    ))
    cfg.update(overrides)
    return cfg


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    step: int                        # the step reached
    final_train_loss: Optional[float]
    resumed_from: Optional[int]      # checkpoint step this run started from (None: fresh)
    wall_seconds: float              # this run + earlier runs of the same stage_dir
    history: list                    # [{'step', metric: value...}] of the logged windows
    evals: list                      # [{'step', metric: value...}] of eval_fn results
    best_step: Optional[int] = None
    best_score: Optional[float] = None


class _QuietOrbax:
    """absl log filter: drops orbax's INFO chatter so progress lines stay readable."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in (record.pathname or "")


def check_positive_number(field: str, value, hint: str = "") -> None:
    """ValueError naming `field` unless `value` is a finite number > 0."""
    try:
        ok = bool(np.isfinite(float(value))) and float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{field}={value!r}: expected a finite number > 0{hint}")


def merge_section(config, name: str, defaults: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
    """config.<name> on top of `defaults`, nested sections merged field by field; an unknown
    field (a typo in a config file or a --config override) is an error naming it."""
    given = config[name].to_dict() if name in config else {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"config.{name} has unknown fields {unknown}; known: {sorted(defaults)}")
    for k, v in given.items():
        if isinstance(v, dict):
            bad = sorted(set(v) - set(defaults[k]))
            if bad:
                raise ValueError(f"config.{name}.{k} has unknown fields {bad}; known: "
                                 f"{sorted(defaults[k])}")
            defaults[k].update(v)
        else:
            defaults[k] = v
    return defaults


def quiet_orbax_logs():
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())


def _poison(batch):
    return jax.tree.map(lambda x: np.full_like(x, np.nan) if np.issubdtype(np.asarray(x).dtype,
                                                                           np.floating) else x,
                        batch)


def wait_for_backlog(pending: list, max_in_flight: int) -> None:
    """Blocks until at most `max_in_flight` of the dispatched steps in `pending` ([(step,
    device metrics)], oldest first) are still computing: waits on the metrics of the step
    `max_in_flight` places before the newest (steps complete in order). 0: never waits."""
    if max_in_flight > 0 and len(pending) > max_in_flight:
        jax.block_until_ready(pending[-max_in_flight - 1][1])


def _summary_path(stage_dir) -> epath.Path:
    return epath.Path(stage_dir) / "train_summary.json"


def train_loop(*, stage_dir, cfg, state: TrainState, train_step: Callable,
               train_iter, mesh, rules=(), batch_fn: Callable = lambda b: b,
               eval_fn: Optional[Callable[[TrainState, int], Mapping[str, float]]] = None,
               learning_rate: Optional[Callable] = None,
               stop_at_step: Optional[int] = None, name: str = "train") -> LoopResult:
    """Runs (or resumes) training to cfg.num_steps; see the module docstring.

    `stop_at_step` ends this run early (after saving a checkpoint there) without changing the
    schedule: used to test that stopping and resuming equals an uninterrupted run.
    """
    t_start = time.time()
    in_flight = int(cfg.get("max_steps_in_flight", MAX_STEPS_IN_FLIGHT))
    if in_flight < 0:
        raise ValueError(f"{name}: config loop.max_steps_in_flight={in_flight}: expected >= 0 "
                         "(0 = unbounded)")
    if os.environ.get("WAMGLM_VERBOSE_ORBAX", "0") != "1":
        quiet_orbax_logs()
    stage_dir = epath.Path(stage_dir).absolute()
    stage_dir.mkdir(parents=True, exist_ok=True)
    num_steps = int(cfg.num_steps)
    checkpointer = ckpt.Checkpointer(stage_dir / "checkpoints", save_every=cfg.checkpoint_every,
                                     max_to_keep=cfg.max_to_keep, async_save=cfg.async_checkpoint)
    best = ckpt.BestKeeper(stage_dir / "best", mode=cfg.select_mode) if cfg.select_metric else None
    previous_wall, final_loss = 0.0, None
    if _summary_path(stage_dir).exists():
        summary = json.loads(_summary_path(stage_dir).read_text())
        previous_wall, final_loss = summary.get("wall_seconds", 0.0), summary.get("final_train_loss")

    state_sh = jax.tree.map(lambda x: x.sharding, state)
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
        state, iter_state = checkpointer.restore(
            state.replace(**ckpt.abstract_like(state.to_checkpoint())), resumed_from)
        if iter_state is not None and hasattr(train_iter, "set_state"):
            train_iter.set_state(iter_state)
        logging.info("%s: resumed from %s/%d", name, checkpointer.directory, resumed_from)
    step = int(jax.device_get(state.step))
    if step > num_steps:
        raise ckpt.CheckpointMismatchError(
            f"{checkpointer.directory}: latest checkpoint is at step {step} but this config has "
            f"num_steps={num_steps}; use another --workdir or raise num_steps")

    batch_sh = shd.data_sharding(mesh)
    with shd.activate(mesh, rules):
        jit_step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                           out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)
    writer = make_writer(str(stage_dir / "logs"))
    averager = MetricAverager()
    pending: list = []               # [(step, device metrics)] not yet checked/averaged
    history, evals = [], []
    window_t, window_step = time.time(), step
    end = num_steps if stop_at_step is None else min(num_steps, int(stop_at_step))

    def flush():
        """Checks pending metrics for NaN/Inf (oldest first) and adds them to the averager."""
        nonlocal pending
        host = [(s, jax.device_get(m)) for s, m in pending]
        pending = []
        bad = first_non_finite(host)
        if bad is not None:
            s, key, value = bad
            good = checkpointer.latest_step()
            raise NonFiniteError(
                f"{name}: metric '{key}' is {value} at step {s}; training stopped. The bad "
                f"state was not saved; the last good checkpoint is "
                f"{checkpointer.directory}/{good}" if good is not None else
                f"{name}: metric '{key}' is {value} at step {s}; training stopped (no "
                f"checkpoint had been written yet).")
        for _, m in host:
            averager.add(m)

    def log_window():
        nonlocal window_t, window_step, final_loss
        values = averager.compute_and_reset()
        if not values:
            return
        now = time.time()
        rate = (step - window_step) / max(now - window_t, 1e-9)
        window_t, window_step = now, step
        final_loss = values.get("loss", final_loss)
        scalars = {f"train/{k}": v for k, v in values.items()}
        scalars["train/steps_per_sec"] = rate
        if learning_rate is not None:
            scalars["train/learning_rate"] = float(learning_rate(step))
        writer.write_scalars(step, scalars)
        history.append({"step": step, **values})
        shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
        eta = (end - step) / rate if rate > 0 else float("inf")
        logging.info("%s step %d/%d (%.0f%%) %s | %.2f steps/s | ETA %s", name, step, num_steps,
                     100.0 * step / max(num_steps, 1), shown, rate,
                     format_duration(eta) if np.isfinite(eta) else "?")

    def save(force=False):
        it_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
        return checkpointer.save(step, state, it_state, force=force)

    def run_eval():
        if eval_fn is None:
            return
        with shd.activate(mesh, rules):
            values = {k: float(v) for k, v in eval_fn(state, step).items()}
        writer.write_scalars(step, {f"eval/{k}": v for k, v in values.items()})
        evals.append({"step": step, **values})
        logging.info("%s eval at step %d: %s", name, step,
                     " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
        if best is not None:
            if cfg.select_metric not in values:
                raise KeyError(f"select_metric {cfg.select_metric!r} not among eval metrics "
                               f"{sorted(values)}")
            if best.update(step, state, values[cfg.select_metric]):
                logging.info("%s: new best %s=%.4f at step %d", name, cfg.select_metric,
                             values[cfg.select_metric], step)

    try:
        with PreemptionFlag() as preempt, shd.activate(mesh, rules):
            while step < end:
                local = next(train_iter)
                if step + 1 == cfg.inject_nan_at_step:
                    local = _poison(local)
                batch = shd.global_batch(batch_fn(local), mesh)
                state, metrics = jit_step(state, batch)
                step += 1
                pending.append((step, metrics))
                wait_for_backlog(pending, in_flight)
                is_log = cfg.log_every > 0 and step % cfg.log_every == 0
                is_eval = cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < num_steps
                is_ckpt = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
                if preempt.is_set():
                    flush()
                    log_window()
                    save(force=True)
                    checkpointer.wait()
                    logging.warning("%s: preempted; saved checkpoint %d, exiting with status 0",
                                    name, step)
                    raise Preempted(step)
                if is_log or is_eval or is_ckpt or step == end:
                    flush()
                if is_log:
                    log_window()
                if is_eval:
                    run_eval()
                if is_ckpt:
                    save()
            flush()
            log_window()
            if step == num_steps and (resumed_from != num_steps or
                                      (best is not None and best.best()[0] is None)):
                run_eval()                              # the final evaluation
            save(force=True)
            checkpointer.wait()
    finally:
        try:
            checkpointer.close()
        finally:
            writer.flush()
    wall = previous_wall + time.time() - t_start
    if jax.process_index() == 0:
        _summary_path(stage_dir).write_text(json.dumps(
            {"steps": step, "final_train_loss": final_loss, "wall_seconds": wall}, indent=2))
    best_step, best_score = best.best() if best is not None else (None, None)
    if best is not None:
        best.close()
    return LoopResult(state=state, step=step, final_train_loss=final_loss,
                      resumed_from=resumed_from, wall_seconds=wall, history=history,
                      evals=evals, best_step=best_step, best_score=best_score)
