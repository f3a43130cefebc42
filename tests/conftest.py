"""Test-wide set-up: 8 simulated CPU devices (must happen before jax is imported), and a
per-run temporary directory (tfds' DatasetInfo.initialize_from_bucket makes an empty
`mkdtemp("tfds")` directory for every builder it constructs and never removes it; under pytest
those land in pytest's own, rotated, base temp instead of piling up in /tmp)."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="session")
def _session_tempdir(tmp_path_factory):
    old, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tempfile"))
    yield                                   # (subprocesses the tests start inherit TMPDIR)
    tempfile.tempdir = old
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (run in CI too)")


@pytest.fixture(scope="session")
def tiny_stage2_run(tmp_path_factory):
    """A tiny stage-2 run directory (no stage 1: random tower) trained for a few steps; shared
    by the tools that read one (chat, probe_share)."""
    from configs import quickstart
    from wamglm_jax.parallel import sharding as shd
    from wamglm_jax.parallel.mesh import make_mesh
    from wamglm_jax.train import stage2
    wd = tmp_path_factory.mktemp("tiny_stage2_run")
    config = quickstart.get_config("ci")
    config.stages = ("stage2",)
    config.model.vit.image_size = 16
    config.data.num_train, config.data.num_val, config.data.num_test = 48, 8, 8
    config.stage2.init_vision_from_stage1 = False
    config.stage2.loop.num_steps = 3
    config.stage2.loop.log_every = 3
    config.stage2.eval.num_maps = 2
    config.stage2.eval.max_new_tokens = 8
    config.stage2.eval.baseline = False
    mesh = make_mesh(config.mesh)
    with shd.activate(mesh, shd.rules_from_config(config)):
        report = stage2.run(config, str(wd), mesh)
    assert report["steps"] == 3 and "qa" in report
    return wd
