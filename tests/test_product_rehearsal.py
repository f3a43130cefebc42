"""config.stage2.product_rehearsal: the product sentences trained beside the dialogues in
every stage-2 step (stage2.make_train_step with product_weight, lm_warmup.WithSentences),
its resumable batches, the run's report entry and its config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from wamglm_jax.train import lm_warmup

PAIRS = [(171, 2046), (0, 518), (1, 44), (9, 95), (3849, 4922), (40, 300)]


def _numpy_ce(logits, tokens, mask):
    """Mean of -log softmax(logits[b, t-1])[tokens[b, t]] over mask[b, t] == 1 (float64)."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = [-logp[b, t - 1, tokens[b, t]] for b in range(tokens.shape[0])
           for t in range(1, tokens.shape[1]) if mask[b, t]]
    return float(np.mean(nll))


class _Counting:
    """A resumable iterator of {"k": int[1]} batches (stands in for DialogueBatches)."""

    def __init__(self):
        self.k = 0

    def __next__(self):
        self.k += 1
        return {"k": np.array([self.k])}

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.k = int(state["k"])


def test_with_sentences_pairs_both_iterators_and_resumes_both():
    toks = np.arange(30 * 5, dtype=np.int32).reshape(30, 5)
    mask, lens = np.ones_like(toks), np.full(30, 5, np.int32)
    it = lm_warmup.WithSentences(_Counting(), lm_warmup.SentenceBatches(
        toks, mask, lens, global_batch_size=4, seed=2))
    alone = lm_warmup.SentenceBatches(toks, mask, lens, global_batch_size=4, seed=2)
    for k in range(1, 4):
        b = next(it)
        assert b["k"][0] == k
        np.testing.assert_array_equal(b["sentences"]["tokens"], next(alone)["tokens"])
    state = json.loads(json.dumps(it.get_state()))      # as the checkpoint stores it
    assert state == {"dialogues": {"k": 3}, "sentences": {"step": 3}}
    resumed = lm_warmup.WithSentences(_Counting(), lm_warmup.SentenceBatches(
        toks, mask, lens, global_batch_size=4, seed=2))
    resumed.set_state(state)
    a, b = next(resumed), next(it)
    assert a["k"][0] == b["k"][0] == 4
    np.testing.assert_array_equal(a["sentences"]["tokens"], b["sentences"]["tokens"])
    with pytest.raises(ValueError, match=r"\['epoch', 'pos'\]: expected 'dialogues' and "
                                         r"'sentences'.*product_rehearsal"):
        resumed.set_state({"epoch": 0, "pos": 3})      # a checkpoint without the rehearsal


def test_rehearsal_step_objective_is_dialogue_ce_plus_weight_times_sentence_ce():
    """With product_weight 0.5: metrics loss = numpy CE of the dialogue targets + 0.5 x numpy
    CE of the sentence targets, ce/product_ce are each alone; the sentences change the LM's
    update but not the projector's (their loss never reaches it; no gradient clipping, which
    would couple the two), and weight 0 gives the plain step."""
    from configs import presets
    from wamglm_jax.models.decoder import Decoder
    from wamglm_jax.models.wamglm import WamGLM, num_image_tokens
    from wamglm_jax.qa.tokenizer import train_tokenizer
    from wamglm_jax.train import optim, stage2
    from wamglm_jax.train.state import TrainState

    tok = train_tokenizer([a + b for a, b in (lm_warmup.split_sentence(f, n)
                                              for f, n in PAIRS)], vocab_size=300)
    cfg = presets.model_config("tiny")
    cfg.lm.vocab_size = 384
    cfg.image_token_id = 383
    model = WamGLM(cfg)
    s, nimg, b = cfg.vit.image_size, num_image_tokens(cfg), 2
    rng = np.random.default_rng(0)
    t = nimg + 12
    tokens = rng.integers(3, 300, (b, t)).astype(np.int32)
    tokens[:, 0], tokens[:, 1:1 + nimg] = 1, cfg.image_token_id
    loss_mask = np.zeros((b, t), np.int32)
    loss_mask[:, nimg + 4:] = 1
    batch = dict(image=rng.random((b, s, s, 3)).astype(np.float32), tokens=tokens,
                 loss_mask=loss_mask, attention_mask=np.ones((b, t), np.int32),
                 valid=np.ones(b, np.int32))
    s_toks, s_mask, _, s_lens = lm_warmup.encode_sentences(tok, PAIRS, max_len=32)
    batch["sentences"] = next(lm_warmup.SentenceBatches(s_toks, s_mask, s_lens,
                                                        global_batch_size=4, seed=0))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)),
                                      jnp.asarray(tokens[:1]), jnp.ones((1, t)))["params"])
    tx, _ = optim.make_optimizer(optim.default_optimizer_config(
        learning_rate=1e-2, warmup_steps=0, freeze=("^vision/",), grad_clip_norm=0.0), 10,
        params)     # no clipping: the LM's larger gradient would rescale the projector's
    state = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(1))

    with_s, m = jax.jit(stage2.make_train_step(model, 16.0, product_weight=0.5))(state, batch)
    plain, m0 = jax.jit(stage2.make_train_step(model, 16.0))(state, batch)

    d_logits = model.apply({"params": params}, batch["image"], tokens, batch["attention_mask"])
    d_ce = _numpy_ce(d_logits, tokens, loss_mask)
    st = batch["sentences"]
    s_ce = _numpy_ce(Decoder(cfg).apply({"params": params["lm"]}, st["tokens"],
                                        attention_mask=st["attention_mask"]),
                     st["tokens"], st["loss_mask"])
    np.testing.assert_allclose(float(m["ce"]), d_ce, rtol=1e-5)
    np.testing.assert_allclose(float(m["product_ce"]), s_ce, rtol=1e-5)
    np.testing.assert_allclose(float(m["loss"]), d_ce + 0.5 * s_ce, rtol=1e-5)
    np.testing.assert_allclose(float(m0["loss"]), d_ce, rtol=1e-5)
    assert "product_ce" not in m0
    for x, y in zip(jax.tree.leaves(with_s.params["projector"]),
                    jax.tree.leaves(plain.params["projector"])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(with_s.params["lm"]),
                                                     jax.tree.leaves(plain.params["lm"])))


