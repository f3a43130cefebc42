"""qa/augment.py question-wording noise and neutral frames, and stage-2 training-map selection
(capped_indices)."""
import collections
import itertools
import re

import numpy as np
import pytest

from wamglm_jax.data.generator import generate
from wamglm_jax.qa import phrasings
from wamglm_jax.qa.augment import (filler_vocabulary, frame_questions, made_up_word_ban,
                                    noise_questions, pseudo_word, question_words)
from wamglm_jax.qa.dialogues import build_dialogues
from wamglm_jax.train.stage2_data import capped_indices


@pytest.fixture(scope="module")
def items():
    return build_dialogues(generate(40, seed=5), seed=1, per_map=2)


def _question(content):
    return content.rsplit("\n", 1)[-1]


def test_noise_changes_only_question_words(items):
    fillers = filler_vocabulary(items)
    banned = question_words()
    assert fillers and not {w.lower() for w in fillers} & banned
    # nothing that names a pattern or a zone (what type-location / zone questions carry)
    assert {"center", "edge", "ring", "scratch", "loc", "donut", "none", "middle"} <= banned
    assert not {p for w in fillers for p in w.lower().split("-")} & banned
    out, n = noise_questions(items, dialogue_prob=1.0, word_prob=0.5, seed=3)
    assert n == len(items) == len(out)
    kept = total = 0
    for a, b in zip(items, out):
        assert b["question_noise"] and "question_noise" not in a      # copies, not in place
        assert len(a["messages"]) == len(b["messages"])
        for ma, mb in zip(a["messages"], b["messages"]):
            if ma["role"] == "assistant":
                assert ma == mb
                continue
            # <image> and the lot context line (every line but the last) are untouched
            assert ma["content"].rsplit("\n", 1)[:-1] == mb["content"].rsplit("\n", 1)[:-1]
            orig, new = _question(ma["content"]).split(" "), _question(mb["content"]).split(" ")
            # the new words are the surviving originals in order, with fillers between them
            survivors = [w for w in new if w not in fillers or w in orig]
            it = iter(orig)
            assert all(any(w == o for o in it) for w in survivors), (orig, new)
            assert any(w in orig for w in new)            # at least one original word survives
            kept += sum(1 for w in new if w in orig)
            total += len(orig)
    # each word is hit with probability 0.5: about half survive (binomial, n ~ 1000)
    assert 0.42 < kept / total < 0.6, kept / total


def test_noise_fraction_and_determinism(items):
    out1, n1 = noise_questions(items, dialogue_prob=0.5, word_prob=0.3, seed=7)
    out2, n2 = noise_questions(items, dialogue_prob=0.5, word_prob=0.3, seed=7)
    assert out1 == out2 and n1 == n2 == sum(bool(it.get("question_noise")) for it in out1)
    assert 0.25 * len(items) < n1 < 0.75 * len(items)
    same, n0 = noise_questions(items, dialogue_prob=0.0, word_prob=0.3, seed=7)
    assert n0 == 0 and same == list(items)


@pytest.mark.parametrize("field,kw", [("dialogue_prob", dict(dialogue_prob=1.5, word_prob=0.2)),
                                      ("word_prob", dict(dialogue_prob=0.5, word_prob=-0.1))])
def test_noise_rejects_bad_probabilities(items, field, kw):
    with pytest.raises(ValueError, match=f"question_noise.{field}"):
        noise_questions(items, seed=0, **kw)


def test_pseudo_words_are_new_fragments_of_fillers(items, tmp_path):
    """Made-up words: never a banned word, built from pieces of fillers, capitalised on request,
    and cut by a tokenizer trained on the dialogues into several tokens, as an unseen word is
    (a whole filler mostly is one token)."""
    from wamglm_jax.qa.tokenizer import build_tokenizer
    fillers = filler_vocabulary(items)
    banned = question_words() | {f.lower() for f in fillers} | set(phrasings.HELDOUT_ONLY_WORDS)
    assert made_up_word_ban(fillers) == banned
    rng = np.random.default_rng(0)
    made = [pseudo_word(rng, fillers, banned) for _ in range(300)]
    assert not set(made) & banned and len(set(made)) > 250
    text = " ".join(f.lower() for f in fillers)
    for w in made:
        assert w.isalpha() or "-" in w or "'" in w
        # the first and last pieces (>= 2 letters each) are cut from fillers
        assert w[:2] in text and w[-2:] in text, w
    assert pseudo_word(rng, fillers, banned, capitalise=True)[0].isupper()
    # a single filler whose every made-up word is banned: a clear error, not a banned word
    cuts = ["ab", "ba", "aba", "bab", "abab"]          # its pieces of 2-4 letters
    every = {"".join(p) for n in (2, 3) for p in itertools.product(cuts, repeat=n)}
    with pytest.raises(ValueError, match="too few fillers"):
        pseudo_word(rng, ["abab"], every)
    tok = build_tokenizer(items, str(tmp_path / "tok"), vocab_size=1024)
    pieces = lambda w: len(tok.tokenize(" " + w))
    assert np.mean([pieces(w) for w in made]) > 1.5 * np.mean([pieces(f) for f in fillers])


