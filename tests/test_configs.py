"""Every configs/*.py loads (via ml_collections config_flags, with each documented arg), its stages
exist and its mesh resolves; `python -m wamglm_jax.main` runs the shapes stage. (Each preset's
parameter count against an independent formula: tests/test_presets.py.)
"""
import glob
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, presets
from test_presets import formula   # independent parameter-count formula (tests/ is on sys.path)
from wamglm_jax import main as main_lib
from wamglm_jax.parallel import mesh as mesh_lib
from wamglm_jax.parallel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if os.path.basename(p) not in ("__init__.py", "common.py"))


def _documented_args(path):
    """'' (the default) + every `configs/<file>.py:<arg>` in the file + CONFIG_ARGS if any."""
    name = os.path.basename(path)
    src = open(path).read()
    args = {""} | set(re.findall(rf"configs/{re.escape(name)}:(\w+)", src))
    module = importlib.import_module(f"configs.{name[:-3]}")
    args |= set(getattr(module, "CONFIG_ARGS", ()))
    if name == "presets.py":
        args |= set(presets.PRESETS)
    return sorted(args)


CASES = [(os.path.relpath(p, ROOT), a) for p in CONFIG_FILES for a in _documented_args(p)]


def _load_via_flags(rel_path, arg):
    spec = f"{rel_path}:{arg}" if arg else rel_path
    argv = ["prog", f"--config={os.path.join(ROOT, spec)}", "--config.seed=7"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_every_config_file_is_covered():
    assert {os.path.basename(p) for p in CONFIG_FILES} >= {"presets.py"}
    assert ("configs/presets.py", "pod7b") in CASES


@pytest.mark.parametrize("rel_path,arg", CASES)
def test_config_loads(rel_path, arg):
    config = _load_via_flags(rel_path, arg)
    assert config.seed == 7                     # --config.x=v overrides reach the config
    full = common.with_defaults(config)
    assert len(full.stages) >= 1
    for stage in full.stages:
        assert callable(main_lib.load_stage(stage)), stage
    mesh = mesh_lib.make_mesh(full.mesh)         # resolves on the 8 test devices
    assert mesh.devices.size == 8
    rules = sharding.rules_from_config(full)
    assert {"batch", "embed", "mlp", "heads", "vocab", "layers"} <= {r[0] for r in rules}
    for key in ("vit", "projector", "lm", "dtype", "remat", "scan_layers", "image_token_id"):
        assert key in full.model, key
    json.loads(full.to_json_best_effort())     # what main writes to config.json


def test_bad_preset_and_missing_stage_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'"):
        presets.get_config("huge")
    with pytest.raises(main_lib.StageNotFoundError, match=r"wamglm_jax/train/nosuch\.py"):
        main_lib.load_stage("nosuch")
    with pytest.raises(ValueError, match=r"no `stages` field"):
        common.with_defaults(presets.model_config("tiny"))


def test_main_runs_shapes_stage(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "wamglm_jax.main", "--config=configs/presets.py:tiny",
         f"--workdir={tmp_path}", "--config.mesh.tensor=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    shapes = json.load(open(tmp_path / "shapes.json"))
    assert shapes["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert shapes["summary"]["params_total"] == sum(
        formula(presets.model_config("tiny")).values())
    config = json.load(open(tmp_path / "config.json"))
    assert config["stages"] == ["shapes"] and config["mesh"]["tensor"] == 2
    # a missing stage module is named in the error
    bad = subprocess.run(
        [sys.executable, "-m", "wamglm_jax.main", "--config=configs/presets.py:tiny",
         f"--workdir={tmp_path}/bad", "--config.stages=shapes,nosuch"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no module wamglm_jax.train.nosuch" in bad.stderr
    assert not (tmp_path / "bad" / "shapes.json").exists()     # checked before any stage ran
