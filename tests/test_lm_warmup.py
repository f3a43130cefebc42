"""train/lm_warmup.py: the product sentences, their loss mask, batches, the step and the
scorer; stage 2's warm-up phase (its directory, resume, report info) and its config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from wamglm_jax.data.generator import generate
from wamglm_jax.qa.tokenizer import train_tokenizer
from wamglm_jax.train import lm_warmup

PAIRS = [(171, 2046), (0, 518), (1, 44), (9, 95), (3849, 4922)]


@pytest.fixture(scope="module")
def tok():
    texts = [a + b for a, b in (lm_warmup.split_sentence(f, n) for f, n in PAIRS)]
    return train_tokenizer(texts, vocab_size=300)


def test_split_sentence_is_the_share_first_answer():
    assert lm_warmup.split_sentence(171, 2046) == ("8.4% of the 2046 dies fail, which is",
                                                   " 171 dies.")
    assert lm_warmup.split_sentence(1, 44) == ("2.3% of the 44 dies fail, which is", " 1 die.")


def test_encode_mask_covers_exactly_the_target_and_eos(tok):
    toks, mask, plen, lens = lm_warmup.encode_sentences(tok, PAIRS, max_len=32, pad_id=7)
    for row, m, p, n, (f, total) in zip(toks, mask, plen, lens, PAIRS):
        prompt, target = lm_warmup.split_sentence(f, total)
        assert row[0] == tok.bos_token_id and tok.decode(row[1:p]) == prompt
        masked = row[m > 0]
        assert masked[-1] == tok.eos_token_id and tok.decode(masked[:-1]) == target
        assert np.flatnonzero(m).tolist() == list(range(p, n))
        assert (row[n:] == 7).all()


def test_encode_packed_rows_are_the_sentences_one_after_another(tok):
    """[M,K,2] pairs: each row is BOS, then the K sentences' own ids (as encoded alone),
    then EOS; the mask covers each target and the EOS; plen is where the last target starts."""
    rows = np.asarray(PAIRS[:4]).reshape(2, 2, 2)
    toks, mask, plen, lens = lm_warmup.encode_sentences(tok, rows, max_len=64, pad_id=7)
    one, one_mask, one_plen, one_lens = lm_warmup.encode_sentences(tok, PAIRS[:4], max_len=32)
    for r in range(2):
        a, b = 2 * r, 2 * r + 1          # the two sentences of row r, encoded alone
        body_a = one[a, 1:one_lens[a] - 1]                       # without BOS and EOS
        body_b = one[b, 1:one_lens[b] - 1]
        expect = np.concatenate([[tok.bos_token_id], body_a, body_b, [tok.eos_token_id]])
        assert lens[r] == len(expect) and (toks[r, :lens[r]] == expect).all()
        assert (toks[r, lens[r]:] == 7).all()
        want = np.zeros(64, np.int32)
        want[one_plen[a]:one_lens[a] - 1] = 1                    # first target, same offsets
        shift = len(body_a)
        want[shift + one_plen[b]:lens[r]] = 1                    # second target and the EOS
        assert (mask[r] == want).all()
        assert plen[r] == shift + one_plen[b]
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        lm_warmup.encode_sentences(tok, np.zeros((4, 3), np.int64), max_len=32)


def test_encode_with_the_die_line_learns_the_copied_total_and_the_count(tok):
    """die_line: each row reads "The wafer has N dies.\n" + the sentence; the loss covers
    the N copied into the sentence, the count and the EOS, nothing else; plen is where the
    count starts. Checked by decoding the runs of the mask, packed and alone."""
    toks, mask, plen, lens = lm_warmup.encode_sentences(tok, PAIRS, max_len=48, die_line=True)
    for row, m, p, n, (f, total) in zip(toks, mask, plen, lens, PAIRS):
        prompt, target = lm_warmup.split_sentence(f, total)
        assert tok.decode(row[1:n - 1]) == f"The wafer has {total} dies.\n{prompt}{target}"
        runs = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))
        starts, ends = runs[::2], runs[1::2]
        assert [tok.decode(row[a:b]) for a, b in zip(starts, ends)] == [
            f" {total}", target + tok.eos_token]
        assert ends[-1] == n and starts[-1] == p
        assert tok.decode(row[1:p]) == f"The wafer has {total} dies.\n{prompt}"
    rows = np.asarray(PAIRS[:4]).reshape(2, 2, 2)
    packed, packed_mask, packed_plen, _ = lm_warmup.encode_sentences(tok, rows, max_len=96,
                                                                     die_line=True)
    one_body = [toks[k, 1:lens[k] - 1] for k in range(4)]
    for r in range(2):
        body = np.concatenate(one_body[2 * r:2 * r + 2])
        assert (packed[r, 1:1 + len(body)] == body).all()
        assert packed_mask[r].sum() == mask[2 * r].sum() + mask[2 * r + 1].sum() - 1
        assert packed_plen[r] == len(one_body[2 * r]) + plen[2 * r + 1]


def test_sentence_segments_and_a_tokenizer_that_merges_across_them():
    assert lm_warmup.sentence_segments(171, 2046) == [
        ("8.4% of the 2046 dies fail, which is", False), (" 171 dies.", True)]
    segs = lm_warmup.sentence_segments(171, 2046, die_line=True)
    assert segs == [("The wafer has 2046 dies.\n8.4% of the", False), (" 2046", True),
                    (" dies fail, which is", False), (" 171 dies.", True)]

    class WholeText:        # one id per text: every boundary is merged away
        bos_token_id, eos_token_id = 1, 2

        def encode(self, text, add_special_tokens=False):
            return [len(text)]
    with pytest.raises(ValueError, match=r"tokenizer splits .* across a loss boundary before "
                                         r"' 2046'"):
        lm_warmup.encode_sentences(WholeText(), [(171, 2046)], max_len=16, die_line=True)


def test_encode_rejects_a_too_short_buffer(tok):
    with pytest.raises(ValueError, match="max_len=8"):
        lm_warmup.encode_sentences(tok, PAIRS, max_len=8)
    with pytest.raises(ValueError, match=r"tokens > config.stage2.lm_warmup.max_len=9"):
        lm_warmup.encode_sentences(tok, PAIRS, max_len=9, field="config.stage2.lm_warmup.max_len")


def test_product_pairs_match_a_brute_force_count():
    maps = list(generate(12, seed=3).maps) + [np.zeros((9, 9), np.uint8)]   # the last: no dies
    plain = lm_warmup.product_pairs(maps, zones=False)
    assert plain.tolist() == [[int((m == 2).sum()), int((m > 0).sum())] for m in maps[:-1]]
    n_zones = 0
    for i, m in enumerate(maps[:-1]):     # each map's pair, then its zones': they add up to it
        one = lm_warmup.product_pairs([m], zones=True)
        assert one[0].tolist() == plain[i].tolist() and 2 <= len(one) <= 4
        assert one[1:].sum(0).tolist() == plain[i].tolist() and (one[1:, 1] > 0).all()
        n_zones += len(one) - 1
    some = lm_warmup.product_pairs(maps, indices=[2, 5], zones=True)
    np.testing.assert_array_equal(some, np.concatenate([
        lm_warmup.product_pairs([maps[2]]), lm_warmup.product_pairs([maps[5]])]))
    assert len(lm_warmup.product_pairs(maps)) == len(maps) - 1 + n_zones


def test_sentence_batches_split_rows_across_processes_and_resume():
    toks = np.arange(40 * 6, dtype=np.int32).reshape(40, 6)
    mask = (toks % 2).astype(np.int32)
    lens = np.arange(40, dtype=np.int32) % 6 + 1
    one = lm_warmup.SentenceBatches(toks, mask, lens, global_batch_size=8, seed=4)
    two = [lm_warmup.SentenceBatches(toks, mask, lens, global_batch_size=8, seed=4,
                                     process_index=p, process_count=2) for p in range(2)]
    first = [next(one) for _ in range(3)]
    for b in first:
        rows = b["tokens"][:, 0] // 6
        np.testing.assert_array_equal(b["loss_mask"], mask[rows])
        np.testing.assert_array_equal(b["attention_mask"],
                                      np.arange(6)[None] < lens[rows][:, None])
    for b in first:                     # the two processes' rows are the global batch
        parts = [next(t) for t in two]
        for key in b:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), b[key])
    resumed = lm_warmup.SentenceBatches(toks, mask, lens, global_batch_size=8, seed=4)
    resumed.set_state(json.loads(json.dumps(one.get_state())))
    np.testing.assert_array_equal(next(resumed)["tokens"], next(one)["tokens"])
    with pytest.raises(ValueError, match="not a multiple of the 3 processes"):
        lm_warmup.SentenceBatches(toks, mask, lens, global_batch_size=8, seed=4,
                                  process_index=0, process_count=3)


def _fake_greedy(tok, answers):
    """A stand-in for the model: row i's prompt, then `answers[i]`, then padding."""
    def greedy(toks, plen):
        out = np.array(toks)
        for i, text in enumerate(answers):
            ids = tok.encode(text, add_special_tokens=False)
            out[i, int(plen[i]):] = 0
            out[i, int(plen[i]):int(plen[i]) + len(ids)] = ids
        return out
    return greedy


