"""Import pretrained HF weights (local safetensors dirs) into a WamGLM parameter checkpoint.

    python -m tools.import_hf --output=DIR [--lm=HF_LM_DIR] [--vision=HF_SIGLIP_DIR]
                              [--llava=HF_LLAVA_DIR] [--preset=tiny] [--pad_vocab=128]
                              [--seed=0] [--overwrite]

Writes DIR/params (an orbax StandardSave of the plain params tree {'vision','projector','lm'};
restore with orbax.checkpoint.StandardCheckpointer().restore(DIR/params)),
DIR/model_config.json ({"model": config.model, "imported": [...], "sources": {...}}: the same
`model` layout as stage2/model_config.json) and, when the LM dir ships a tokenizer, a copy in
DIR/tokenizer. Towers not given are initialised from --preset (random, --seed). With a
tokenizer and --pad_vocab=M, the vocabulary grows to hold `<image>` (if the tokenizer lacks it)
and is padded to a multiple of M (new rows = mean embedding). The last stdout line is JSON.
See wamglm_jax/export/from_hf.py for what is supported (SigLIP towers; Llama/Mistral LMs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "added_tokens.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--lm", default=None)
    ap.add_argument("--vision", default=None)
    ap.add_argument("--llava", default=None)
    ap.add_argument("--preset", default="tiny", help="configs/presets.py name for the rest")
    ap.add_argument("--pad_vocab", type=int, default=0, help="pad vocab to a multiple (0: no)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    import orbax.checkpoint as ocp

    from configs import presets
    from wamglm_jax.export import from_hf

    out = os.path.abspath(args.output)
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        print(f"import_hf: error: --output={out} exists and is not empty; pass --overwrite",
              file=sys.stderr)
        return 2
    try:
        params, cfg, info = from_hf.import_pretrained(
            presets.model_config(args.preset), llava=args.llava, vision=args.vision,
            lm=args.lm, seed=args.seed)
        tok_src = args.lm or args.llava
        tok_len = None
        if tok_src and os.path.exists(os.path.join(tok_src, "tokenizer.json")):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(tok_src)
            tok_len = len(tok) + (0 if "<image>" in tok.get_vocab() else 1)
            if args.pad_vocab:
                want = -(-max(tok_len, cfg.lm.vocab_size) // args.pad_vocab) * args.pad_vocab
                params, cfg = from_hf.resize_vocab(params, cfg, want)
    except from_hf.ImportHFError as e:
        print(f"import_hf: error: {e}", file=sys.stderr)
        return 2
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out, "params"), params)
        ckptr.wait_until_finished()
    if tok_len is not None:
        os.makedirs(os.path.join(out, "tokenizer"))
        for f in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tok_src, f)):
                shutil.copy(os.path.join(tok_src, f), os.path.join(out, "tokenizer", f))
    meta = dict(model=cfg.to_dict(), tokenizer_tokens=tok_len, **info)
    with open(os.path.join(out, "model_config.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    n = sum(int(x.size) for x in __import__("jax").tree.leaves(params))
    print(f"wrote {out}: imported {info['imported']}, initialised {info['initialised']}, "
          f"{n / 1e6:.3f}M parameters, vocab {cfg.lm.vocab_size}")
    print(json.dumps(dict(output=out, parameters=n, vocab_size=int(cfg.lm.vocab_size), **info)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
