"""Convert a stage-2 WamGLM checkpoint into a Hugging Face `LlavaForConditionalGeneration` dir.

    python -m tools.convert_to_hf --workdir=DIR --output=HFDIR [--step=N] [--verify] [--overwrite]

Restores workdir/stage2/checkpoints/<step>/state (latest by default), merges LoRA adapters
when the run trained them, and writes config.json (classic Llava layout), model.safetensors,
the tokenizer and a processor (see wamglm_jax/export/to_hf.py). A non-empty --output is
refused unless --overwrite. --verify loads the result with transformers (torch CPU, fp32),
runs the same image+prompt through JAX and torch, prints the max |logit diff| and greedy-token
agreement, and exits 1 when the difference exceeds --tol (1e-4) or greedy tokens differ.
The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--new_tokens", type=int, default=8, help="greedy tokens compared")
    ap.add_argument("--max_shard_gb", type=float, default=5.0,
                    help="split model.safetensors into shards of at most this size")
    args = ap.parse_args(argv)

    from wamglm_jax.export import to_hf

    try:
        to_hf._check_output(args.output, args.overwrite)      # fail before any restore
        params, cfg, info = to_hf.load_stage2(args.workdir, args.step)
        prov = {k: info[k] for k in ("source", "step", "lora_merged")}
        out = to_hf.export(params, cfg, args.output, tokenizer_dir=info["tokenizer_dir"],
                           overwrite=args.overwrite, provenance=prov,
                           max_shard_bytes=int(args.max_shard_gb * 2**30))
    except to_hf.ExportError as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 2
    result = dict(output=out, **info)
    print(f"wrote {out} from {info['source']} (step {info['step']}, "
          f"LoRA merged: {info['lora_merged']}, tokenizer: {info['tokenizer_dir']})")
    code = 0
    if args.verify:
        rep = to_hf.verify(out, params, cfg, new_tokens=args.new_tokens)
        ok = rep["max_abs_logit_diff"] <= args.tol and rep["greedy_equal"]
        print(f"verify: max |logit diff| {rep['max_abs_logit_diff']:.3e} (tol {args.tol:g}), "
              f"argmax agreement {rep['argmax_agreement']:.3f} over {rep['tokens']} tokens, "
              f"greedy {args.new_tokens} tokens equal: {rep['greedy_equal']}, processor "
              f"identity max diff: {rep['processor_identity_max_diff']} -> "
              f"{'OK' if ok else 'FAIL'}")
        result["verify"] = dict(rep, ok=ok, tol=args.tol)
        code = 0 if ok else 1
    print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
