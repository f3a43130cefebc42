"""Tiny end-to-end stage-1 run through the real entry point on 8 simulated devices."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--config.model.vit.image_size=16", "--config.model.vit.patch_size=4",
        "--config.data.num_train=192",
        "--config.data.num_val=48", "--config.data.num_test=40", "--config.stage1.batch_size=16",
        "--config.stage1.eval_batch_size=32", "--config.stage1.loop.num_steps=6",
        "--config.stage1.loop.log_every=2", "--config.stage1.loop.eval_every=3",
        "--config.stage1.loop.checkpoint_every=3", "--config.stage1.embedding_points=100",
        "--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"]


def _main(workdir, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "wamglm_jax.main", "--config=configs/stage1.py",
                           f"--workdir={workdir}", *TINY, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# The non-default head options ride along (sharded, through the real entry point).
OPTIONS = ["--config.stage1.pooling=mean_max", "--config.stage1.ce_all_views=True",
           "--config.model.vit.stem=conv", "--config.model.vit.stem_depth=2",
           "--config.model.vit.drop_path_rate=0.1", "--config.stage1.label_smoothing=0.1"]


@pytest.mark.slow
def test_stage1_main_end_to_end(tmp_path):
    proc = _main(tmp_path, *OPTIONS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "data=4, fsdp=2" in proc.stderr
    stage = tmp_path / "stage1"
    from wamglm_jax.train.checkpoint import saved_tree
    head = saved_tree(stage / "checkpoints" / "6" / "state")["params"]["head"]
    assert tuple(head["classifier"]["kernel"].shape) == (2 * 64, 9)     # [mean, max] of Dv=64
    stem = saved_tree(stage / "checkpoints" / "6" / "state")["params"]["vision"]["embeddings"]
    assert tuple(stem["stem_1_1_kernel"].shape) == (3, 3, 64, 64)       # P=4: widths 32, 64
    report = json.loads((stage / "report.json").read_text())
    for key in ("stage", "steps", "final_train_loss", "wall_seconds", "accuracy", "macro_f1",
                "per_class"):
        assert key in report, key
    assert report["stage"] == "stage1" and report["steps"] == 6
    assert report["selected_on"] == "val" and report["report_split"] == "test"
    assert set(report["splits"]) == {"val", "test"}
    assert report["splits"]["test"]["num_examples"] == 40
    assert report["splits"]["val"]["num_examples"] == 48
    # per-class supports add up to the test set; accuracy agrees with the confusion matrix
    assert sum(v["support"] for v in report["per_class"].values()) == 40
    cm = report["confusion_matrix"]
    assert report["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(9)) / 40)
    assert 0.0 <= report["macro_f1"] <= 1.0 and report["final_train_loss"] > 0
    for png in ("confusion_val.png", "confusion_test.png", "embedding_val.png"):
        assert (stage / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (stage / "report.md").exists() and (stage / "checkpoints" / "6").exists()
    assert [e["step"] for e in report["evals"]] == [3, 6]
    # Re-running a finished workdir keeps the report instead of training again.
    mtime = (stage / "report.json").stat().st_mtime
    proc = _main(tmp_path, *OPTIONS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "is finished" in proc.stderr and (stage / "report.json").stat().st_mtime == mtime
