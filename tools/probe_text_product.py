"""Whether a finished stage-2 run's language model can do the count's product as text alone.

    python -m tools.probe_text_product --workdir=DIR [--data=PATH] [--split=test]
        [--num_maps=500] [--max_len=32] [--seed=0] [--json=OUT]

The LM alone (no image, no dialogue) gets the share-first count sentence up to " which is"
("8.4% of the 2046 dies fail, which is") for each of the first --num_maps maps of --split
with dies, with the true share and die total, and writes the count greedily; it is right
when the count is within the QA tolerance (10%, or 1 die below 10). Set it against the run's
`count_diagnostics.product_within_tol` (the same step inside the dialogues, on the model's
own share) and tools/probe_drills.py (the share given in a dialogue question). Maps come from
--data or the run's own config.data, as in probe_drills. Prints a table; the last line is
the same as JSON (also written to --json).
"""
from __future__ import annotations

import os
import sys

from tools._json_line import emit
from tools.probe_drills import load_run, run_and_maps_parser


def main(argv=None) -> int:
    ap = run_and_maps_parser(__doc__, num_maps=500)
    ap.add_argument("--max_len", type=int, default=32, help="tokens per sentence buffer")
    args = ap.parse_args(argv)
    if args.num_maps < 1 or args.max_len < 8:
        print(f"--num_maps={args.num_maps} / --max_len={args.max_len}: expected >= 1 / >= 8",
              file=sys.stderr)
        return 2

    from wamglm_jax.train.lm_warmup import score_text_product
    try:
        ds, model_cfg, params, tok = load_run(args)
        scored = score_text_product(params["lm"], model_cfg, tok, ds.maps,
                                    range(min(args.num_maps, len(ds.maps))), args.max_len,
                                    field="--max_len")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"workdir": os.path.abspath(args.workdir), "data": args.data, "split": args.split,
           "sentences": scored["sentences"], "count_within_tol": scored["within_tol"],
           "count_exact": scored["exact"]}
    print(f"the LM alone on {out['sentences']} `{args.split}` count sentences "
          f"({args.workdir})")
    print("| count within tol | exact |")
    print("| " + " | ".join("n/a" if out[k] is None else f"{100 * out[k]:.1f}%"
                            for k in ("count_within_tol", "count_exact")) + " |")
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
