"""How well a finished stage-2 run writes the failing-die count when the failing share is given:
count drills (qa/drills.py) on maps it did not train on, answered greedily.

    python -m tools.probe_drills --workdir=DIR [--data=PATH] [--split=test] [--num_maps=100]
        [--turns=4] [--seed=123] [--json=OUT]

Each drill states a share in the question ("8.3% of its dies fail. How many dies is that?", then
other shares); the answer is right when its count is within the QA tolerance (10%, or 1 die
below 10) of the true count for that share. So this measures the product step alone, with the
reading of the image taken out: set it against the run's `count_diagnostics.product_within_tol`
(its product inside the dialogues) and against tools/probe_count_arithmetic.py (the same LM on
the count sentence as text alone). Maps: the first --num_maps labelled maps of --split, from
--data (any file load_dataset reads) or, by default, from the run's own config.data (the
synthetic maps are regenerated from its seed). Prints a table; the last line is the same as JSON
(also written to --json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from tools._json_line import emit


def load_maps(workdir: str, data: str | None, split: str):
    """The dataset of `split`: from `data`, or from the run's stage2/config.json config.data."""
    if data:
        from wamglm_jax.data.dataset import load_dataset
        return load_dataset(data, split)
    import ml_collections
    from wamglm_jax.data.splits import load_splits
    path = os.path.join(workdir, "stage2", "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (is --workdir a stage-2 run directory?)")
    config = ml_collections.ConfigDict(json.load(open(path)))
    splits = load_splits(config.data)
    if splits.get(split) is None:
        raise ValueError(f"{path}: config.data has no {split!r} split (splits: "
                         f"{sorted(k for k, v in splits.items() if v is not None)})")
    return splits[split]


def run_and_maps_parser(doc: str, num_maps: int) -> argparse.ArgumentParser:
    """A parser with the arguments the probes of a finished run share: --workdir, --data,
    --split, --num_maps (its default `num_maps`), --json."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a stage-2 run directory")
    ap.add_argument("--data", default=None, help="any file/dir load_dataset reads (default: "
                                                 "the run's config.data)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num_maps", type=int, default=num_maps)
    ap.add_argument("--json", default=None)
    return ap


def load_run(args):
    """(dataset of --split, model_cfg, params, tokenizer) of the run in --workdir; raises
    FileNotFoundError / ValueError naming what is missing."""
    from wamglm_jax.inference.load import load_for_inference
    ds = load_maps(args.workdir, args.data, args.split)
    return (ds,) + tuple(load_for_inference(args.workdir))


def main(argv=None) -> int:
    ap = run_and_maps_parser(__doc__, num_maps=100)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--batch_size", type=int, default=16)
    args = ap.parse_args(argv)
    if args.num_maps < 1 or args.turns < 1:
        print(f"--num_maps={args.num_maps} / --turns={args.turns}: expected >= 1 each",
              file=sys.stderr)
        return 2

    from wamglm_jax.evaluate import qa as qa_eval
    from wamglm_jax.inference.load import answer_forms
    from wamglm_jax.qa.drills import build_count_drills
    try:
        ds, model_cfg, params, tok = load_run(args)
        forms = answer_forms(args.workdir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labelled = np.flatnonzero(np.asarray(ds.labels) >= 0)[:args.num_maps]
    items = build_count_drills(ds, prob=1.0, turns=args.turns, seed=args.seed, indices=labelled,
                               **forms)             # the run's answer forms and context
    _, records = qa_eval.evaluate_model(model_cfg, params, tok, items, ds.maps,
                                        max_new_tokens=40, batch_size=args.batch_size)

    def frac(xs):
        return float(np.mean(xs)) if xs else None

    out = {"workdir": os.path.abspath(args.workdir), "data": args.data, "split": args.split,
           "maps": len(items), "answers": len(records),
           "count_within_tol": frac([r["correct"] for r in records]),
           "first_share": frac([r["correct"] for r in records if r["turn"] == 1]),
           "other_shares": frac([r["correct"] for r in records if r["turn"] > 1]),
           "product_within_tol": qa_eval.count_diagnostics(records)["product_within_tol"]}
    print(f"count drills on {out['maps']} `{args.split}` maps ({args.workdir}), "
          f"{out['answers']} answers")
    print("| count within tol | first share (the map's) | other shares | own product |")
    print("| " + " | ".join("n/a" if out[k] is None else f"{100 * out[k]:.1f}%" for k in
                            ("count_within_tol", "first_share", "other_shares",
                             "product_within_tol")) + " |")
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
