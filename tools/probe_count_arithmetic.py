"""How well a config's stage-2 language model learns the failing-die count from text alone:
the arithmetic ceiling of the share-first count answer.

    python -m tools.probe_count_arithmetic --config=configs/benchmark_qa.py:cpu
        [--num_maps=20000] [--steps=1500] [--batch_size=32] [--eval_every=500]
        [--num_eval=500] [--seed=0] [--pack=1] [--context=0] [--die_line] [--json=OUT]

The share-first count answer reads "8.4% of the 2046 dies fail, which is 171 dies.": the model
writes the failing share (read from the image) and copies the die count (from the context line)
before it writes the count, so the last number is that share of that die count. A stage-2 run's
`count_diagnostics` measures how often its written count is within 10% of the product of the two
numbers it wrote. This probe measures what the same language model (config.model.lm, randomly
initialised, our digit-split BPE tokenizer, stage 2's optimizer) learns of that step alone: it
trains on the sentences of --num_maps generated maps, the loss on the count and its closing
words only, and scores the greedy count on --num_eval maps of another seed with the QA scorer
(within 10%, or 1 die below 10). No image and no dialogue: the perfect-reading ceiling, to set
against the run's figure at the same number of count answers seen (steps x batch_size here).

Does the skill depend on where the sentence sits? Inside a dialogue the count sentence comes
after the image tokens, the context lines and earlier answers full of other numbers; here it
starts right after BOS. --context=0,3 scores each evaluation sentence after 0 and after 3
whole sentences of other evaluation maps (other numbers, the prompt further along), one column
each; --pack=K trains on rows of K sentences one after another (the loss on every count), the
same --batch_size sentences per step in batch_size/K rows (README "The product, text alone").
--die_line puts each sentence after its die count line ("The wafer has 2046 dies.") and adds
the total copied from it to the loss, in training and evaluation (stage 2's
product_rehearsal.die_line): the copy and the product together, as the answers need them.
Prints a table (one row per evaluation); the last line is the same as JSON (also --json):
each row's `by_context` holds {within_tol, exact} per context, and its `within_tol` and
`exact` are those of the first context listed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tools.profile_step import load_config
from wamglm_jax.data.generator import generate
from wamglm_jax.losses.lm import lm_loss
from wamglm_jax.models.decoder import Decoder
from wamglm_jax.qa.tokenizer import train_tokenizer
from wamglm_jax.train.lm_warmup import (SentenceBatches, encode_sentences, make_greedy,
                                        pack_pairs, product_pairs, score_counts,
                                        sentence_text)
from wamglm_jax.train.optim import make_optimizer


def count_pairs(num: int, seed: int) -> np.ndarray:
    """int[num,2] (failing, total) of `num` generated WM-811K-like maps (balanced classes)."""
    data = generate(num, seed=seed, lot_prefix=f"probe{seed}-lot")
    return product_pairs(data.maps, zones=False)


SENTENCE_TOKENS = 30    # tokens per sentence, with room: "8.4% of the 2046 dies ..." is ~22
LINE_TOKENS = 12        # more with --die_line: "The wafer has 2046 dies.\n" is ~9


def context_rows(pairs: np.ndarray, context: int) -> np.ndarray:
    """int[M,2] -> int[M,context+1,2]: row i is `context` other maps' sentences (i+1, i+2, ...,
    wrapping) and then map i's, the one scored."""
    i = np.arange(len(pairs))[:, None]
    idx = np.concatenate([(i + 1 + np.arange(context)[None]) % len(pairs), i], axis=1)
    return pairs[idx]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/benchmark_qa.py:cpu")
    ap.add_argument("--num_maps", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--eval_every", type=int, default=500)
    ap.add_argument("--num_eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pack", type=int, default=1)
    ap.add_argument("--context", default="0")
    ap.add_argument("--die_line", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    for name in ("num_maps", "steps", "batch_size", "eval_every", "num_eval", "pack"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)}: expected a positive integer")
    if args.batch_size % args.pack:
        ap.error(f"--batch_size={args.batch_size} is not a multiple of --pack={args.pack} "
                 "(sentences per step in rows of --pack sentences)")
    try:
        contexts = [int(c) for c in args.context.split(",")]
    except ValueError:
        contexts = [-1]
    if not contexts or min(contexts) < 0 or len(set(contexts)) != len(contexts):
        ap.error(f"--context={args.context}: expected distinct integers >= 0, comma-separated "
                 "(sentences before each scored one)")
    if max(contexts) >= args.num_eval:
        ap.error(f"--context={args.context}: needs more than {max(contexts)} evaluation maps "
                 f"(--num_eval={args.num_eval}): the context sentences are other maps'")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json={args.json}: its directory does not exist (checked before training, "
                 "so no result is lost)")
    config = load_config(args.config)
    missing = [name for name, ok in (
        ("config.model.lm", "lm" in config.get("model", {})),
        ("config.stage2.vocab_size", "vocab_size" in config.get("stage2", {})),
        ("config.stage2.optimizer", "optimizer" in config.get("stage2", {}))) if not ok]
    if missing:
        ap.error(f"--config={args.config}: not a stage-2 config, it lacks {', '.join(missing)}")

    # ------------------------------------------------------------------ data
    train_pairs = count_pairs(args.num_maps, args.seed)
    if len(train_pairs) < args.pack:
        ap.error(f"--pack={args.pack}: the {args.num_maps} maps give {len(train_pairs)} "
                 "sentences, fewer than one row")
    eval_pairs = count_pairs(args.num_eval, args.seed + 1000)
    tok = train_tokenizer([sentence_text(f, n, args.die_line) for f, n in train_pairs],
                          vocab_size=config.stage2.vocab_size)
    per_sentence = SENTENCE_TOKENS + LINE_TOKENS * args.die_line
    rows_train = pack_pairs(train_pairs, args.pack, args.seed)    # int[M/K,K,2]
    train_toks, train_mask, _, train_len = encode_sentences(
        tok, rows_train, 2 + per_sentence * args.pack, die_line=args.die_line)
    evals = {c: encode_sentences(tok, context_rows(eval_pairs, c), 2 + per_sentence * (c + 1),
                                 die_line=args.die_line)
             for c in contexts}
    batches = SentenceBatches(train_toks, train_mask, train_len,
                              global_batch_size=args.batch_size // args.pack, seed=args.seed)

    # ------------------------------------------------------------------ model
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.lm.vocab_size = len(tok)
    model = Decoder(model_cfg)
    params = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(train_toks[:2]))["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx, _ = make_optimizer(config.stage2.optimizer, args.steps, params)   # stage 2's optimizer
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, toks, mask, attn):
        """toks/mask/attn int32[B,L] -> the loss on the count tokens only (lm_loss)."""
        def loss_fn(p):
            logits = model.apply({"params": p}, toks, attention_mask=attn)
            return lm_loss(logits, toks, mask)["loss"]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    greedy = make_greedy(model_cfg)

    # ------------------------------------------------------------------ train and score
    rows, start = [], time.time()
    heads = " | ".join(f"within tolerance after {c} / exact" for c in contexts)
    print(f"| step | count answers seen | train loss | {heads} | wall s |\n"
          f"|---|---|---|{'---|' * len(contexts)}---|")
    for step in range(1, args.steps + 1):
        b = next(batches)
        params, opt_state, loss = train_step(params, opt_state, b["tokens"], b["loss_mask"],
                                             b["attention_mask"])
        if step % args.eval_every == 0 or step == args.steps:
            by_context = {str(c): score_counts(greedy(params, toks, plen), tok, plen, eval_pairs)
                          for c, (toks, _, plen, _) in evals.items()}
            row = {"step": step, "seen": step * args.batch_size, "loss": float(loss),
                   **by_context[str(contexts[0])], "by_context": by_context,
                   "wall_s": round(time.time() - start, 1)}
            rows.append(row)
            cells = " | ".join(f"{v['within_tol']:.1%} / {v['exact']:.1%}"
                               for v in by_context.values())
            print(f"| {step} | {row['seen']} | {row['loss']:.3f} | {cells} | {row['wall_s']} |",
                  flush=True)
    result = {"config": args.config, "lm_params": int(n_params), "vocab": len(tok),
              "num_maps": args.num_maps, "num_eval": args.num_eval, "pack": args.pack,
              "die_line": args.die_line,
              "contexts": contexts, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
