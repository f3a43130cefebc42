"""Classification metrics vs sklearn, the clu confusion-matrix metric, reports and plots."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics
from PIL import Image
from sklearn import metrics as skm

from wamglm_jax.evaluate import classification as cls_eval
from wamglm_jax.evaluate.classification import (REQUIRED_KEYS, ConfusionMatrix,
                                                classification_metrics, write_report)
from wamglm_jax.evaluate.plots import plot_confusion_matrix, plot_embedding

NAMES = [f"class{k}" for k in range(6)]


def _case(seed, n=300, c=6, drop_true=(), drop_all=()):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, c, n))
    for k in drop_true:        # never true, but predicted sometimes
        y[y == k] = (k + 1) % c
    for k in drop_all:         # neither true nor predicted
        y[y == k] = (k + 1) % c
        pred[pred == k] = (k + 1) % c
    return y, pred


@pytest.mark.parametrize("kw", [{}, dict(drop_true=(2,)), dict(drop_all=(4,)),
                                dict(drop_true=(0,), drop_all=(5,))])
def test_metrics_match_sklearn(kw):
    y, pred = _case(1, **kw)
    m = classification_metrics(y, pred, NAMES)
    labels = list(range(len(NAMES)))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    with np.errstate(all="ignore"):
        assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro",
                                                           zero_division=0), abs=1e-12)
        assert m["weighted_f1"] == pytest.approx(
            skm.f1_score(y, pred, average="weighted", labels=labels, zero_division=0), abs=1e-12)
        p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for k, name in enumerate(NAMES):
        pc = m["per_class"][name]
        assert (pc["precision"], pc["recall"], pc["f1"]) == pytest.approx((p[k], r[k], f[k]))
        assert pc["support"] == s[k]
    np.testing.assert_array_equal(m["confusion_matrix"], skm.confusion_matrix(y, pred,
                                                                              labels=labels))
    assert m["num_examples"] == len(y)


def test_probability_metrics_match_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 6, 200)
    logits = rng.standard_normal((200, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, probs.argmax(1), NAMES, probs=probs)
    assert m["top3_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=3,
                                                                        labels=range(6)))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs, labels=range(6)), rel=1e-9)
    assert m["mean_confidence"] == pytest.approx(probs.max(1).mean())
    with pytest.raises(ValueError, match="classification.py.*probs"):
        classification_metrics(y, y, NAMES, probs=probs[:, :3])
    with pytest.raises(ValueError, match="classification.py.*y_pred has ids outside"):
        classification_metrics(y, y + 3, NAMES)


def test_clu_confusion_metric_accumulates_batches():
    rng = np.random.default_rng(3)
    c, n, bs = 6, 70, 16
    logits = rng.standard_normal((n, c)).astype(np.float32)
    y = rng.integers(0, c, n)
    pad = (-n) % bs                                      # pad the last batch, masked out
    logits_p = np.concatenate([logits, np.zeros((pad, c), np.float32)])
    y_p = np.concatenate([y, -np.ones(pad, int)])
    valid = np.arange(n + pad) < n
    step = jax.jit(lambda l, t, m: ConfusionMatrix.from_model_output(logits=l, labels=t, mask=m))
    acc = ConfusionMatrix.empty_for(c)
    for i in range(0, n + pad, bs):
        acc = acc.merge(step(logits_p[i:i + bs], y_p[i:i + bs], valid[i:i + bs]))
    want = skm.confusion_matrix(y, logits.argmax(1), labels=range(c))
    np.testing.assert_array_equal(acc.compute(), want)
    # Inside a clu Collection (fixed class count), merged with clu's Accuracy.
    coll = clu_metrics.Collection.create(cm=ConfusionMatrix.of(c), acc=clu_metrics.Accuracy)
    total = coll.empty()
    for i in range(0, n, 35):
        total = total.merge(coll.single_from_model_output(
            logits=jnp.asarray(logits[i:i + 35]), labels=jnp.asarray(y[i:i + 35])))
    out = total.compute()
    np.testing.assert_array_equal(out["cm"], want)
    assert float(out["acc"]) == pytest.approx(skm.accuracy_score(y, logits.argmax(1)), abs=1e-6)
    with pytest.raises(ValueError, match="empty_for"):
        ConfusionMatrix.empty()
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(ConfusionMatrix.empty_for(3))


def test_write_report_files_and_keys(tmp_path):
    y, pred = _case(4)
    m = classification_metrics(y, pred, NAMES)
    out = tmp_path / "stage1"
    rep = write_report(out, stage="stage1", steps=120, final_train_loss=float("nan"),
                       wall_seconds=3.5, metrics=m, dataset="val", seed=np.int64(7),
                       splits={"val": m}, history=[0.5] * 300)
    data = json.loads((out / "report.json").read_text())
    for k in REQUIRED_KEYS + ("dataset", "seed", "confusion_matrix"):
        assert k in data
    assert data == rep
    assert data["final_train_loss"] is None and data["seed"] == 7 and data["steps"] == 120
    assert data["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert set(data["per_class"]) == set(NAMES)
    md = (out / "report.md").read_text()
    assert "| accuracy |" in md and all(f"| {n} |" in md for n in NAMES)
    assert f"| val | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {len(y)} |" in md
    assert "history: (" in md and data["history"] == [0.5] * 300
    assert sorted(os.listdir(out)) == ["report.json", "report.md"]      # no temp files left
    with pytest.raises(ValueError, match="twice"):
        write_report(out, stage="s", steps=1, final_train_loss=0.1, wall_seconds=1.0,
                     metrics=m, accuracy=0.5)
    with pytest.raises(ValueError, match="lack"):
        write_report(out, stage="s", steps=1, final_train_loss=0.1, wall_seconds=1.0,
                     metrics={"accuracy": 1.0})
    assert json.loads((out / "report.json").read_text()) == rep   # failed calls changed nothing


def test_interrupted_write_keeps_old_report(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(cls_eval.os, "replace", boom)
    with pytest.raises(OSError):
        cls_eval.atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def _check_png(path, min_side=200):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side


@pytest.mark.parametrize("c", [6, 38])
def test_confusion_matrix_png(tmp_path, c):
    names = [f"n{k}" for k in range(c)]
    y, pred = _case(5, n=500, c=c)
    cm = skm.confusion_matrix(y, pred, labels=range(c))
    p = plot_confusion_matrix(cm, names, tmp_path / "cm.png")
    _check_png(p)
    with pytest.raises(ValueError, match="plots.py.*does not match"):
        plot_confusion_matrix(cm, names[:-1], tmp_path / "bad.png")


def test_embedding_png_pca_and_tsne(tmp_path):
    rng = np.random.default_rng(6)
    c, n, d = 4, 60, 8
    y = rng.integers(0, c, n)
    centers = rng.standard_normal((c, d))
    feats = centers[y] + 0.1 * rng.standard_normal((n, d))
    _check_png(plot_embedding(feats, y, NAMES[:c], tmp_path / "pca.png", prototypes=centers))
    _check_png(plot_embedding(feats, y, NAMES[:c], tmp_path / "tsne.png", prototypes=centers,
                              method="tsne", tsne_max_iter=250))
    _check_png(plot_embedding(feats, y, NAMES[:c], tmp_path / "sub.png", max_points=20))
    with pytest.raises(ValueError, match="plots.py.*prototypes"):
        plot_embedding(feats, y, NAMES[:c], tmp_path / "x.png", prototypes=centers[:2])
    with pytest.raises(ValueError, match="plots.py.*method"):
        plot_embedding(feats, y, NAMES[:c], tmp_path / "x.png", method="umap")


def test_pca_matches_sklearn():
    from sklearn.decomposition import PCA
    from wamglm_jax.evaluate.plots import pca_2d
    x = np.random.default_rng(7).standard_normal((50, 5)) * [5, 3, 1, 0.5, 0.1]
    x2, _, ratio = pca_2d(x)
    ref = PCA(2).fit(x)
    want = ref.transform(x)
    np.testing.assert_allclose(np.abs(x2), np.abs(want), rtol=1e-8, atol=1e-10)   # sign-free
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-8)


def test_write_evaluation_one_call(tmp_path):
    from wamglm_jax.evaluate.classification import write_evaluation
    rng = np.random.default_rng(8)
    c, n = 4, 80
    y = rng.integers(0, c, n)
    logits = np.eye(c)[y] * 3 + rng.standard_normal((n, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    protos = rng.standard_normal((c, 5))
    rep = write_evaluation(tmp_path, y, probs.argmax(1), NAMES[:c], stage="stage1", steps=3,
                           final_train_loss=0.25, wall_seconds=1.0, probs=probs,
                           features=protos[y] + 0.1 * rng.standard_normal((n, 5)),
                           prototypes=protos, split="test")
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, probs.argmax(1), average="macro"))
    assert rep["plots"] == {"confusion_matrix": "confusion_matrix.png",
                            "features": "features_pca.png"}
    for name in rep["plots"].values():
        _check_png(tmp_path / name)
    assert json.loads((tmp_path / "report.json").read_text())["split"] == "test"
