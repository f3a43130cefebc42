"""Orbax checkpointing for every stage: `workdir/<stage>/checkpoints/<step>/{state,data_iter}`.

- `state`: StandardSave of TrainState.to_checkpoint() (step, params, opt_state, batch_stats, rng).
- `data_iter`: the data iterator position (grain `get_state()`), one JSON file per process,
  captured synchronously at save time (the iterator keeps moving while the async save runs).
- Saves are async (orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames on commit, so
  a process killed mid-save leaves a tmp dir that is never listed as a step).
- `restore` restores into an abstract, sharded TrainState (ShapeDtypeStruct leaves with
  shardings); a checkpoint whose tree/shapes differ raises CheckpointMismatchError and is
  never deleted.
- `BestKeeper`: a second manager (`workdir/<stage>/best/`, max_to_keep=1) holding the params
  with the best validation score so far, for model selection on `val`.

Test hook: WAMGLM_TEST_BLOCK_SAVE=<file> (optionally WAMGLM_TEST_BLOCK_SAVE_STEP=<n>, default
any step) makes the `data_iter` write of a save create <file> and then sleep forever, so a test
can SIGKILL the process in the middle of a checkpoint save.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from wamglm_jax.train.state import TrainState

BLOCK_ENV = "WAMGLM_TEST_BLOCK_SAVE"
BLOCK_STEP_ENV = "WAMGLM_TEST_BLOCK_SAVE_STEP"


class CheckpointMismatchError(RuntimeError):
    """The checkpoint on disk does not fit the model/optimizer this run builds."""


# ---------------------------------------------------------------- data iterator item
def encode_iter_state(state) -> str:
    """grain DataLoader iterators give bytes; dataset iterators give a JSON-able dict."""
    if isinstance(state, (bytes, bytearray)):
        return json.dumps({"kind": "bytes", "state": bytes(state).decode()})
    return json.dumps({"kind": "json", "state": state})


def decode_iter_state(text: str):
    obj = json.loads(text)
    return obj["state"].encode() if obj["kind"] == "bytes" else obj["state"]


class IterStateHandler(ocp.CheckpointHandler):
    """Writes/reads `process_<i>-of-<n>.json` (the same layout as grain's orbax handler)."""

    def _file(self, directory) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory, args: "IterStateSave"):
        block = os.environ.get(BLOCK_ENV)
        if block and int(os.environ.get(BLOCK_STEP_ENV, "-1")) in (-1, args.step):
            # Test hook: the tmp checkpoint dir exists and is half written; never returns.
            epath.Path(block).write_text(str(args.step))
            while True:
                time.sleep(60)
        self._file(directory).write_text(args.text)

    def restore(self, directory, args: "IterStateRestore" = None) -> Optional[str]:
        f = self._file(directory)
        return f.read_text() if f.exists() else None

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


