"""Statistics of a WaferMapVMQA build: dialogues, turns, tokens, counts per question kind and
per class (train / held-out separately). The last line of output is the same as JSON.

    python -m tools.qa_stats --data=DIR_OR_JSONL [--tokenizer=DIR] [--num_image_tokens=N]
                             [--max_len=L]

--data: a .jsonl file or a directory of *.jsonl (as written by wamglm_jax.qa.build).
--tokenizer: default DIR/tokenizer when --data is a directory holding one; with a tokenizer the
token counts come from the real training encoding (<image> expanded to N tokens, truncation to
max_len counted); without one, tokens are not counted.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os

from wamglm_jax.qa.io import read_jsonl


def stats(items: list[dict], tok=None, num_image_tokens: int = 64, max_len: int = 2048) -> dict:
    """Counts over the dialogues; count drills (qa/drills.py, training data) are counted apart
    and the token counts cover everything that is trained on."""
    everything = items
    drills = [it for it in items if it.get("drill")]
    items = [it for it in items if not it.get("drill")]
    out = {"dialogues": len(items), "heldout_dialogues": sum(bool(it.get("heldout"))
                                                              for it in items),
           "turns": sum(len(it["answer_key"]) for it in items),
           "drills": len(drills), "drill_turns": sum(len(it["answer_key"]) for it in drills)}
    out["turns_per_dialogue"] = dict(sorted(collections.Counter(
        len(it["answer_key"]) for it in items).items()))
    out["kinds"] = dict(sorted(collections.Counter(
        k["kind"] for it in items for k in it["answer_key"]).items()))
    out["kinds_heldout"] = dict(sorted(collections.Counter(
        k["kind"] for it in items if it.get("heldout") for k in it["answer_key"]).items()))
    out["classes"] = dict(sorted(collections.Counter(
        it.get("class_name", str(it["class"])) for it in items).items()))
    if tok is not None:
        from wamglm_jax.qa.encode import encode_items
        _, st = encode_items(tok, everything, num_image_tokens=num_image_tokens, max_len=max_len)
        out["tokens"] = st
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--num_image_tokens", type=int, default=64)
    ap.add_argument("--max_len", type=int, default=2048)
    a = ap.parse_args(argv)
    if os.path.isdir(a.data):
        files = sorted(glob.glob(os.path.join(a.data, "*.jsonl")))
        tdir = a.tokenizer or (os.path.join(a.data, "tokenizer")
                               if os.path.isdir(os.path.join(a.data, "tokenizer")) else None)
    elif os.path.isfile(a.data):
        files, tdir = [a.data], a.tokenizer
    else:
        raise SystemExit(f"--data={a.data}: no such file or directory")
    if not files:
        raise SystemExit(f"--data={a.data}: no .jsonl files")
    tok = None
    if tdir:
        from wamglm_jax.qa.tokenizer import load_tokenizer, vocab_report
        tok = load_tokenizer(tdir)
    result = {"vocab": vocab_report(tok) if tok is not None else None, "splits": {}}
    for f in files:
        name = os.path.basename(f)[:-len(".jsonl")]
        s = stats(read_jsonl(f), tok, a.num_image_tokens, a.max_len)
        result["splits"][name] = s
        print(f"== {name}: {s['dialogues']} dialogues ({s['heldout_dialogues']} held-out), "
              f"{s['turns']} assistant turns")
        print(f"   turns/dialogue: {s['turns_per_dialogue']}")
        if s["drills"]:
            print(f"   count drills: {s['drills']} ({s['drill_turns']} exchanges; qa/drills.py)")
        if "tokens" in s:
            t = s["tokens"]
            print(f"   tokens: {t['tokens']} total, {t['loss_tokens']} trained (assistant), "
                  f"max {t['max_tokens']}, truncated {t['truncated']} at max_len={a.max_len} "
                  f"(N image tokens={a.num_image_tokens})")
        print("   per kind:  " + ", ".join(f"{k}={v}" for k, v in s["kinds"].items()))
        print("   per class: " + ", ".join(f"{k}={v}" for k, v in s["classes"].items()))
    if tok is not None:
        print(f"vocab: {result['vocab']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
