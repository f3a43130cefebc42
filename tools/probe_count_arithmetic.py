"""How well a config's stage-2 language model learns the failing-die count from text alone:
the arithmetic ceiling of the share-first count answer.

    python -m tools.probe_count_arithmetic --config=configs/benchmark_qa.py:cpu
        [--num_maps=20000] [--steps=1500] [--batch_size=32] [--eval_every=500]
        [--num_eval=500] [--seed=0] [--json=OUT]

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
Prints a table (one row per evaluation); the last line is the same as JSON (also --json).
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
from wamglm_jax.evaluate.qa import score
from wamglm_jax.models.decoder import Decoder
from wamglm_jax.qa.answers import render_answer
from wamglm_jax.qa.facts import compute_facts
from wamglm_jax.qa.tokenizer import train_tokenizer
from wamglm_jax.train.optim import make_optimizer

SPLIT = " which is"     # the prompt ends here; the model writes " F dies."


def count_pairs(num: int, seed: int) -> list[tuple[int, int]]:
    """(failing, total) of `num` generated WM-811K-like maps (balanced classes)."""
    data = generate(num, seed=seed, lot_prefix=f"probe{seed}-lot")
    facts = [compute_facts(m) for m in data.maps]
    return [(f["failing"], f["total"]) for f in facts]


def split_sentence(failing: int, total: int) -> tuple[str, str]:
    """The share-first count answer split into (prompt, target) after `SPLIT`."""
    text = render_answer("count", {"failing": failing, "total": total},
                         count_form="share_first")
    head, sep, tail = text.partition(SPLIT)
    if not sep:
        raise ValueError(f"count answer {text!r} lacks {SPLIT!r}: the share-first form changed")
    return head + sep, tail


def encode(tok, pairs, max_len: int):
    """-> tokens int32[M,L], loss weights float32[M,L] (1 where the next token is the target's),
    prompt lengths int32[M]."""
    toks = np.zeros((len(pairs), max_len), np.int32)
    weights = np.zeros((len(pairs), max_len), np.float32)
    plen = np.zeros(len(pairs), np.int32)
    for i, (f, n) in enumerate(pairs):
        prompt, target = split_sentence(f, n)
        p_ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        ids = [tok.bos_token_id] + tok.encode(prompt + target, add_special_tokens=False) + \
            [tok.eos_token_id]
        if ids[:len(p_ids)] != p_ids:
            raise ValueError(f"tokenizer splits {prompt + target!r} across the prompt boundary")
        if len(ids) > max_len:
            raise ValueError(f"{len(ids)} tokens > max_len={max_len}")
        toks[i, :len(ids)] = ids
        weights[i, len(p_ids) - 1:len(ids) - 1] = 1.0
        plen[i] = len(p_ids)
    return toks, weights, plen


def make_greedy(model, new_tokens: int):
    @jax.jit
    def greedy(params, toks, plen):
        """Writes `new_tokens` argmax tokens after each row's prompt (full forward per token)."""
        rows = jnp.arange(toks.shape[0])
        toks = jnp.where(jnp.arange(toks.shape[1])[None] < plen[:, None], toks, 0)

        def body(k, toks):
            logits = model.apply({"params": params}, toks,
                                 attention_mask=(jnp.arange(toks.shape[1])[None]
                                                 < (plen + k)[:, None]).astype(jnp.int32))
            nxt = logits[rows, plen + k - 1].argmax(-1).astype(jnp.int32)
            return toks.at[rows, plen + k].set(nxt)
        return jax.lax.fori_loop(0, new_tokens, body, toks)
    return greedy


def evaluate(greedy, params, tok, toks, plen, pairs, new_tokens: int) -> dict:
    """The first word of each greedy continuation read as the count and scored with the QA
    tolerance (`score`). Stricter than the QA parser, whose fallback would read the share's
    first digit from a continuation without a number."""
    out = np.asarray(greedy(params, jnp.asarray(toks), jnp.asarray(plen)))
    within = exact = 0
    for row, p, (failing, _) in zip(out, plen, pairs):
        text = tok.decode(row[p:p + new_tokens], skip_special_tokens=True)
        words = text.split()
        guess = int(words[0]) if words and words[0].isdigit() else None
        within += score("count", {"failing": guess}, {"failing": failing})
        exact += guess == failing
    return {"within_tol": within / len(pairs), "exact": exact / len(pairs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/benchmark_qa.py:cpu")
    ap.add_argument("--num_maps", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--eval_every", type=int, default=500)
    ap.add_argument("--num_eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    for name in ("num_maps", "steps", "batch_size", "eval_every", "num_eval"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)}: expected a positive integer")
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
    eval_pairs = count_pairs(args.num_eval, args.seed + 1000)
    tok = train_tokenizer([prompt + target for prompt, target in
                           (split_sentence(f, n) for f, n in train_pairs)],
                          vocab_size=config.stage2.vocab_size)
    max_len = 32
    train_toks, train_w, _ = encode(tok, train_pairs, max_len)
    eval_toks, _, eval_plen = encode(tok, eval_pairs, max_len)
    new_tokens = 7          # up to five digits, " dies" and "."

    # ------------------------------------------------------------------ model
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.lm.vocab_size = len(tok)
    model = Decoder(model_cfg)
    params = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(train_toks[:2]))["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx, _ = make_optimizer(config.stage2.optimizer, args.steps, params)   # stage 2's optimizer
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, toks, weights):
        """toks int32[B,L], weights float32[B,L] -> loss on the count tokens only."""
        def loss_fn(p):
            logits = model.apply({"params": p}, toks, attention_mask=(toks > 0).astype(jnp.int32))
            nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:])
            return (nll * weights[:, :-1]).sum() / weights[:, :-1].sum()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    greedy = make_greedy(model, new_tokens)

    # ------------------------------------------------------------------ train and score
    rng = np.random.default_rng(args.seed)
    rows, start = [], time.time()
    print("| step | count answers seen | train loss | count within tolerance | exact | wall s |\n"
          "|---|---|---|---|---|---|")
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(train_pairs), args.batch_size)
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(train_toks[idx]),
                                             jnp.asarray(train_w[idx]))
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "seen": step * args.batch_size, "loss": float(loss),
                   **evaluate(greedy, params, tok, eval_toks, eval_plen, eval_pairs,
                              new_tokens),
                   "wall_s": round(time.time() - start, 1)}
            rows.append(row)
            print(f"| {step} | {row['seen']} | {row['loss']:.3f} | {row['within_tol']:.1%} | "
                  f"{row['exact']:.1%} | {row['wall_s']} |", flush=True)
    result = {"config": args.config, "lm_params": int(n_params), "vocab": len(tok),
              "num_maps": args.num_maps, "num_eval": args.num_eval, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
