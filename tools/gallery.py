"""Renders a PNG grid of wafer maps, one row per class.

  python -m tools.gallery --source=synthetic --num=900 --seed=0 --output=/tmp/gallery.png
  python -m tools.gallery --source=PATH (any file load_dataset reads) --output=real.png
Colours: white = off-wafer (0), green = good die (1), dark red = failing die (2).
"""
from __future__ import annotations

import argparse

import numpy as np

COLOURS = ("#ffffff", "#8fbc8f", "#b22222")


def render(ds, path: str, per_class: int = 10, seed: int = 0, classes=None, dpi: int = 80,
           title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rng = np.random.default_rng(seed)
    names = ds.class_names
    present = [c for c in range(len(names)) if (ds.labels == c).any()]
    rows = [c for c in present if classes is None or names[c] in classes or c in classes]
    if not rows:
        raise ValueError(f"{ds.source}: no maps of the requested classes to render")
    fig, axes = plt.subplots(len(rows), per_class, figsize=(1.2 * per_class, 1.25 * len(rows)),
                             squeeze=False)
    cmap = ListedColormap(COLOURS)
    for r, c in enumerate(rows):
        pool = np.flatnonzero(ds.labels == c)
        pick = rng.choice(pool, min(per_class, len(pool)), replace=False)
        for j in range(per_class):
            ax = axes[r, j]
            ax.axis("off")
            if j < len(pick):
                m = ds.maps[pick[j]]
                ax.imshow(m, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
                ax.set_title(f"{names[c][:14]} {m.shape[0]}x{m.shape[1]}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", default="synthetic", help="'synthetic' or a dataset path")
    p.add_argument("--label_space", default="wm811k")
    p.add_argument("--num", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None)
    p.add_argument("--per_class", type=int, default=10)
    p.add_argument("--balance", default="balanced")
    p.add_argument("--classes", default=None, help="comma-separated class names to show")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    if a.source == "synthetic":
        from wamglm_jax.data.generator import generate
        ds = generate(a.num, a.seed, a.label_space, balance=a.balance)
    else:
        from wamglm_jax.data.dataset import load_dataset
        ds = load_dataset(a.source, split=a.split)
    classes = a.classes.split(",") if a.classes else None
    print(render(ds, a.output, a.per_class, a.seed, classes, title=ds.source))


if __name__ == "__main__":
    main()