def saved_tree(path) -> Any:
    """The saved structure of the orbax pytree item at `path` (e.g. `.../<step>/state`):
    nested mappings whose leaves carry .shape and .dtype, read from the item's own metadata
    without restoring any array. Read through the item handler: a Checkpointer's metadata()
    would also look for step-level metadata inside the item directory and log a warning that
    it is missing. Orbax versions wrap the tree as `.tree` or return it bare."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(epath.Path(path))
    finally:
        handler.close()
    return getattr(meta, "tree", meta)


@ocp.args.register_with_handler(IterStateHandler, for_save=True)
@dataclasses.dataclass
class IterStateSave(ocp.args.CheckpointArgs):
    text: str
    step: int = -1


@ocp.args.register_with_handler(IterStateHandler, for_restore=True)
@dataclasses.dataclass
class IterStateRestore(ocp.args.CheckpointArgs):
    pass


# ---------------------------------------------------------------- helpers
def abstract_like(tree, shardings=None):
    """ShapeDtypeStruct leaves (with shardings, when given or when the leaves are jax Arrays)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shape_table(tree) -> dict:
    """{'opt_state/0/mu/a/kernel': (shape, dtype)}; namedtuples and dicts, tuples and lists
    spell the same (orbax metadata stores optax states as dicts/lists)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(p) for p in k): (tuple(v.shape), str(np.dtype(v.dtype)))
            for k, v in flat}


def _check_compatible(directory, step, saved_meta, abstract_tree):
    saved, want = _shape_table(saved_meta), _shape_table(abstract_tree)
    problems = []
    for k in sorted(set(saved) | set(want)):
        if k not in saved:
            problems.append(f"{k}: missing in the checkpoint")
        elif k not in want:
            problems.append(f"{k}: in the checkpoint but not in this run's state")
        elif saved[k][0] != want[k][0] or saved[k][1] != want[k][1]:
            problems.append(f"{k}: checkpoint {saved[k]} vs this run {want[k]}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {directory}/{step} was written by a different model/optimizer config "
            f"({len(problems)} differences, first: {'; '.join(problems[:5])}). Nothing was "
            f"deleted: use another --workdir, or move that directory away yourself.")


# ---------------------------------------------------------------- manager
class Checkpointer:
    """One Orbax CheckpointManager for a stage's resumable state (see module docstring)."""

    def __init__(self, directory, *, save_every: int, max_to_keep: int = 3,
                 async_save: bool = True):
        self.directory = epath.Path(directory).absolute()
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=max(1, self.save_every),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data_iter": IterStateHandler()})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, iter_state=None, *, force: bool = False) -> bool:
        """Async save (returns at once once the arrays are copied); True when a save started.
        Without `force`, only every `save_every` steps."""
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state.to_checkpoint())}
        if iter_state is not None:
            items["data_iter"] = IterStateSave(text=encode_iter_state(iter_state), step=int(step))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: TrainState, step: Optional[int] = None):
        """-> (TrainState, iterator state or None). `abstract_state`: TrainState whose array
        leaves are ShapeDtypeStructs with shardings (see `abstract_like`)."""
        step = self.latest_step() if step is None else step
        target = abstract_state.to_checkpoint()
        meta = self.manager.item_metadata(step)
        saved = meta["state"] if "state" in meta else None
        if saved is not None:
            _check_compatible(self.directory, step, saved, target)
        items = {"state": ocp.args.StandardRestore(target)}
        has_iter = (self.directory / str(step) / "data_iter").exists()
        if has_iter:
            items["data_iter"] = IterStateRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatchError(
                f"cannot restore {self.directory}/{step} into this run's state: {e}. Nothing "
                f"was deleted: use another --workdir, or move that directory away.") from e
        state = abstract_state.from_checkpoint(restored["state"])
        text = restored["data_iter"] if has_iter else None
        return state, (decode_iter_state(text) if text else None)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


class BestKeeper:
    """Keeps the params (+ batch_stats, step) with the best `score` seen so far."""

    def __init__(self, directory, *, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"best checkpoint mode must be 'max' or 'min', got {mode!r}")
        self.mode = mode
        self.directory = epath.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m["score"], best_mode=mode,
                keep_checkpoints_without_metrics=False, enable_async_checkpointing=False),
            item_names=("state",))

    def best(self) -> tuple[Optional[int], Optional[float]]:
        step = self.manager.best_step()
        if step is None:
            return None, None
        path = self.directory / str(step) / "metrics" / "metrics"
        return step, float(json.loads(path.read_text())["score"]) if path.exists() else None

    def _better(self, score: float) -> bool:
        _, best = self.best()
        return best is None or (score > best if self.mode == "max" else score < best)

    def update(self, step: int, state: TrainState, score: float) -> bool:
        """Saves when `score` beats the best so far (and is finite). True when saved."""
        if not np.isfinite(score) or not self._better(score) or step in self.manager.all_steps():
            return False
        tree = dict(step=state.step, params=state.params, batch_stats=state.batch_stats)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)),
                          metrics={"score": float(score)}, force=True)
        self.manager.wait_until_finished()
        return True

    def restore(self, abstract_state: TrainState) -> Optional[TrainState]:
        """The best params/batch_stats put into `abstract_state`'s structure, or None."""
        step, _ = self.best()
        if step is None:
            return None
        target = dict(step=abstract_state.step, params=abstract_state.params,
                      batch_stats=abstract_state.batch_stats)
        tree = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
        return abstract_state.replace(**tree)

    def close(self):
        self.manager.close()