def test_score_counts_uses_the_qa_tolerance(tok):
    toks, _, plen, _ = lm_warmup.encode_sentences(tok, PAIRS, max_len=32)
    # within 10% (or 1 die below 10): 171 -> 185 ok (8.2%), 0 -> 1 ok, 1 -> 3 no (2 dies),
    # 9 -> 10 ok, 3849 -> 4300 no (11.7%)
    answers = [" 185 dies.", " 1 die.", " 3 dies.", " 10 dies.", " 4300 dies."]
    got = lm_warmup.score_counts(_fake_greedy(tok, answers)(toks, plen), tok, plen, PAIRS)
    assert got == {"within_tol": 3 / 5, "exact": 0.0}
    exact = [lm_warmup.split_sentence(f, n)[1] for f, n in PAIRS]
    got = lm_warmup.score_counts(_fake_greedy(tok, exact)(toks, plen), tok, plen, PAIRS)
    assert got == {"within_tol": 1.0, "exact": 1.0}
    garbled = [" dies.", " x", "", " 9", " 4000"]   # no number, nothing, then 9 vs 9 and 4000
    got = lm_warmup.score_counts(_fake_greedy(tok, garbled)(toks, plen), tok, plen, PAIRS)
    assert got == {"within_tol": 2 / 5, "exact": 1 / 5}


