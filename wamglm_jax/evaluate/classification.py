"""Classification metrics and the stage report (report.json + report.md).

Typical use by an eval loop:

    cm = ConfusionMatrix.empty_for(num_classes)
    for batch in data:                       # any number of batches, any device layout
        logits = eval_step(state, batch)     # float[B,C]
        cm = cm.merge(ConfusionMatrix.from_model_output(logits=logits, labels=batch['label'],
                                                        mask=batch.get('valid')))
    metrics = metrics_from_confusion(cm.compute(), class_names)
    write_report(workdir / 'stage1', stage='stage1', steps=..., final_train_loss=...,
                 wall_seconds=..., metrics=metrics, dataset='val')

or, with whole prediction arrays: `classification_metrics(y_true, y_pred, class_names, probs)`,
or everything at once (metrics, confusion-matrix PNG, feature plot, report):
`write_evaluation(out_dir, y_true, y_pred, class_names, stage=..., steps=...,
final_train_loss=..., wall_seconds=..., probs=..., features=z, prototypes=p)`.

Conventions (those of sklearn's defaults):
  * confusion matrix rows = true class, columns = predicted class;
  * per-class precision/recall/F1 are 0 where undefined (no predictions / no support);
  * macro-F1 is the unweighted mean of F1 over the classes that occur in y_true or y_pred
    (sklearn `f1_score(average='macro')` with labels=None): classes absent from an
    evaluation set do not drag it down.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, ClassVar, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

__all__ = ["ConfusionMatrix", "classification_metrics", "confusion_matrix",
           "metrics_from_confusion", "write_report", "write_evaluation", "atomic_write_text",
           "REQUIRED_KEYS"]

_FILE = "wamglm_jax/evaluate/classification.py"
REQUIRED_KEYS = ("stage", "steps", "final_train_loss", "wall_seconds", "accuracy", "macro_f1",
                 "per_class")


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """clu Metric accumulating an int32[C,C] confusion matrix (rows true, columns predicted).

    `from_model_output(logits=float[B,C], labels=int[B], mask=bool[B] | None)` is jittable;
    merge adds counts, so batches/hosts can be combined in any order. `empty_for(C)` gives
    the zero matrix to start a running sum.
    """
    matrix: jnp.ndarray

    num_classes: ClassVar[Optional[int]] = None

    @classmethod
    def empty_for(cls, num_classes: int) -> "ConfusionMatrix":
        return cls(matrix=jnp.zeros((num_classes, num_classes), jnp.int32))

    @classmethod
    def empty(cls) -> "ConfusionMatrix":
        if cls.num_classes is None:
            raise ValueError(f"{_FILE}: ConfusionMatrix.empty() needs a class count; use "
                             f"ConfusionMatrix.empty_for(C) or ConfusionMatrix.of(C)")
        return cls.empty_for(cls.num_classes)

    @classmethod
    def of(cls, num_classes: int):
        """A subclass with a fixed class count (usable in clu `Collection.create`)."""
        return flax.struct.dataclass(
            type(f"ConfusionMatrix{num_classes}", (cls,), {"num_classes": num_classes}))

    @classmethod
    def from_model_output(cls, *, logits: jnp.ndarray, labels: jnp.ndarray,
                          mask: Optional[jnp.ndarray] = None, **_) -> "ConfusionMatrix":
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"{_FILE}: ConfusionMatrix needs logits float[B,C] and labels "
                             f"int[B]; got {logits.shape} and {labels.shape}")
        c = logits.shape[-1]
        pred = jnp.argmax(logits, axis=-1)
        weight = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
        # Out-of-range labels (padding) never count.
        weight = weight * ((labels >= 0) & (labels < c)).astype(jnp.int32)
        flat = jnp.clip(labels, 0, c - 1) * c + pred
        counts = jnp.zeros((c * c,), jnp.int32).at[flat].add(weight)
        return cls(matrix=counts.reshape(c, c))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if self.matrix.shape != other.matrix.shape:
            raise ValueError(f"{_FILE}: cannot merge confusion matrices of shapes "
                             f"{self.matrix.shape} and {other.matrix.shape}")
        return type(self)(matrix=self.matrix + other.matrix)

    def compute(self) -> np.ndarray:
        return np.asarray(jax.device_get(self.matrix), np.int64)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """int64[C,C] counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{_FILE}: y_true and y_pred lengths differ: {y_true.shape} vs "
                         f"{y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{_FILE}: {name} has ids outside [0, {num_classes}): "
                             f"min {y.min()}, max {y.max()}")
    flat = y_true.astype(np.int64) * num_classes + y_pred.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes,
                                                                           num_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def metrics_from_confusion(cm, class_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix.

    Returns a JSON-ready dict: accuracy, macro_f1, weighted_f1, num_examples,
    per_class {name: {precision, recall, f1, support}}, confusion_matrix (list of rows),
    class_names.
    """
    cm = np.asarray(cm, np.int64)
    c = len(class_names)
    if cm.shape != (c, c):
        raise ValueError(f"{_FILE}: confusion matrix shape {cm.shape} does not match "
                         f"{c} class names")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)          # true counts
    predicted = cm.sum(axis=0).astype(np.float64)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    seen = (support > 0) | (predicted > 0)
    return dict(
        accuracy=float(tp.sum() / total) if total else 0.0,
        macro_f1=float(f1[seen].mean()) if seen.any() else 0.0,
        weighted_f1=float((f1 * support).sum() / total) if total else 0.0,
        num_examples=int(total),
        per_class={name: dict(precision=float(precision[k]), recall=float(recall[k]),
                              f1=float(f1[k]), support=int(support[k]))
                   for k, name in enumerate(class_names)},
        confusion_matrix=cm.tolist(),
        class_names=list(class_names),
    )


def classification_metrics(y_true, y_pred, class_names: Sequence[str],
                           probs=None) -> dict:
    """metrics_from_confusion on whole arrays; with probs float[N,C] also top-3 accuracy,
    mean log-loss and mean confidence of the predicted class."""
    out = metrics_from_confusion(confusion_matrix(y_true, y_pred, len(class_names)),
                                 class_names)
    if probs is not None:
        probs = np.asarray(probs, np.float64)
        y_true = np.asarray(y_true).ravel()
        if probs.shape != (len(y_true), len(class_names)):
            raise ValueError(f"{_FILE}: probs must be float[{len(y_true)},{len(class_names)}]"
                             f"; got {probs.shape}")
        k = min(3, probs.shape[1])
        topk = np.argsort(-probs, axis=1)[:, :k]
        out["top3_accuracy"] = float((topk == y_true[:, None]).any(axis=1).mean())
        p_true = np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)
        out["log_loss"] = float(-np.log(p_true).mean())
        out["mean_confidence"] = float(probs.max(axis=1).mean())
    return out


def _jsonable(x: Any) -> Any:
    """numpy/jax scalars and arrays -> Python; non-finite floats -> None (strict JSON)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return x


def atomic_write_text(path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and os.replace,
    so a reader never sees a partial file and an interrupted write leaves the old one."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "n/a" if v is None else str(v)


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# {report['stage']} report", "", "| field | value |", "| --- | --- |"]
    skip = {"per_class", "confusion_matrix", "class_names"}
    for k, v in report.items():
        if k not in skip and not isinstance(v, (dict, list)):
            lines.append(f"| {k} | {_fmt(v)} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, m in report["per_class"].items():
        lines.append(f"| {name} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | "
                     f"{_fmt(m['f1'])} | {m['support']} |")
    cm, names = report.get("confusion_matrix"), report.get("class_names")
    if cm is not None and names is not None and len(names) <= 12:
        lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
                  "| true \\ pred | " + " | ".join(names) + " |",
                  "| --- |" + " ---: |" * len(names)]
        lines += [f"| {n} | " + " | ".join(str(x) for x in row) + " |"
                  for n, row in zip(names, cm)]
    nested = {k: v for k, v in report.items()
              if k not in skip and isinstance(v, (dict, list))}
    for k, v in list(nested.items()):   # {name: metrics dict} (e.g. per split) -> a table
        if (isinstance(v, dict) and v and all(isinstance(m, dict) and "accuracy" in m
                                              and "macro_f1" in m for m in v.values())):
            lines += ["", f"## {k}", "", f"| {k} | accuracy | macro_f1 | examples |",
                      "| --- | ---: | ---: | ---: |"]
            lines += [f"| {name} | {_fmt(m['accuracy'])} | {_fmt(m['macro_f1'])} | "
                      f"{_fmt(m.get('num_examples'))} |" for name, m in v.items()]
            del nested[k]
    if nested:
        lines += ["", "## Other fields", ""]
        for k, v in nested.items():
            text = json.dumps(v)
            lines.append(f"- {k}: " + (f"`{text}`" if len(text) <= 300 else
                                       f"({len(text)} characters; see report.json)"))
    return "\n".join(lines) + "\n"


def write_report(out_dir, *, stage: str, steps: int, final_train_loss: Optional[float],
                 wall_seconds: float, metrics: Mapping[str, Any], **extra) -> dict:
    """Write `out_dir/report.json` and `out_dir/report.md` atomically; returns the report.

    `metrics` is the dict of metrics_from_confusion / classification_metrics (must hold
    accuracy, macro_f1, per_class). Extra keyword fields (dataset, split, config name,
    paths of plots, ...) are added at the top level; a field given twice is an error rather
    than silently overwritten. Non-finite floats are written as null.
    """
    missing = [k for k in ("accuracy", "macro_f1", "per_class") if k not in metrics]
    if missing:
        raise ValueError(f"{_FILE}: write_report metrics lack {missing}")
    report = dict(stage=stage, steps=int(steps), final_train_loss=final_train_loss,
                  wall_seconds=float(wall_seconds))
    for source in (metrics, extra):
        clash = sorted(set(report) & set(source))
        if clash:
            raise ValueError(f"{_FILE}: write_report got {clash} twice (metrics/kwargs)")
        report.update(source)
    report = _jsonable(report)
    atomic_write_text(os.path.join(os.fspath(out_dir), "report.json"),
                      json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(os.path.join(os.fspath(out_dir), "report.md"), _markdown(report))
    return report


def write_evaluation(out_dir, y_true, y_pred, class_names: Sequence[str], *, stage: str,
                     steps: int, final_train_loss: Optional[float], wall_seconds: float,
                     probs=None, features=None, prototypes=None, embed_method: str = "pca",
                     **extra) -> dict:
    """One call for an evaluation: metrics + confusion-matrix PNG + (optional) feature plot
    + report.json/md, all in out_dir. Returns the report dict.

    features float[N,D] (e.g. the projected z of the evaluated maps, same order as y_true)
    and prototypes float[C,D] give `features_<method>.png`. File names of the plots are
    recorded in the report under `plots`.
    """
    from wamglm_jax.evaluate import plots  # matplotlib only when plotting

    metrics = classification_metrics(y_true, y_pred, class_names, probs=probs)
    out_dir = os.fspath(out_dir)
    names = {"confusion_matrix": "confusion_matrix.png"}
    plots.plot_confusion_matrix(metrics["confusion_matrix"], class_names,
                                os.path.join(out_dir, names["confusion_matrix"]))
    if features is not None:
        names["features"] = f"features_{embed_method}.png"
        plots.plot_embedding(features, y_true, class_names,
                             os.path.join(out_dir, names["features"]),
                             prototypes=prototypes, method=embed_method)
    return write_report(out_dir, stage=stage, steps=steps, final_train_loss=final_train_loss,
                        wall_seconds=wall_seconds, metrics=metrics, plots=names, **extra)
