"""Entry point: run the stages of a config on a device mesh.

    python -m wamglm_jax.main --config=configs/<file>.py[:arg] --workdir=DIR [--config.a.b=v ...]
    multi-host:  ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                 (on a Cloud TPU pod / SLURM allocation the three may be left out: auto-detect)

Steps: (multi-host init) -> resolve the config (missing mesh / sharding_rules / seed sections
get the defaults of configs/common.py) -> write DIR/config.json (process 0) -> build the mesh
from config.mesh -> enter it with `jax.set_mesh` and the logical-axis rules of
config.sharding_rules -> for each name in config.stages, import `wamglm_jax.train.<name>` and
call its `run(config, workdir, mesh)` (or `run(config, workdir)` if it takes two arguments).
"""
from __future__ import annotations

import importlib
import inspect

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from configs import common
from wamglm_jax.parallel import mesh as mesh_lib
from wamglm_jax.parallel import multihost, sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/quickstart.py or configs/presets.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.",
                               required=True)
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "Multi-host: HOST:PORT of process 0's coordinator.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


class StageNotFoundError(RuntimeError):
    pass


def load_stage(name: str):
    """The `run` function of wamglm_jax.train.<name>, with a clear error if there is none."""
    module_name = f"wamglm_jax.train.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise StageNotFoundError(
                f"config.stages names {name!r} but there is no module {module_name} "
                f"(expected file wamglm_jax/train/{name}.py defining run(config, workdir, mesh))"
            ) from None
        raise
    run = getattr(module, "run", None)
    if not callable(run):
        raise StageNotFoundError(f"{module_name} has no function run(config, workdir, mesh)")
    return run


def _call_stage(run, config, workdir, mesh):
    params = inspect.signature(run).parameters
    if "mesh" in params or len(params) >= 3:
        return run(config, workdir, mesh)
    return run(config, workdir)


def run_stages(config, workdir: str) -> None:
    """Everything main does after flag parsing and multi-host init (also usable from Python)."""
    config = common.with_defaults(config)
    stages = config.stages
    if isinstance(stages, str):
        stages = (stages,)
    # --config.stages=stage1,stage2 arrives as ('stage1,stage2',): split on commas
    stages = tuple(p.strip() for s in stages for p in str(s).split(",") if p.strip())
    if not stages:
        raise ValueError("config.stages is empty: nothing to run")
    runs = [load_stage(s) for s in stages]          # fail before any work if one is missing
    if multihost.is_main_process():
        out = epath.Path(workdir)                   # local path or gs://... (pods)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    mesh = mesh_lib.make_mesh(config.mesh)
    multihost.log_main("%s; stages %s; workdir %s", mesh_lib.describe(mesh), stages, workdir)
    with sharding.activate(mesh, sharding.rules_from_config(config)):
        for name, run in zip(stages, runs):
            multihost.log_main("stage %s: start", name)
            _call_stage(run, config, workdir, mesh)
            multihost.log_main("stage %s: done", name)
    multihost.sync("wamglm_main_done")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/presets.py:tiny")
    multihost.maybe_initialize(_COORD.value, _NPROC.value, _PID.value)
    logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    run_stages(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
