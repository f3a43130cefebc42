"""tools.predict / tools.evaluate on a tiny npz made here, checked against sklearn on the CSV."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from configs import stage1 as stage1_config
from wamglm_jax.data import labels as L
from wamglm_jax.data.generator import generate
from wamglm_jax.parallel import sharding as shd
from wamglm_jax.parallel.mesh import make_mesh
from wamglm_jax.train import stage1

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step stage-1 model (trained in-process) and a 30-map npz with train/val splits."""
    tmp = tmp_path_factory.mktemp("tools")
    config = stage1_config.get_config("")
    config.model.vit.update(image_size=16, patch_size=4)
    config.data.update(dict(num_train=96, num_val=16, num_test=16))
    config.stage1.update(dict(batch_size=16, eval_batch_size=32))
    config.stage1.loop.update(dict(num_steps=4, log_every=2, eval_every=0, checkpoint_every=2))
    config.mesh.update(dict(data=8, fsdp=1, tensor=1))
    mesh = make_mesh(config.mesh)
    with shd.activate(mesh, shd.rules_from_config(config)):
        stage1.run(config, str(tmp / "run"), mesh)
    ds = generate(30, seed=7)
    names = np.array(L.class_names("wm811k"))[ds.labels]
    arrays = {f"map_{i}": m for i, m in enumerate(ds.maps)}
    np.savez(tmp / "maps.npz", labels=names, split=np.array(["train"] * 10 + ["val"] * 20),
             **arrays)
    return tmp, ds


def test_predict_csv(trained, capsys):
    from tools import predict
    tmp, ds = trained
    out = tmp / "preds.csv"
    assert predict.main([f"--workdir={tmp / 'run'}", f"--data={tmp / 'maps.npz'}",
                         f"--output={out}", "--batch_size=16"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 30 and [int(r["index"]) for r in rows] == list(range(30))
    names = L.class_names("wm811k")
    for r in rows:
        top = [t.split(":") for t in r["top3"].split("|")]
        probs = [float(p) for _, p in top]
        assert len(top) == 3 and probs == sorted(probs, reverse=True)
        assert top[0][0] == r["predicted"] == names[int(r["predicted_id"])]
        assert 0 < float(r["probability"]) <= 1
    assert [r["true"] for r in rows] == [names[k] for k in ds.labels]


def test_evaluate_cli_last_line_json(trained):
    tmp, ds = trained
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tools.evaluate", f"--workdir={tmp / 'run'}",
                           f"--data={tmp / 'maps.npz'}", "--split=val", "--batch_size=16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"accuracy", "macro_f1", "per_class"} <= set(result)
    assert Path(result["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(result["confusion_png"]).parent == tmp / "run" / "eval_val"
    # Independent check: sklearn on the predictions of tools.predict for the same 20 maps.
    from tools import predict
    out = tmp / "val.csv"
    predict.main([f"--workdir={tmp / 'run'}", f"--data={tmp / 'maps.npz'}", "--split=val",
                  f"--output={out}"])
    rows = list(csv.DictReader(out.open()))
    y_true, y_pred = [r["true"] for r in rows], [r["predicted"] for r in rows]
    assert result["num_examples"] == 20
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert result["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    for name, m in result["per_class"].items():
        assert m["support"] == sum(t == name for t in y_true)


def test_evaluate_rejects_wrong_label_space(trained, tmp_path):
    from tools import evaluate
    tmp, _ = trained
    bad = tmp_path / "mixed.npz"
    np.savez(bad, maps=np.ones((2, 8, 8), np.uint8), labels=np.zeros((2, 8), np.uint8),
             label_names=np.array(L.MIXED_TYPES))
    with pytest.raises(ValueError, match="mixedwm38"):
        evaluate.main([f"--workdir={tmp / 'run'}", f"--data={bad}"])


def test_load_variables_under_an_active_mesh(trained):
    """Stage 2 and the tools restore stage 1 while a mesh is entered (as under main.py): the
    restore must give the same arrays as without one (nn.unbox on abstract values used to fail)."""
    import jax
    tmp, _ = trained
    config = stage1.load_run_config(tmp / "run")
    mesh = make_mesh(config.mesh)
    rules = shd.rules_from_config(config)
    with shd.activate(mesh, rules):
        _, under_mesh, src = stage1.load_variables(tmp / "run", config, mesh, 9, rules)
    _, plain, src_plain = stage1.load_variables(tmp / "run", config, mesh, 9, rules)
    assert src == src_plain
    flat_a = jax.tree_util.tree_leaves_with_path(under_mesh)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(plain))
    assert len(flat_a) == len(flat_b) > 0
    for path, a in flat_a:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_b[path]))


def test_predict_with_worker_processes_matches_in_process(trained):
    """`worker_count` (config.stage1.loader_workers) only moves the resizing into grain worker
    processes: same maps, same order, same probabilities; it also works outside absl.app."""
    tmp, ds = trained
    config = stage1.load_run_config(tmp / "run")
    mesh = make_mesh(config.mesh)
    rules = shd.rules_from_config(config)
    model, variables, _ = stage1.load_variables(tmp / "run", config, mesh, 9, rules)
    kw = dict(image_size=int(config.model.vit.image_size), batch_size=16, mesh=mesh, rules=rules)
    inproc = stage1.predict(model, variables, ds, **kw)
    workers = stage1.predict(model, variables, ds, worker_count=2, **kw)
    assert workers["index"].tolist() == list(range(len(ds.maps)))
    np.testing.assert_array_equal(workers["labels"], ds.labels)
    np.testing.assert_allclose(workers["probs"], inproc["probs"], atol=1e-6)
    np.testing.assert_allclose(workers["z"], inproc["z"], atol=1e-6)


def test_dataset_order_restores_interleaved_batches_and_names_faults():
    index = np.array([0, 2, 4, 1, 3])            # two workers' shares, batch by batch
    order = stage1._dataset_order(index, 5)
    assert index[order].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match=r"returned 4 records for a dataset of 5; missing "
                                           r"positions \[4\], repeated \[\]"):
        stage1._dataset_order(np.array([0, 2, 1, 3]), 5)      # the tail was lost
    with pytest.raises(RuntimeError, match=r"missing positions \[3\], repeated \[1\]"):
        stage1._dataset_order(np.array([0, 1, 1, 2]), 4)
