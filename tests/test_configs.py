"""Every configs/*.py loads (via ml_collections config_flags, with each documented arg), its stages
exist and its mesh resolves; every preset's parameter count matches an independent formula
(jax.eval_shape only: the 7B preset is never materialised); `python -m wamglm_jax.main` runs.
"""
import glob
import importlib
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, presets
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


def _expected_params(m):
    """Parameter count of SigLIP tower (no head) + LLaVA mlp2x_gelu + Llama, from the config."""
    v, lm = m.vit, m.lm
    d, i = v.hidden_size, v.intermediate_size
    n = (v.image_size // v.patch_size) ** 2
    vision = (v.patch_size ** 2 * v.num_channels * d + d + n * d          # patch conv, positions
              + v.num_layers * (2 * 2 * d + 4 * (d * d + d) + d * i + i + i * d + d)
              + 2 * d)                                                     # post_layernorm
    D = lm.hidden_size
    projector = d * D + D + D * D + D
    attn = D * lm.num_heads * lm.head_dim * 2 + D * lm.num_kv_heads * lm.head_dim * 2
    text = (lm.vocab_size * D + lm.num_layers * (2 * D + attn + 3 * D * lm.intermediate_size)
            + D + (0 if lm.tie_embeddings else D * lm.vocab_size))
    return dict(vision=vision, projector=projector, lm=text)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_param_count_by_formula(name):
    from wamglm_jax.models.wamglm import WamGLM, num_image_tokens
    m = presets.model_config(name)
    t = num_image_tokens(m) + 4
    s = m.vit.image_size
    abstract = jax.eval_shape(
        WamGLM(config=m).init, jax.random.key(0), jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), jnp.int32))
    params = sharding.unbox_values(abstract)["params"]
    got = {k: sum(math.prod(x.shape) for x in jax.tree.leaves(params[k])) for k in params}
    assert got == _expected_params(m)
    if name == "pod7b":
        assert 6.5e9 < got["lm"] < 7e9 and 3.5e8 < got["vision"] < 4.5e8   # 7B LM, 400M ViT
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


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
        _expected_params(presets.model_config("tiny")).values())
    config = json.load(open(tmp_path / "config.json"))
    assert config["stages"] == ["shapes"] and config["mesh"]["tensor"] == 2
    # a missing stage module is named in the error
    bad = subprocess.run(
        [sys.executable, "-m", "wamglm_jax.main", "--config=configs/presets.py:tiny",
         f"--workdir={tmp_path}/bad", "--config.stages=shapes,nosuch"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no module wamglm_jax.train.nosuch" in bad.stderr
    assert not (tmp_path / "bad" / "shapes.json").exists()     # checked before any stage ran
