"""Classify every map of a file with a trained stage-1 model; one CSV row per map.

    python -m tools.predict --workdir=DIR --data=PATH --output=preds.csv [--batch_size=256] [--tta]

Columns: index (row in the file), predicted (class name), predicted_id, probability,
top3 ("name:prob|name:prob|name:prob"), true (class name, empty when unlabeled).
Uses the checkpoint selected on val (workdir/stage1/best) or else the latest one.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", required=True, help="any file/dir load_dataset reads")
    ap.add_argument("--output", default="preds.csv")
    ap.add_argument("--split", default=None, help="only this split of the file")
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--tta", action="store_true", help="average the 8 dihedral views")
    args = ap.parse_args(argv)

    from tools._stage1_common import load_model
    from wamglm_jax.data.dataset import load_dataset
    from wamglm_jax.train import stage1

    t0 = time.time()
    config, mesh, rules, model, variables, names, source = load_model(args.workdir)
    ds = load_dataset(args.data, args.split, label_space=config.data.label_space)
    pred = stage1.predict(model, variables, ds, image_size=int(config.model.vit.image_size),
                          batch_size=args.batch_size, mesh=mesh, rules=rules, tta=args.tta)
    probs = pred["probs"]
    order = probs.argsort(axis=1)[:, ::-1][:, :3]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "predicted", "predicted_id", "probability", "top3", "true"])
        for row, (i, top) in enumerate(zip(pred["index"], order)):
            lab = int(pred["labels"][row])
            w.writerow([int(i), names[top[0]], int(top[0]), f"{probs[row, top[0]]:.6f}",
                        "|".join(f"{names[k]}:{probs[row, k]:.4f}" for k in top),
                        names[lab] if lab >= 0 else ""])
    os.replace(tmp, args.output)
    print(f"wrote {len(probs)} predictions to {args.output} ({source}; "
          f"{time.time() - t0:.1f}s)", file=sys.stderr)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