def test_warmup_step_loss_is_numpy_cross_entropy_and_only_the_lm_moves(tok):
    """The step's loss equals a numpy log-softmax CE over the masked targets of the Decoder's
    logits; after steps with a positive learning rate the LM changed, vision and projector
    did not; greedy with those params writes from the prompt on."""
    from configs import presets
    from wamglm_jax.models.decoder import Decoder
    from wamglm_jax.models.wamglm import WamGLM, num_image_tokens
    from wamglm_jax.train import optim
    from wamglm_jax.train.state import TrainState

    cfg = presets.model_config("tiny")
    cfg.lm.vocab_size = 384
    cfg.image_token_id = 383
    model = WamGLM(cfg)
    s, n = cfg.vit.image_size, 4
    init_toks = jnp.asarray([[1] + [cfg.image_token_id] * num_image_tokens(cfg) + [2]])
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)),
                                      init_toks, jnp.ones_like(init_toks))["params"])
    opt = optim.default_optimizer_config(learning_rate=1e-2, warmup_steps=0,
                                         trainable=("^lm/",), freeze=())
    tx, _ = optim.make_optimizer(opt, 10, params)
    state = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(1))
    toks, mask, plen, lens = lm_warmup.encode_sentences(tok, PAIRS[:n], max_len=24)
    batch = next(lm_warmup.SentenceBatches(toks, mask, lens, global_batch_size=n, seed=0))
    step = jax.jit(lm_warmup.make_warmup_step(cfg))
    new, metrics = step(state, batch)

    logits = np.asarray(Decoder(cfg).apply({"params": params["lm"]}, batch["tokens"],
                                           attention_mask=batch["attention_mask"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                            keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = [-logp[b, t - 1, batch["tokens"][b, t]] for b in range(n) for t in range(1, 24)
           if batch["loss_mask"][b, t]]
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(nll), rtol=1e-5)
    for _ in range(3):
        new, _ = step(new, batch)
    moved = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                   jax.tree.leaves(b)))
    assert moved(new.params["lm"], params["lm"])
    assert not moved(new.params["vision"], params["vision"])
    assert not moved(new.params["projector"], params["projector"])
    out = np.asarray(lm_warmup.make_greedy(cfg, new_tokens=3)(new.params["lm"], toks, plen))
    for row, orig, p in zip(out, toks, plen):
        np.testing.assert_array_equal(row[:p], orig[:p])
        assert (row[p + 3:] == 0).all()
        for k in range(3):              # each token: the argmax of a full forward on the prefix
            prefix = np.zeros_like(row)[None]
            prefix[0, :p + k] = row[:p + k]
            full = Decoder(cfg).apply({"params": new.params["lm"]}, prefix,
                                      attention_mask=(prefix > 0).astype(np.int32))
            assert row[p + k] == int(np.argmax(full[0, p + k - 1]))


