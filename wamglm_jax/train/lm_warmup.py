"""The language model alone, before stage 2's dialogues: the product in the share-first answers.

A share-first count answer reads "8.4% of the 2046 dies fail, which is 171 dies.": the share
comes from the image, the die total from the context line, and the count is their product.
Trained on nothing but such sentences, the `:cpu` LM writes the count within 10% in 84% of
answers after 32,000 of them (tools/probe_count_arithmetic.py); inside the dialogues, where
the count's tokens are 8% of the loss behind 64 image tokens, the same LM keeps its written
count within 10% of its own share x die count in only 43 to 48% of answers, with or without
count drills or a larger digit weight (README "The product, text alone" and after).
This phase (config.stage2.lm_warmup.num_steps > 0) teaches the LM that step first, on the
training maps' own numbers: each map's (failing, total) and, with `zones`, each zone's
(failing, dies). No image, no dialogue: BOS + the sentence + EOS with the loss on the tokens
after " which is" (the count and its closing words). Stage 2 runs it through train.loop in
workdir/stage2_lm_warmup (checkpointed, resumable), only params['lm'] training; then the
greedy count is scored with the QA tolerance on a seeded sample of config.stage2.eval.split.

Measured (README "LM warm-up", one `:cpu` run): 3,000 steps bring the text-only count to
97.8% within tolerance, but after stage 2 the answers are worse than without the warm-up
(the die count is no longer copied, numeric 57.1% against 62.1%), so it is off by default.

Product rehearsal (config.stage2.product_rehearsal.weight > 0) keeps the same sentences in
stage 2 itself: every step also draws a batch of them (`WithSentences`) and adds `weight` x
their LM-only loss to the dialogue loss (stage2.make_train_step), so the product is learnt
beside the dialogues instead of before them. Measured (README "Product rehearsal", one `:cpu`
run, weight 1): the LM alone then writes the count within tolerance for 93.6% of held-out
sentences, but as after the warm-up the answers stop copying the die count from the context
(2.4%) and numeric answers fall to 43.9%, so it is off by default. Its `pack` puts several
sentences in a row (the product learnt away from BOS too); its `die_line` puts each sentence
after its die count line and adds the copied total to the loss, so that the sentences train
the copy the answers make instead of a total that is simply there.

The sentence helpers, the batches and the scorer are shared with tools/probe_count_arithmetic.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wamglm_jax.evaluate.qa import score
from wamglm_jax.losses.lm import lm_loss
from wamglm_jax.models.decoder import Decoder
from wamglm_jax.parallel.sharding import activate, process_rows, replicated
from wamglm_jax.qa.answers import render_answer
from wamglm_jax.qa.dialogues import die_total_line
from wamglm_jax.qa.facts import compute_facts
from wamglm_jax.train.loop import check_positive_number

SPLIT = " which is"     # the prompt ends here; the model writes " F dies."
NEW_TOKENS = 7          # greedy tokens scored: up to five digits, " dies" and "."


def _check_sentence_section(section: str, cfg, ints, switch: str, what: str,
                            count_form: str, zone_form: str) -> None:
    """ValueError naming config.stage2.<section>.<field> for an integer field below its low
    bound (`ints`: (field, low) pairs), or the forms when the section is on (cfg[switch] > 0)
    but no answer is share-first (nothing the sentences teach is asked)."""
    for name, low in ints:
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"config.stage2.{section}.{name}={v!r}: expected an integer "
                             f">= {low}")
    if cfg[switch] > 0 and "share_first" not in (count_form, zone_form):
        raise ValueError(f"config.stage2.{section}.{switch}={cfg[switch]}: {what} teaches the "
                         "share-first product, but count_form and zone_form are both "
                         f"{count_form!r}; set one of them to 'share_first' or {switch}=0")


def check_warmup_config(w, count_form: str, zone_form: str) -> None:
    """ValueError naming the field of config.stage2.lm_warmup that is out of range, or the
    forms when the warm-up is on but no answer is share-first."""
    _check_sentence_section("lm_warmup", w, (("num_steps", 0), ("batch_size", 1),
                                             ("max_len", 8), ("num_eval", 0), ("log_every", 0)),
                            "num_steps", "the warm-up", count_form, zone_form)
    check_positive_number("config.stage2.lm_warmup.learning_rate", w.learning_rate)


def check_rehearsal_config(r, count_form: str, zone_form: str) -> None:
    """ValueError naming the field of config.stage2.product_rehearsal that is out of range, or
    the forms when the rehearsal is on but no answer is share-first."""
    w = r.weight
    if (isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not np.isfinite(w)
            or w < 0):
        raise ValueError(f"config.stage2.product_rehearsal.weight={w!r}: expected a finite "
                         "number >= 0 (0 = off)")
    _check_sentence_section("product_rehearsal", r, (("batch_size", 1), ("max_len", 8),
                                                     ("num_eval", 0), ("pack", 1)),
                            "weight", "the rehearsal", count_form, zone_form)


def product_pairs(maps: Sequence[np.ndarray], indices=None, zones: bool = True) -> np.ndarray:
    """int[M,2] (failing, total): each map's, then (with `zones`) each zone with dies. Maps
    without dies are skipped (they have no share to state)."""
    pairs = []
    for i in (range(len(maps)) if indices is None else indices):
        if not (np.asarray(maps[i]) > 0).any():
            continue
        facts = compute_facts(np.asarray(maps[i]))
        pairs.append((facts["failing"], facts["total"]))
        if zones:
            pairs += [(z["failing"], z["dies"]) for z in facts["zones"].values() if z["dies"]]
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def pack_pairs(pairs: np.ndarray, pack: int, seed: int) -> np.ndarray:
    """int[M,2] -> int[M // pack, pack, 2]: the pairs in a seeded random order, `pack` to a row
    (the last M % pack left out; pack 1: the pairs as they are, one to a row), so that each
    sentence is learnt at several places in a row rather than only right after BOS
    (tools/probe_count_arithmetic --pack/--context: trained only at BOS, the LM's count after
    three other sentences is within tolerance for 5% of maps; trained packed, for about as
    many as alone)."""
    pairs = np.asarray(pairs, np.int64)
    if pack == 1:
        return pairs[:, None]                 # batches are drawn at random anyway
    if len(pairs) < pack:
        raise ValueError(f"pack_pairs: {len(pairs)} sentences, fewer than one row of {pack}")
    order = np.random.default_rng(seed).permutation(len(pairs))[:len(pairs) // pack * pack]
    return pairs[order].reshape(-1, pack, 2)


def split_sentence(failing: int, total: int) -> tuple[str, str]:
    """The share-first count answer split into (prompt, target) after `SPLIT`."""
    text = render_answer("count", {"failing": int(failing), "total": int(total)},
                         count_form="share_first")
    head, sep, tail = text.partition(SPLIT)
    if not sep:
        raise ValueError(f"count answer {text!r} lacks {SPLIT!r}: the share-first form changed")
    return head + sep, tail


def sentence_segments(failing: int, total: int, die_line: bool = False
                      ) -> list[tuple[str, bool]]:
    """The product sentence as (text, in the loss) pieces whose concatenation is the sentence:
    [(prompt, False), (target, True)]. With `die_line`, the die count line of the dialogues'
    context comes first and the total copied from it is learnt too: [("The wafer has N
    dies.\n8.4% of the", False), (" N", True), (" dies fail, which is", False), (target,
    True)], as a share-first count answer copies N from its context line."""
    prompt, target = split_sentence(failing, total)
    if not die_line:
        return [(prompt, False), (target, True)]
    head, sep, rest = prompt.partition(f" of the {int(total)} ")
    if not sep:
        raise ValueError(f"count answer prompt {prompt!r} lacks ' of the {int(total)} ': the "
                         "share-first form changed")
    return [(f"{die_total_line(int(total))}\n{head} of the", False), (f" {int(total)}", True),
            (f" {rest}", False), (target, True)]


def sentence_text(failing: int, total: int, die_line: bool = False) -> str:
    """The whole sentence of sentence_segments (its pieces joined)."""
    return "".join(t for t, _ in sentence_segments(failing, total, die_line))


def _segment_ids(tok, segments) -> list[tuple[list[int], bool]]:
    """Each segment's ids, tokenized as part of the whole sentence; ValueError when the
    tokenizer merges tokens across a segment boundary (the loss would cover the wrong ids)."""
    out, text, done = [], "", []
    for piece, loss in segments:
        text += piece
        ids = tok.encode(text, add_special_tokens=False)
        if ids[:len(done)] != done:
            raise ValueError(f"tokenizer splits {text!r} across a loss boundary before "
                             f"{piece!r}")
        out.append((ids[len(done):], loss))
        done = ids
    return out


def encode_sentences(tok, pairs, max_len: int, pad_id: int = 0, field: str = "max_len",
                     die_line: bool = False):
    """pairs int[M,2] (one sentence a row) or int[M,K,2] (K sentences packed in a row, one
    after another) -> tokens int32[M,L] (BOS, each sentence (sentence_segments), EOS, then
    pad_id), loss_mask int32[M,L] (1 on every sentence's target, on its copied total with
    `die_line`, and on the EOS: lm_loss's convention), prompt lengths int32[M] (the tokens
    before the last sentence's target, with BOS: where a greedy count of that sentence starts),
    lengths int32[M]. Sentences are tokenized one by one and their ids concatenated with no
    separator ("... 171 dies.8.4% of ..."), so a packed sentence has the same ids as alone.
    `field` names max_len in the error when a row is longer."""
    pairs = np.asarray(pairs, np.int64)
    if pairs.ndim not in (2, 3) or pairs.shape[-1] != 2:
        raise ValueError(f"encode_sentences: pairs of shape {pairs.shape}; expected [M,2] or "
                         "[M,K,2] (failing, total)")
    if pairs.ndim == 2:
        pairs = pairs[:, None]
    toks = np.full((len(pairs), max_len), pad_id, np.int32)
    mask = np.zeros((len(pairs), max_len), np.int32)
    plen = np.zeros(len(pairs), np.int32)
    lens = np.zeros(len(pairs), np.int32)
    for i, row in enumerate(pairs):
        ids, spans = [tok.bos_token_id], []
        for f, n in row:
            for seg, loss in _segment_ids(tok, sentence_segments(f, n, die_line)):
                if loss:
                    spans.append((len(ids), len(ids) + len(seg)))
                ids += seg
        ids.append(tok.eos_token_id)
        if len(ids) > max_len:
            text = " ".join(sentence_text(f, n, die_line) for f, n in row)
            raise ValueError(f"{text!r}: {len(ids)} tokens > {field}={max_len}")
        toks[i, :len(ids)] = ids
        for a, b in spans:
            mask[i, a:b] = 1
        mask[i, len(ids) - 1] = 1
        plen[i], lens[i] = spans[-1][0], len(ids)
    return toks, mask, plen, lens


class SentenceBatches:
    """Endless, resumable batches of encoded sentences drawn with replacement; batch k is the
    same on every process (seeded by (seed, k)) and each process yields its own rows of it.

    Batches: tokens/loss_mask/attention_mask int32[B_local,L]."""

    def __init__(self, tokens, loss_mask, lengths, *, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.tokens, self.mask = tokens, loss_mask
        self.attn = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
        self.b, self.seed, self.step = global_batch_size, seed, 0
        self.rows = process_rows(global_batch_size, process_index, process_count)

    def __iter__(self):
        return self

    def __next__(self):
        idx = np.random.default_rng((self.seed, self.step)).integers(
            0, len(self.tokens), self.b)[self.rows]
        self.step += 1
        return {"tokens": self.tokens[idx], "loss_mask": self.mask[idx],
                "attention_mask": self.attn[idx]}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


class WithSentences:
    """Stage 2's dialogue batches, each with a batch of product sentences under "sentences"
    (config.stage2.product_rehearsal); resumable: the state holds both iterators'."""

    def __init__(self, dialogues, sentences: SentenceBatches):
        self.dialogues, self.sentences = dialogues, sentences

    def __iter__(self):
        return self

    def __next__(self):
        return dict(next(self.dialogues), sentences=next(self.sentences))

    def get_state(self):
        return {"dialogues": self.dialogues.get_state(), "sentences": self.sentences.get_state()}

    def set_state(self, state):
        if set(state) != {"dialogues", "sentences"}:
            raise ValueError(f"data iterator state {sorted(state)}: expected 'dialogues' and "
                             "'sentences' (was this checkpoint written without "
                             "config.stage2.product_rehearsal?)")
        self.dialogues.set_state(state["dialogues"])
        self.sentences.set_state(state["sentences"])


def make_warmup_step(model_cfg):
    """train_step(state, batch) for train.loop: the loss of the LM alone (params['lm'], text
    only) on the batch's loss_mask; the state holds the whole model's params."""
    lm = Decoder(model_cfg)

    def train_step(state, batch):
        def loss_fn(params):
            logits = lm.apply({"params": params["lm"]}, batch["tokens"],
                              attention_mask=batch["attention_mask"])
            out = lm_loss(logits, batch["tokens"], batch["loss_mask"])
            return out["loss"], out

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads)
        return state, dict(metrics, grad_norm=optax.global_norm(grads["lm"]))
    return train_step


def make_greedy(model_cfg, new_tokens: int = NEW_TOKENS, mesh=None):
    """greedy(lm_params, tokens int32[M,L], prompt_len int32[M]) -> int32[M,L]: `new_tokens`
    argmax tokens written after each row's prompt (a full forward per token: short prompts).
    With `mesh` the result is replicated on it (readable on every process)."""
    lm = Decoder(model_cfg)

    @functools.partial(jax.jit, out_shardings=None if mesh is None else replicated(mesh))
    def greedy(params, toks, plen):
        rows = jnp.arange(toks.shape[0])
        toks = jnp.where(jnp.arange(toks.shape[1])[None] < plen[:, None], toks, 0)

        def next_logits(m, toks, attn, at):      # float[M,V]: only the position read
            hidden, _ = m.hidden_states(m.embed(toks), attn)
            return m.logits(hidden[rows, at][:, None])[:, 0]

        def body(k, toks):
            attn = (jnp.arange(toks.shape[1])[None] < (plen + k)[:, None]).astype(jnp.int32)
            logits = lm.apply({"params": params}, toks, attn, plen + k - 1, method=next_logits)
            return toks.at[rows, plen + k].set(logits.argmax(-1).astype(jnp.int32))
        return jax.lax.fori_loop(0, new_tokens, body, toks)
    return greedy


def score_counts(generated, tok, plen, pairs, new_tokens: int = NEW_TOKENS) -> dict:
    """The first word written after each prompt read as the count and scored with the QA
    tolerance (evaluate.qa.score: within 10%, or 1 die below 10 dies). Stricter than the QA
    parser, whose fallback would read the share's first digit from a reply without a number.
    -> {within_tol, exact}: fractions of the rows."""
    within = exact = 0
    for row, p, (failing, _) in zip(np.asarray(generated), plen, pairs):
        words = tok.decode(row[p:p + new_tokens], skip_special_tokens=True).split()
        guess = int(words[0]) if words and words[0].isdigit() else None
        within += score("count", {"failing": guess}, {"failing": int(failing)})
        exact += guess == int(failing)
    return {"within_tol": within / max(len(pairs), 1), "exact": exact / max(len(pairs), 1)}


def score_text_product(lm_params, model_cfg, tok, maps, indices, max_len: int, *,
                       field: str = "max_len", mesh=None, rules=(), die_line: bool = False
                       ) -> dict:
    """The LM alone, greedy, on the count sentence's prompt ("8.4% of the 2046 dies fail,
    which is", after its die count line with `die_line`) of each map in maps[indices] with
    dies (the whole map, not its zones): the product as text, without the image or the
    dialogue. -> {sentences, within_tol, exact}. With `mesh` the greedy runs on it (under
    `rules`); the result is read on every process."""
    pairs = product_pairs(maps, indices, zones=False)
    if not len(pairs):
        return {"sentences": 0, "within_tol": None, "exact": None}
    toks, _, plen, _ = encode_sentences(tok, pairs, max_len, int(tok.pad_token_id), field=field,
                                        die_line=die_line)
    greedy = make_greedy(model_cfg, mesh=mesh)
    if mesh is None:
        out = greedy(lm_params, toks, plen)
    else:
        with activate(mesh, rules):
            out = greedy(lm_params, toks, plen)
    return dict(sentences=len(pairs), **score_counts(out, tok, plen, pairs))
