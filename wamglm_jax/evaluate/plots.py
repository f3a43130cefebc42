"""Evaluation plots (matplotlib, Agg backend): confusion matrix and 2-D feature embedding.

    plot_confusion_matrix(cm int[C,C], class_names, path)          row-normalised heat map
    plot_embedding(features float[N,D], labels int[N], class_names, path,
                   prototypes=float[C,D] | None, method='pca' | 'tsne')

Both write the PNG atomically (temporary file + rename) and return the path. Pass the
projected features z together with the prototypes: they live in the same space.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_confusion_matrix", "plot_embedding", "pca_2d", "class_colors"]

_FILE = "wamglm_jax/evaluate/plots.py"


def _save(fig, path) -> str:
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def class_colors(num_classes: int) -> np.ndarray:
    """float[C,4] distinct RGBA colours (tab10 up to 10 classes, tab20+tab20b+tab20c after)."""
    if num_classes <= 10:
        return plt.get_cmap("tab10")(np.arange(num_classes))
    pool = np.concatenate([plt.get_cmap(n)(np.arange(20)) for n in ("tab20", "tab20b", "tab20c")])
    if num_classes <= len(pool):
        return pool[:num_classes]
    return plt.get_cmap("hsv")(np.linspace(0, 1, num_classes, endpoint=False))


def plot_confusion_matrix(cm, class_names: Sequence[str], path, *,
                          title: str = "Confusion matrix (rows normalised)") -> str:
    """Heat map of the row-normalised confusion matrix (rows: true, columns: predicted);
    cells show the fraction (and the count when C <= 12); empty rows stay 0."""
    cm = np.asarray(cm, np.int64)
    c = len(class_names)
    if cm.shape != (c, c):
        raise ValueError(f"{_FILE}: confusion matrix shape {cm.shape} does not match "
                         f"{c} class names")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    side = max(5.0, 0.32 * c + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), labels=class_names, rotation=60 if c > 6 else 30, ha="right",
                  fontsize=8 if c > 12 else 9)
    ax.set_yticks(range(c), labels=class_names, fontsize=8 if c > 12 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = cm.sum()
    acc = np.trace(cm) / total if total else 0.0
    ax.set_title(f"{title}\n{total} examples, accuracy {acc:.4f}", fontsize=10)
    for i in range(c):
        for j in range(c):
            if cm[i, j] == 0 or (c > 24 and i != j):   # many classes: diagonal only
                continue
            text = f"{norm[i, j]:.2f}" + (f"\n{cm[i, j]}" if c <= 12 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if c <= 12 else 5,
                    color="white" if norm[i, j] > 0.5 else "black")
    return _save(fig, path)


def pca_2d(x: np.ndarray, extra: Optional[np.ndarray] = None):
    """Project x float[N,D] (and `extra` float[M,D], with x's mean/components) to 2-D by
    numpy SVD. Returns (x2 float[N,2], extra2 float[M,2] | None, explained variance ratio)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:2]
    var = s ** 2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    x2 = (x - mean) @ comps.T
    e2 = None if extra is None else (np.asarray(extra, np.float64) - mean) @ comps.T
    return x2, e2, ratio


def plot_embedding(features, labels, class_names: Sequence[str], path, *,
                   prototypes=None, method: str = "pca", max_points: int = 3000,
                   seed: int = 0, title: Optional[str] = None, tsne_max_iter: int = 1000) -> str:
    """Scatter of features reduced to 2-D, coloured by class; prototypes as labelled stars.

    method 'pca' (numpy SVD; prototypes projected with the features' components) or 'tsne'
    (sklearn TSNE on features and prototypes together). At most `max_points` features are
    drawn (a fixed-seed random subset).
    """
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels).ravel()
    c = len(class_names)
    if features.ndim != 2 or len(labels) != len(features):
        raise ValueError(f"{_FILE}: features must be float[N,D] with labels int[N]; got "
                         f"{features.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"{_FILE}: labels outside [0, {c})")
    if prototypes is not None:
        prototypes = np.asarray(prototypes, np.float64)
        if prototypes.shape != (c, features.shape[1]):
            raise ValueError(f"{_FILE}: prototypes must be float[{c},{features.shape[1]}]; "
                             f"got {prototypes.shape}")
    if len(features) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), max_points, False))
        features, labels = features[keep], labels[keep]
    if method == "pca":
        x2, p2, ratio = pca_2d(features, prototypes)
        axis_names = [f"PC{k + 1} ({100 * r:.1f}%)" for k, r in enumerate(ratio)]
    elif method == "tsne":
        from sklearn.manifold import TSNE
        both = features if prototypes is None else np.concatenate([features, prototypes])
        perplexity = float(min(30.0, max(2.0, (len(both) - 1) / 3)))
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                   max_iter=tsne_max_iter).fit_transform(both)
        x2, p2 = emb[:len(features)], (None if prototypes is None else emb[len(features):])
        axis_names = ["t-SNE 1", "t-SNE 2"]
    else:
        raise ValueError(f"{_FILE}: method={method!r}; expected 'pca' or 'tsne'")

    colors = class_colors(c)
    fig, ax = plt.subplots(figsize=(9.5 if c > 12 else 8, 6.5))
    for k in range(c):
        sel = labels == k
        if sel.any():
            ax.scatter(x2[sel, 0], x2[sel, 1], s=9, color=colors[k], alpha=0.55, lw=0,
                       label=class_names[k])
    if p2 is not None:
        ax.scatter(p2[:, 0], p2[:, 1], s=240, marker="*", c=colors, edgecolors="black",
                   linewidths=1.0, zorder=5)
        for k in range(c):
            ax.annotate(class_names[k], p2[k], xytext=(5, 5), textcoords="offset points",
                        fontsize=7 if c <= 12 else 6, zorder=6)
        ax.scatter([], [], s=120, marker="*", color="white", edgecolors="black",
                   label="prototype (star)")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    shown = "PCA" if method == "pca" else "t-SNE"
    ax.set_title(title or f"Features ({shown}), {len(features)} points", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=2.0,
              ncol=2 if c > 20 else 1, frameon=False)
    ax.grid(alpha=0.2)
    return _save(fig, path)
