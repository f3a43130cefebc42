"""Evaluate a stage-1 checkpoint on a dataset file; the LAST stdout line is one JSON object.

    python -m tools.evaluate --workdir=DIR --data=PATH [--split=NAME] [--tta] [--output_dir=D]

JSON keys: accuracy, macro_f1, per_class ({name: {precision, recall, f1, support}}),
weighted_f1, num_examples, split, data, checkpoint, confusion_png, tta.
The confusion-matrix PNG (and metrics.json) go to --output_dir, by default
DIR/eval_<split or 'all'>/. Unlabeled maps are skipped (counted in `skipped_unlabeled`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", required=True, help="any file/dir load_dataset reads")
    ap.add_argument("--split", default=None)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--tta", action="store_true", help="average the 8 dihedral views")
    ap.add_argument("--output_dir", default=None)
    args = ap.parse_args(argv)

    from tools._stage1_common import load_model
    from wamglm_jax.data.dataset import load_dataset
    from wamglm_jax.evaluate import plots
    from wamglm_jax.evaluate.classification import atomic_write_text, classification_metrics
    from wamglm_jax.train import stage1

    config, mesh, rules, model, variables, names, source = load_model(args.workdir)
    ds = load_dataset(args.data, args.split, label_space=config.data.label_space)
    if ds.label_space != config.data.label_space:
        raise ValueError(f"{args.data}: labels are in {ds.label_space!r} but the model was "
                         f"trained on {config.data.label_space!r}")
    pred = stage1.predict(model, variables, ds, image_size=int(config.model.vit.image_size),
                          batch_size=args.batch_size, mesh=mesh, rules=rules, tta=args.tta)
    ok = pred["labels"] >= 0
    if not ok.any():
        raise ValueError(f"{args.data}: no labelled maps to evaluate"
                         + (f" in split {args.split!r}" if args.split else ""))
    y, probs = pred["labels"][ok], pred["probs"][ok]
    m = classification_metrics(y, probs.argmax(1), names, probs=probs)
    out_dir = args.output_dir or os.path.join(args.workdir, f"eval_{args.split or 'all'}")
    png = plots.plot_confusion_matrix(m["confusion_matrix"], names,
                                      os.path.join(out_dir, "confusion.png"),
                                      title=f"{os.path.basename(args.data)} "
                                            f"[{args.split or 'all'}]")
    result = dict(accuracy=m["accuracy"], macro_f1=m["macro_f1"], per_class=m["per_class"],
                  weighted_f1=m["weighted_f1"], num_examples=m["num_examples"],
                  skipped_unlabeled=int((~ok).sum()), split=args.split, data=args.data,
                  checkpoint=source, confusion_png=png, tta=bool(args.tta),
                  confusion_matrix=m["confusion_matrix"], class_names=names)
    atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(result, indent=2) + "\n")
    print(f"accuracy {m['accuracy']:.4f}  macro_f1 {m['macro_f1']:.4f}  ({m['num_examples']} "
          f"maps; {source})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