def _ci_config():
    from configs import quickstart
    config = quickstart.get_config("ci")
    config.stage2.init_vision_from_stage1 = False
    config.stage2.product_rehearsal.update(weight=1.0, batch_size=8)
    return config


@pytest.mark.slow
def test_stage2_run_rehearses_and_resumes_the_sentence_iterator(tmp_path, monkeypatch):
    """stage2.run with the rehearsal: the report names it (every training map's and zone's
    sentence), the last checkpoint holds both iterators' positions (one sentence batch per
    step), and a run stopped before its report resumes from that checkpoint (set_state on
    the saved state) with no new steps."""
    from wamglm_jax.data.splits import load_splits
    from wamglm_jax.train import stage2
    from wamglm_jax.train.checkpoint import decode_iter_state

    class Stop(Exception):
        pass

    config = _ci_config()
    real = stage2.evaluate_and_report
    monkeypatch.setattr(stage2, "evaluate_and_report", lambda **k: (_ for _ in ()).throw(Stop))
    with pytest.raises(Stop):
        stage2.run(config, str(tmp_path / "run"))
    steps = int(config.stage2.loop.num_steps)
    saved = tmp_path / "run" / "stage2" / "checkpoints" / str(steps) / "data_iter"
    state = decode_iter_state(next(saved.glob("process_0-of-1.json")).read_text())
    assert set(state) == {"dialogues", "sentences"} and state["sentences"] == {"step": steps}

    resumed = []

    def record(**k):
        resumed.append(k["result"].resumed_from)
        return real(**k)

    monkeypatch.setattr(stage2, "evaluate_and_report", record)
    report = stage2.run(config, str(tmp_path / "run"))
    assert report["steps"] == steps and resumed == [steps]
    maps = load_splits(config.data)["train"].maps
    assert report["product_rehearsal"] == dict(
        weight=1.0, batch_size=8, zones=True,
        sentences=len(lm_warmup.product_pairs(maps, zones=True)))


@pytest.mark.parametrize("field,value,expected", [
    ("weight", -1.0, "a finite number >= 0"), ("weight", float("nan"), "a finite number >= 0"),
    ("weight", float("inf"), "a finite number >= 0"), ("batch_size", 0, "an integer >= 1"),
    ("max_len", 4, "an integer >= 8")])
def test_bad_rehearsal_config_fails_before_anything_is_built(tmp_path, monkeypatch, field,
                                                             value, expected):
    from wamglm_jax.train import stage2

    monkeypatch.setattr(stage2, "load_splits", lambda *a, **k: pytest.fail("data loaded"))
    config = _ci_config()
    config.stage2.product_rehearsal[field] = value
    with pytest.raises(ValueError, match=rf"config.stage2.product_rehearsal.{field}="
                                         rf"{value!r}: expected {expected}"):
        stage2.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_rehearsal_without_a_share_first_answer_is_refused(tmp_path, monkeypatch):
    from wamglm_jax.train import stage2

    monkeypatch.setattr(stage2, "load_splits", lambda *a, **k: pytest.fail("data loaded"))
    config = _ci_config()
    config.stage2.update(count_form="count_first", zone_form="count_first")
    with pytest.raises(ValueError, match=r"product_rehearsal.weight=1.0: the rehearsal teaches "
                                         r"the share-first product.*'count_first'"):
        stage2.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
