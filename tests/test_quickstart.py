"""The quickstart path at a reduced size (configs/quickstart.py:ci): data, stage 1, stage 2,
evaluation, sample dialogue, reports with plots; re-running resumes instead of retraining."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_ci_runs_end_to_end_and_resumes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "wamglm_jax.main", "--config=configs/quickstart.py:ci",
           f"--workdir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "--- sample dialogue" in out.stdout and "\nA: " in out.stdout
    r1 = json.loads((tmp_path / "stage1" / "report.json").read_text())
    r2 = json.loads((tmp_path / "stage2" / "report.json").read_text())
    for r, stage in ((r1, "stage1"), (r2, "stage2")):
        assert r["stage"] == stage
        for k in ("steps", "final_train_loss", "wall_seconds"):
            assert r[k] is not None, (stage, k)
    assert r2["steps"] == 6 and "defect_type" in r2["qa"]
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in r2["qa"].values())
    assert "by_kind" in r2["baseline"] and r2["examples"]
    assert (tmp_path / "stage2" / "qa.png").stat().st_size > 0
    assert (tmp_path / "stage2" / "report.md").read_text().startswith("# Stage 2 report")
    # re-running resumes: both stages find their finished runs, nothing is retrained
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    log = again.stderr
    assert "stage1: " in log and "is finished" in log
    assert "stage2: " in log and log.count("is finished") >= 2
    assert "stage1 step" not in log and "stage2 step" not in log