def _ci_config():
    from configs import quickstart
    config = quickstart.get_config("ci")
    config.stage2.init_vision_from_stage1 = False
    config.stage2.lm_warmup.update(num_steps=4, batch_size=8, log_every=2, num_eval=6)
    return config


@pytest.mark.slow
def test_stage2_runs_the_warmup_phase_and_resumes_it(tmp_path, monkeypatch):
    """stage2.run with lm_warmup.num_steps=4: workdir/stage2_lm_warmup trains 4 steps on every
    training map's and zone's sentence, scores 6 val maps, and hands its LM on; a second run
    resumes the finished phase from its checkpoint (same params, no new steps)."""
    from wamglm_jax.train import stage2

    class Stop(Exception):
        pass

    seen = []
    real = stage2.warm_up_lm

    def spy(s2, params, *a, **k):
        before = jax.device_get(params["lm"])
        lm, info = real(s2, params, *a, **k)
        seen.append((before, jax.device_get(lm), info, a))
        return lm, info

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(stage2, "warm_up_lm", spy)
    monkeypatch.setattr(stage2, "make_train_step", stop)
    config = _ci_config()
    for _ in range(2):
        with pytest.raises(Stop):
            stage2.run(config, str(tmp_path / "run"))
    (before, lm1, info, args), (_, lm2, info2, _) = seen
    splits = args[2]
    assert info["steps"] == 4 and np.isfinite(info["final_train_loss"])
    assert info["sentences"] == len(lm_warmup.product_pairs(splits["train"].maps)) > \
        len(splits["train"].maps)
    assert info["eval_sentences"] == 6 and info["eval_split"] == config.stage2.eval.split
    assert 0.0 <= info["count_exact"] <= info["count_within_tol"] <= 1
    summary = json.loads((tmp_path / "run" / "stage2_lm_warmup" / "train_summary.json")
                         .read_text())
    assert summary["steps"] == 4
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before),
                                                    jax.tree.leaves(lm1)))
    for a, b in zip(jax.tree.leaves(lm1), jax.tree.leaves(lm2)):
        np.testing.assert_array_equal(a, b)
    assert info["resumed_from"] is None and info2["resumed_from"] == 4   # restored, not rerun
    assert dict(info2, resumed_from=None) == info


@pytest.mark.parametrize("field,value,expected", [
    ("num_steps", -1, "an integer >= 0"), ("batch_size", 0, "an integer >= 1"),
    ("max_len", 4, "an integer >= 8"), ("learning_rate", 0.0, "a finite number > 0"),
    ("learning_rate", float("nan"), "a finite number > 0")])
def test_bad_warmup_config_fails_before_anything_is_built(tmp_path, monkeypatch, field, value,
                                                          expected):
    from wamglm_jax.train import stage2

    def no_data(*a, **k):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(stage2, "load_splits", no_data)
    config = _ci_config()
    config.stage2.lm_warmup[field] = value
    with pytest.raises(ValueError, match=rf"config.stage2.lm_warmup.{field}={value!r}: "
                                         rf"expected {expected}"):
        stage2.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_warmup_without_a_share_first_answer_is_refused(tmp_path, monkeypatch):
    from wamglm_jax.train import stage2

    monkeypatch.setattr(stage2, "load_splits", lambda *a, **k: pytest.fail("data loaded"))
    config = _ci_config()
    config.stage2.update(count_form="count_first", zone_form="count_first")
    with pytest.raises(ValueError, match=r"lm_warmup.num_steps=4: the warm-up teaches the "
                                         r"share-first product.*'count_first'"):
        stage2.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
