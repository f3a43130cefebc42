"""How precisely the vision features of a stage-2 run carry the failing share of a wafer map:
the number behind its yield, area and failing-die answers (a count is the share times the die
count, so a count within 10% needs the share within 10%, relative).

    python -m tools.probe_share --workdir=DIR --data=PATH [--fit_split=train]
        [--eval_split=val] [--num_fit=6000] [--num_eval=2000] [--seed=0] [--json=OUT]

A ridge regression from the features the projector reads (`features`, mean over the N image
tokens; with a list `config.model.vit.feature_layer`, all its layers) to the failing share is
fitted on --num_fit maps of --fit_split, its strength chosen on the last fifth of them (never
on the evaluation maps), and scored on --num_eval maps of --eval_split. Rows: the exact share
read from the area-resized image (the ceiling: the image holds it exactly), the ridge on the
mean features, and on the mean features with their squares. Columns: share within 10%
(relative), within 3 points (the yield/area tolerance), median relative error. Compare the
first column with the run's `count_diagnostics.share_within_tol` (stage-2 report): the gap
between the two is what the language model loses reading the number out of the tokens.
Prints a table; the last line is the same as JSON (also written to --json).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import numpy as np

from tools._json_line import emit
from wamglm_jax.evaluate.qa import COUNT_REL_TOL, PCT_TOL as PCT_POINTS

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
REL_TOL, PCT_TOL = COUNT_REL_TOL, PCT_POINTS / 100.0   # the QA scorer's tolerances, as shares


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> Callable[[np.ndarray], np.ndarray]:
    """float[M,F], float[M] -> predictor; standardised features, unpenalised intercept."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    w = np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda x2: ((x2 - mu) / sd) @ w + y.mean()


def select_ridge(x: np.ndarray, y: np.ndarray) -> tuple[float, Callable]:
    """Strength from LAMBDAS with the lowest squared error on the last fifth of (x, y) when
    fitted on the rest; then refitted on all of it. Returns (lambda, predictor)."""
    cut = len(y) - max(len(y) // 5, 1)
    errs = [np.mean((fit_ridge(x[:cut], y[:cut], lam)(x[cut:]) - y[cut:]) ** 2)
            for lam in LAMBDAS]
    lam = LAMBDAS[int(np.argmin(errs))]
    return lam, fit_ridge(x, y, lam)


def score_share(pred: np.ndarray, true: np.ndarray) -> dict:
    """Within REL_TOL relative (maps with a failing die), within PCT_TOL absolute, median
    relative error."""
    pos = true > 0
    rel = np.abs(pred[pos] - true[pos]) / true[pos]
    return {"within_10pct_rel": float(np.mean(rel <= REL_TOL + 1e-12)) if pos.any() else None,
            "within_3pt": float(np.mean(np.abs(pred - true) <= PCT_TOL + 1e-12)),
            "median_rel_error": float(np.median(rel)) if pos.any() else None,
            "n": int(len(true))}


def image_share(images: np.ndarray) -> np.ndarray:
    """float[B,S,S,3] area fractions (off, good, fail) -> failing share of the dies, exact."""
    fail, good = images[..., 2].sum((1, 2)), images[..., 1].sum((1, 2))
    return fail / np.maximum(fail + good, 1e-12)


def probe(features: Callable[[np.ndarray], np.ndarray], images_of: Callable, fit_maps: list,
          eval_maps: list, batch_size: int = 256) -> dict:
    """features(images float[B,S,S,3]) -> float[B,F]; images_of(maps) -> float[B,S,S,3].
    Returns {rows: {name: score_share}, lambdas: {name: chosen strength}}."""
    from wamglm_jax.data.wafer import fail_fraction

    def encode(maps):
        feats, exact = [], []
        for i in range(0, len(maps), batch_size):
            imgs = images_of(maps[i:i + batch_size])
            feats.append(np.asarray(features(imgs), np.float64))
            exact.append(image_share(imgs))
        return np.concatenate(feats), np.concatenate(exact), \
            np.array([fail_fraction(m) for m in maps])

    xf, _, yf = encode(fit_maps)
    xe, exact, ye = encode(eval_maps)
    rows, lams = {"exact share from the image": score_share(exact, ye)}, {}
    for name, f in (("ridge: mean features", lambda x: x),
                    ("ridge: mean features and squares", lambda x: np.c_[x, x ** 2])):
        lams[name], pred = select_ridge(f(xf), yf)
        rows[name] = score_share(pred(f(xe)), ye)
    return {"rows": rows, "lambdas": lams}


def _sample(ds, split: str, n: int, rng) -> list:
    idx = np.flatnonzero(ds.split == split) if ds.split is not None else np.arange(0)
    if len(idx) == 0:
        have = sorted({str(s) for s in ds.split}) if ds.split is not None else []
        raise ValueError(f"{ds.source}: no maps in split {split!r} (splits: {have})")
    return [ds.maps[i] for i in rng.permutation(idx)[:n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a stage-2 run directory")
    ap.add_argument("--data", required=True, help="any file/dir load_dataset reads")
    ap.add_argument("--fit_split", default="train")
    ap.add_argument("--eval_split", default="val")
    ap.add_argument("--num_fit", type=int, default=6000)
    ap.add_argument("--num_eval", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.num_fit < 10 or args.num_eval < 1:
        print(f"--num_fit={args.num_fit} / --num_eval={args.num_eval}: expected >= 10 fitting "
              "maps and >= 1 evaluation map", file=sys.stderr)
        return 2

    import jax
    from wamglm_jax.data.dataset import load_dataset
    from wamglm_jax.models.vit import VisionTransformer
    from wamglm_jax.inference.load import load_for_inference
    from wamglm_jax.train.stage2_data import images_for
    try:
        cfg, params, _ = load_for_inference(args.workdir)
        ds = load_dataset(args.data, include_unlabeled=True)
        rng = np.random.default_rng(args.seed)
        fit_maps = _sample(ds, args.fit_split, args.num_fit, rng)
        eval_maps = _sample(ds, args.eval_split, args.num_eval, rng)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = int(cfg.vit.image_size)
    vit = VisionTransformer(cfg)
    feats = jax.jit(lambda x: vit.apply({"params": params["vision"]}, x)[0].mean(1))
    out = probe(feats, lambda maps: images_for(maps, np.arange(len(maps)), size),
                fit_maps, eval_maps)
    out.update(workdir=os.path.abspath(args.workdir), data=os.path.abspath(args.data),
               feature_layer=cfg.vit.feature_layer, fit_split=args.fit_split,
               eval_split=args.eval_split, num_fit=len(fit_maps))
    print(f"failing share on {len(eval_maps)} `{args.eval_split}` maps ({args.workdir}, "
          f"feature_layer={cfg.vit.feature_layer})")
    print(f"| {'probe':34s} | within 10% rel | within 3 pt | median rel err |")
    for name, r in out["rows"].items():
        med = r["median_rel_error"]
        print(f"| {name:34s} | {100 * (r['within_10pct_rel'] or 0):13.1f}% | "
              f"{100 * r['within_3pt']:10.1f}% | {'n/a' if med is None else f'{100 * med:.1f}%':>14s} |")
    emit(out, args.json, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
