"""One call that builds WaferMapVMQA for a run: dialogues per split, JSONL + maps + TFDS, and
the tokenizer trained on the training dialogues + knowledge base.

    from wamglm_jax.qa.build import build_vmqa
    out = build_vmqa({"train": train_ds, "val": val_ds}, out_dir, heldout={"val": 0.5})
    out["tokenizer"]   # loaded tokenizer;  out["paths"], out["items"], out["vocab"]

Also a command: `python -m wamglm_jax.qa.build --out=DIR [--num=N --label_space=...]` builds
from freshly generated synthetic maps (train/test).
"""
from __future__ import annotations

import argparse
import json
import os

from wamglm_jax.qa.answers import COUNT_FORMS, ZONE_FORMS
from wamglm_jax.qa.dialogues import build_dialogues
from wamglm_jax.qa.io import write_vmqa
from wamglm_jax.qa.knowledge_base import load_knowledge_base
from wamglm_jax.qa.tokenizer import build_tokenizer, load_tokenizer, vocab_report


def build_vmqa(splits: dict, out_dir: str, *, seed: int = 0, per_map: int = 1,
               heldout: dict | None = None, kb_path: str | None = None,
               vocab_size: int = 1024, tokenizer_dir: str | None = None,
               chat_template: str | None = None, tokenizer_split: str = "train",
               tfds_too: bool = True, count_form: str = "share_first",
               zone_form: str = "count_first") -> dict:
    """splits: {name: WaferDataset}. heldout: {name: False|True|fraction} (default False).
    tokenizer_dir: a pretrained HF tokenizer to use instead of training one (chat_template:
    its replacement template with {% generation %} marks). Returns dict(items, paths,
    tokenizer, vocab)."""
    kb = load_knowledge_base(kb_path)
    heldout = heldout or {}
    items = {}
    for k, (name, ds) in enumerate(splits.items()):
        items[name] = build_dialogues(ds, seed=seed * 1000 + k, per_map=per_map,
                                      heldout=heldout.get(name, False), kb=kb,
                                      maps_name=f"{name}_maps.npz", id_prefix=f"{name}-",
                                      count_form=count_form, zone_form=zone_form)
    paths = write_vmqa(out_dir, {n: (items[n], splits[n]) for n in splits}, tfds_too=tfds_too)
    if tokenizer_dir is None:
        if tokenizer_split not in items:
            raise ValueError(f"tokenizer_split={tokenizer_split!r} is not one of the splits "
                             f"{list(items)}")
        tok = build_tokenizer(items[tokenizer_split], os.path.join(out_dir, "tokenizer"),
                              vocab_size=vocab_size, kb=kb)
        paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
    else:
        tok = load_tokenizer(tokenizer_dir, chat_template)
        paths["tokenizer"] = tokenizer_dir
    vocab = vocab_report(tok)
    with open(os.path.join(out_dir, "vmqa.json"), "w") as f:
        json.dump({"paths": paths, "vocab": vocab, "kb": {"name": kb.name, "version": kb.version,
                                                          "path": kb.path},
                   "dialogues": {n: len(v) for n, v in items.items()}}, f, indent=2)
    return {"items": items, "paths": paths, "tokenizer": tok, "vocab": vocab}


def main(argv=None):
    from wamglm_jax.data.generator import generate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--num_test", type=int, default=100)
    ap.add_argument("--label_space", default="mixedwm38")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per_map", type=int, default=1)
    ap.add_argument("--vocab_size", type=int, default=1024)
    ap.add_argument("--kb", default=None)
    ap.add_argument("--count_form", default="share_first", choices=COUNT_FORMS)
    ap.add_argument("--zone_form", default="count_first", choices=ZONE_FORMS)
    a = ap.parse_args(argv)
    splits = {"train": generate(a.num, seed=a.seed, label_space=a.label_space),
              "test": generate(a.num_test, seed=a.seed + 1, label_space=a.label_space)}
    out = build_vmqa(splits, a.out, seed=a.seed, per_map=a.per_map, heldout={"test": 0.5},
                     kb_path=a.kb, vocab_size=a.vocab_size, count_form=a.count_form,
                     zone_form=a.zone_form)
    print(json.dumps({"paths": out["paths"], "vocab": out["vocab"]}))


if __name__ == "__main__":
    main()