def test_noise_with_pseudo_share_one_replaces_with_made_up_words_only(items):
    fillers = set(filler_vocabulary(items))
    heldout_only = phrasings.HELDOUT_ONLY_WORDS
    out, n = noise_questions(items, dialogue_prob=1.0, word_prob=0.5, seed=3, pseudo_share=1.0)
    new_words = []
    for a, b in zip(items, out):
        for ma, mb in zip(a["messages"], b["messages"]):
            if ma["role"] == "user":
                orig = set(_question(ma["content"]).split(" "))
                new_words += [w for w in _question(mb["content"]).split(" ") if w not in orig]
    assert len(new_words) > 100 and not set(new_words) & fillers
    assert not {w.lower() for w in new_words} & (question_words() | heldout_only)
    # pseudo_share=0: every replacement is a filler, as before made-up words existed
    out0, _ = noise_questions(items, dialogue_prob=1.0, word_prob=0.5, seed=3, pseudo_share=0.0)
    for a, b in zip(items, out0):
        for ma, mb in zip(a["messages"], b["messages"]):
            if ma["role"] == "user":
                orig = set(_question(ma["content"]).split(" "))
                assert set(_question(mb["content"]).split(" ")) <= orig | fillers
    with pytest.raises(ValueError, match="question_noise.pseudo_share"):
        noise_questions(items, dialogue_prob=0.5, word_prob=0.3, seed=0, pseudo_share=1.2)


def _words(texts):
    return {w.lower() for s in texts
            for w in re.findall(r"[A-Za-z][A-Za-z\-']*", re.sub(r"\{\w+\}", "", s))}


def test_training_text_uses_no_heldout_only_word():
    """Held-out phrasings stay unseen: no training phrasing or frame uses a word of the pinned
    held-out-only vocabulary, no held-out phrasing is also a training one, and the pinned
    words really occur in held-out phrasings (so the check bites)."""
    heldout = _words(q for v in phrasings.HELDOUT.values() for q in v)
    assert phrasings.HELDOUT_ONLY_WORDS <= heldout
    assert {"identify", "signature", "tally", "whereabouts"} <= phrasings.HELDOUT_ONLY_WORDS
    for kind, qs in phrasings.TRAIN.items():
        for q in qs:
            assert not _words([q]) & phrasings.HELDOUT_ONLY_WORDS, (kind, q)
        assert not {q.lower() for q in qs} & {q.lower() for q in phrasings.HELDOUT[kind]}
        assert len(set(qs)) == len(qs), kind                  # no phrasing listed twice
    assert not _words(phrasings.FRAMES) & phrasings.HELDOUT_ONLY_WORDS
    for f in phrasings.FRAMES:                        # every frame holds the question once
        assert f.count("{q}") + f.count("{lc}") == 1, f


def test_frames_wrap_only_the_question_line(items):
    out, n = frame_questions(items, prob=1.0, seed=3)
    n_user = sum(m["role"] == "user" for it in items for m in it["messages"])
    assert n == n_user and len(out) == len(items)
    used = collections.Counter()
    for a, b in zip(items, out):
        assert "question_frames" not in a and b["question_frames"] == sum(
            m["role"] == "user" for m in a["messages"])              # copies, not in place
        for ma, mb in zip(a["messages"], b["messages"]):
            if ma["role"] == "assistant":
                assert ma == mb
                continue
            assert ma["content"].rsplit("\n", 1)[:-1] == mb["content"].rsplit("\n", 1)[:-1]
            q, new = _question(ma["content"]), _question(mb["content"])
            hits = [f for f in phrasings.FRAMES
                    if new == f.replace("{q}", q).replace("{lc}", q[0].lower() + q[1:])]
            assert len(hits) == 1, (q, new)
            used[hits[0]] += 1
    assert set(used) == set(phrasings.FRAMES)          # ~300 questions: every frame drawn


def test_frames_fraction_determinism_and_bad_probability(items):
    out1, n1 = frame_questions(items, prob=0.3, seed=7)
    assert (out1, n1) == frame_questions(items, prob=0.3, seed=7)
    n_user = sum(m["role"] == "user" for it in items for m in it["messages"])
    assert 0.22 * n_user < n1 < 0.38 * n_user
    assert frame_questions(items, prob=0.0, seed=7) == (list(items), 0)
    with pytest.raises(ValueError, match=r"question_frames.prob=1.5"):
        frame_questions(items, prob=1.5, seed=0)


def test_capped_indices_flat_and_sqrt():
    labels = np.repeat([0, 1, 2, 3], [400, 100, 25, 1])
    labels = np.random.default_rng(0).permutation(np.concatenate([labels, [-1, -1]]))
    assert capped_indices(labels, 0, seed=0) is None
    for scaling, want in (("flat", {0: 40, 1: 40, 2: 25, 3: 1}),
                          ("sqrt", {0: 40, 1: 20, 2: 10, 3: 1})):   # 40 * sqrt(n / 400)
        idx = capped_indices(labels, 40, seed=0, scaling=scaling)
        assert idx == sorted(set(idx)) and -1 not in labels[idx]
        assert collections.Counter(labels[idx].tolist()) == want
    with pytest.raises(ValueError, match="class_scaling='cube'"):
        capped_indices(labels, 40, seed=0, scaling="cube")


@pytest.mark.parametrize("value", [1.01, -0.5, "half", None, float("nan")])
def test_check_probability_names_the_field(value):
    from wamglm_jax.qa.augment import check_probability
    with pytest.raises(ValueError, match=r"^config.stage2.x.p=.*: expected a probability"):
        check_probability("config.stage2.x.p", value)
    check_probability("config.stage2.x.p", 0.0)          # the ends are allowed
    check_probability("config.stage2.x.p", 1)
