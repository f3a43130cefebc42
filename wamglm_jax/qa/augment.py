"""Question-wording noise for training dialogues (robustness to phrasings never seen).

A language model trained from scratch on a few dozen question templates learns them as fixed
strings: one unfamiliar word ("Tally the bad dies", "the failure signature") and it answers a
different question. `noise_questions` corrupts the wording of a fraction of the training
dialogues: each word of a question is, with probability `word_prob`, dropped or replaced by a
word that never occurs in any training question (drawn from the training answers, which
quote the knowledge base), so that the model has to infer the question from the words it does
know and from the dialogue around it. Words that name what a question asks about are never
used as fillers: besides the training questions' own words, the pattern names (a
type-location question names its pattern) and the zone words (a zone follow-up names its
zone); without that ban, noise that drops a pattern name into a location question teaches the
model to confuse the two.
A replacement can also be a made-up word (`pseudo_word`, config.stage2.question_noise.
pseudo_share): the tokenizer cuts a word it never saw into short fragments ("signature" ->
"s ig n at ure"), which whole filler words never put in a question; made-up words cut from
filler pieces give the model such fragments to learn to ignore.
Only the question text changes: the `<image>` marker, the context lines (die count, lot) and
every answer (the training targets) are untouched. The evaluation's held-out phrasings are
not looked at: the filler words come from the training answers only, and a made-up word that
happens to spell a pinned held-out-only word (phrasings.HELDOUT_ONLY_WORDS) is drawn again,
so no held-out word reaches training by chance.

`frame_questions` wraps a fraction of the training questions in neutral frames
(phrasings.FRAMES: "Quick question: ...", "... Thanks.") so that words which occur in one kind's
phrasings only by chance ("this map" in a yield question) stop being read as the kind. It was
added after one held-out phrasing ("Identify the failure signature on this map.") was answered
as a yield in almost every dialogue of one real-data run; the frames use no word that only
held-out phrasings use. Measured on two real-data runs (README "Neutral frames"): held-out
answers rise by 6 and 10 points, but that phrasing is still misread (now as a location), so
it is off by default (config.stage2.question_frames.prob=0).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from wamglm_jax.data.labels import WM811K_CLASSES
from wamglm_jax.qa.phrasings import FRAMES, HELDOUT_ONLY_WORDS, TRAIN, ZONE_WORDS

_WORD = re.compile(r"[A-Za-z][A-Za-z\-']*")


def question_words() -> set[str]:
    """Lower-cased words a question may carry: every training phrasing's words (placeholders
    removed), the values its placeholders take (pattern names, zone words) and their parts."""
    out = set()
    for qs in TRAIN.values():
        for q in qs:
            out.update(w.lower() for w in _WORD.findall(re.sub(r"\{\w+\}", "", q)))
    for name in (*WM811K_CLASSES, *ZONE_WORDS, *ZONE_WORDS.values(), "centre"):
        for w in _WORD.findall(name):
            out.update({w.lower(), *w.lower().split("-")})
    return out


def filler_vocabulary(items: Sequence[dict]) -> list[str]:
    """Sorted words of the items' assistant answers that share no part (split at '-') with
    question_words()."""
    banned, words = question_words(), set()
    for it in items:
        for m in it["messages"]:
            if m["role"] == "assistant":
                words.update(w for w in _WORD.findall(m["content"]) if len(w) > 2)
    return sorted(w for w in words
                  if not {w.lower(), *w.lower().split("-")} & banned)   # 'edge-bead': edge


def _split_question(content: str) -> tuple[str, str]:
    """(prefix, question): the question is the last line of a user message (the first turn
    carries `<image>` and the context lines on the lines before it)."""
    head, sep, q = content.rpartition("\n")
    return head + sep, q


def made_up_word_ban(fillers: Sequence[str]) -> set[str]:
    """What a made-up word must never spell: a question word, a filler, or a word that only
    held-out phrasings use."""
    return question_words() | {f.lower() for f in fillers} | set(HELDOUT_ONLY_WORDS)


def pseudo_word(rng: np.random.Generator, fillers: Sequence[str], banned: set[str],
                capitalise: bool = False) -> str:
    """A made-up word: two or three random pieces (2-4 letters) cut from random fillers and
    joined ("tiondis", "ermpla"), never a word in `banned`.

    Why: the tokenizer is trained on the training dialogues, so a word it has never seen is
    cut into short fragments ("signature" -> "s ig n at ure"), a token pattern that neither the
    training questions nor whole filler words ever put in a question. Made-up words cut the
    same way teach the model that such fragments carry no question kind."""
    for _ in range(32):
        pieces = []
        for _ in range(int(rng.integers(2, 4))):
            src = fillers[int(rng.integers(len(fillers)))].lower()
            size = int(rng.integers(2, 5))
            start = int(rng.integers(max(1, len(src) - size + 1)))
            pieces.append(src[start:start + size])
        word = "".join(pieces)
        if word not in banned and len(word) > 2:
            return word.capitalize() if capitalise else word
    raise ValueError(f"no made-up word outside the banned words in 32 draws from "
                     f"{len(fillers)} filler words: too few fillers for "
                     "config.stage2.question_noise.pseudo_share > 0")


def noise_question(question: str, rng: np.random.Generator, fillers: Sequence[str],
                   word_prob: float, pseudo_share: float = 0.0,
                   banned: set[str] | None = None) -> str:
    """Each whitespace-separated word: kept, or (probability word_prob) dropped or replaced
    with equal chance. A replacement is a made-up word (pseudo_word; none spells a word of
    `banned`, default made_up_word_ban(fillers)) with probability pseudo_share, else a random
    filler. At least one original word always survives."""
    if not fillers:
        return question
    if pseudo_share > 0 and banned is None:
        banned = made_up_word_ban(fillers)
    words = question.split(" ")
    hit = rng.random(len(words)) < word_prob
    if hit.all():
        hit[int(rng.integers(len(words)))] = False
    out = []
    for i, (w, h) in enumerate(zip(words, hit)):
        if not h:
            out.append(w)
        elif rng.random() < 0.5:
            if pseudo_share > 0 and rng.random() < pseudo_share:
                out.append(pseudo_word(rng, fillers, banned, capitalise=i == 0))
            else:
                out.append(fillers[int(rng.integers(len(fillers)))])
    return " ".join(out)


def check_probability(field: str, p) -> None:
    """ValueError naming `field` unless p is a probability in [0, 1]."""
    try:
        ok = 0.0 <= float(p) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{field}={p!r}: expected a probability in [0, 1]")


def noise_questions(items: Sequence[dict], *, dialogue_prob: float, word_prob: float,
                    seed: int, fillers: Sequence[str] | None = None,
                    pseudo_share: float = 0.0) -> tuple[list[dict], int]:
    """(items with noised questions, how many dialogues were noised). A dialogue is chosen
    with probability dialogue_prob; then every user turn's question is noised (pseudo_share:
    see noise_question). Items are copied, never modified in place. Deterministic given
    `seed`; pseudo_share=0 draws exactly what it drew before made-up words existed."""
    check_probability("config.stage2.question_noise.dialogue_prob", dialogue_prob)
    check_probability("config.stage2.question_noise.word_prob", word_prob)
    check_probability("config.stage2.question_noise.pseudo_share", pseudo_share)
    if dialogue_prob <= 0 or word_prob <= 0:
        return list(items), 0
    fillers = list(fillers) if fillers is not None else filler_vocabulary(items)
    banned = made_up_word_ban(fillers)          # once, not per question
    rng = np.random.default_rng([int(seed), 0x9015E])
    out, n = [], 0
    for it in items:
        if rng.random() >= dialogue_prob:
            out.append(it)
            continue
        msgs = []
        for m in it["messages"]:
            if m["role"] == "user":
                head, q = _split_question(m["content"])
                m = dict(m, content=head + noise_question(q, rng, fillers, word_prob,
                                                             pseudo_share, banned))
            msgs.append(m)
        out.append(dict(it, messages=msgs, question_noise=True))
        n += 1
    return out, n


def frame_question(question: str, frame: str) -> str:
    """The question inside a frame of phrasings.FRAMES ({q}: as written, {lc}: first letter
    lower-cased)."""
    return frame.format(q=question, lc=question[:1].lower() + question[1:])


def frame_questions(items: Sequence[dict], *, prob: float, seed: int,
                    frames: Sequence[str] = FRAMES) -> tuple[list[dict], int]:
    """(items with framed questions, how many questions were framed). Each user turn's question
    is framed with probability `prob` by a random frame; only the question line changes. Items
    are copied, never modified in place. Deterministic given `seed`."""
    check_probability("config.stage2.question_frames.prob", prob)
    if prob <= 0:
        return list(items), 0
    rng = np.random.default_rng([int(seed), 0xF4A3E])
    out, n = [], 0
    for it in items:
        msgs, framed = [], 0
        for m in it["messages"]:
            if m["role"] == "user" and rng.random() < prob:
                head, q = _split_question(m["content"])
                frame = frames[int(rng.integers(len(frames)))]
                m = dict(m, content=head + frame_question(q, frame))
                framed += 1
            msgs.append(m)
        out.append(dict(it, messages=msgs, question_frames=framed) if framed else it)
        n += framed
    return out, n
