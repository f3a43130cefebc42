"""config.stage2.product_rehearsal: the product sentences trained beside the dialogues in
every stage-2 step (stage2.make_train_step with product_weight, lm_warmup.WithSentences),
its resumable batches, the run's report entry and its config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from wamglm_jax.models import lora as lora_lib
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

    # With LoRA the sentences run through the adapted LM: their CE is the merged LM's
    lo = lora_lib.init_lora(params, 4, 16.0, r"^lm/.*(q_proj|up_proj)", jax.random.PRNGKey(3),
                            stacked_regex=r"/layers/" if cfg.scan_layers else None)
    lo = jax.tree.map(lambda x: x + 0.05, lo)          # B = 0 at init would hide the adapters
    l_params = dict(params, lora=lo)
    l_tx, _ = optim.make_optimizer(optim.default_optimizer_config(
        learning_rate=1e-2, warmup_steps=0, trainable=("^lora/",)), 10, l_params)
    l_state = TrainState.create(params=l_params, tx=l_tx, rng=jax.random.PRNGKey(1))
    _, ml = jax.jit(stage2.make_train_step(model, 16.0, product_weight=0.5))(l_state, batch)
    merged = lora_lib.merged_params(l_params, 16.0)
    l_ce = _numpy_ce(Decoder(cfg).apply({"params": merged["lm"]}, st["tokens"],
                                        attention_mask=st["attention_mask"]),
                     st["tokens"], st["loss_mask"])
    assert abs(l_ce - s_ce) > 1e-3                     # the adapters change the sentences' CE
    np.testing.assert_allclose(float(ml["product_ce"]), l_ce, rtol=1e-5)


def test_pack_pairs_is_a_seeded_regrouping_of_the_pairs():
    pairs = np.arange(14).reshape(7, 2)
    np.testing.assert_array_equal(lm_warmup.pack_pairs(pairs, 1, seed=0), pairs[:, None])
    rows = lm_warmup.pack_pairs(pairs, 3, seed=5)
    assert rows.shape == (2, 3, 2)
    flat = [tuple(p) for p in rows.reshape(-1, 2).tolist()]
    assert len(set(flat)) == 6 and set(flat) <= {tuple(p) for p in pairs.tolist()}
    np.testing.assert_array_equal(rows, lm_warmup.pack_pairs(pairs, 3, seed=5))
    assert not np.array_equal(rows, lm_warmup.pack_pairs(pairs, 3, seed=6))
    with pytest.raises(ValueError, match="7 sentences, fewer than one row of 8"):
        lm_warmup.pack_pairs(pairs, 8, seed=0)


def test_rehearse_products_packs_rows_of_sentences():
    """pack=2: each rehearsal row holds two whole sentences of the training maps' pairs, the
    loss on both counts; the report fields name the packing."""
    import ml_collections

    from wamglm_jax.data.generator import generate
    from wamglm_jax.qa.tokenizer import train_tokenizer
    from wamglm_jax.train import stage2

    maps = generate(6, seed=2).maps
    pairs = lm_warmup.product_pairs(maps, zones=False)
    tok = train_tokenizer(["".join(lm_warmup.split_sentence(f, n)) for f, n in pairs],
                          vocab_size=300)
    s2 = ml_collections.ConfigDict(dict(product_rehearsal=dict(
        weight=1.0, batch_size=4, zones=False, max_len=64, num_eval=0, pack=2,
        die_line=False)))

    class Split:
        pass
    split = Split()
    split.maps = maps
    it, info = stage2.rehearse_products(s2, _Counting(), tok, {"train": split}, None, seed=0)
    assert info == dict(weight=1.0, sentences=6, batch_size=4, zones=False, pack=2,
                        die_line=False)
    s2.product_rehearsal.update(pack=4, max_len=128)     # 6 sentences: one row, 2 left out
    assert stage2.rehearse_products(s2, _Counting(), tok, {"train": split}, None,
                                    seed=0)[1]["sentences"] == 4
    s2.product_rehearsal.pack = 7
    with pytest.raises(ValueError, match=r"product_rehearsal.pack=7: the training maps give 6 "
                                         r"product sentences, fewer than one row"):
        stage2.rehearse_products(s2, _Counting(), tok, {"train": split}, None, seed=0)
    batch = next(it)["sentences"]
    texts = {"".join(lm_warmup.split_sentence(f, n)) for f, n in pairs}
    for row, m, a in zip(batch["tokens"], batch["loss_mask"], batch["attention_mask"]):
        runs = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])) == 1)
        assert len(runs) == 2                       # two counts (the second with the EOS)
        body = tok.decode(row[1:a.sum() - 1])
        found = [t for t in texts if t in body]
        assert len(found) == 2 and len(body) == sum(map(len, found))
    s2.product_rehearsal.update(pack=2, max_len=96, die_line=True)
    it, info = stage2.rehearse_products(s2, _Counting(), tok, {"train": split}, None, seed=0)
    assert info["die_line"] is True and info["sentences"] == 6
    lined = {"The wafer has %d dies.\n%s" % (n, "".join(lm_warmup.split_sentence(f, n)))
             for f, n in pairs}
    batch = next(it)["sentences"]
    for row, m, a in zip(batch["tokens"], batch["loss_mask"], batch["attention_mask"]):
        runs = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])) == 1)
        assert len(runs) == 4                       # per sentence: the copied total, the count
        body = tok.decode(row[1:a.sum() - 1])
        found = [t for t in lined if t in body]
        assert len(found) == 2 and len(body) == sum(map(len, found))


def _ci_config():
    from configs import quickstart
    config = quickstart.get_config("ci")
    config.stage2.init_vision_from_stage1 = False
    config.stage2.product_rehearsal.update(weight=1.0, batch_size=8, num_eval=6)
    return config


@pytest.mark.slow
def test_stage2_run_rehearses_and_resumes_the_sentence_iterator(tmp_path, monkeypatch):
    """stage2.run with the rehearsal after a 2-step alignment phase (which must take the plain
    step: its batches carry no sentences): stopped after 3 of its steps, the checkpoint holds
    both iterators' positions; the run resumed to 6 steps continues the saved sentence stream
    (6 batches drawn in all, not 3), and its report names the rehearsal and scores the LM
    alone on 6 held-out maps' sentences."""
    from wamglm_jax.data.splits import load_splits
    from wamglm_jax.train import stage2
    from wamglm_jax.train.checkpoint import decode_iter_state

    class Stop(Exception):
        pass

    def iter_state(step):
        d = tmp_path / "run" / "stage2" / "checkpoints" / str(step) / "data_iter"
        return decode_iter_state((d / "process_0-of-1.json").read_text())

    config = _ci_config()
    config.stage2.align.num_steps = 2
    config.stage2.loop.update(num_steps=3, checkpoint_every=3)
    real = stage2.evaluate_and_report
    monkeypatch.setattr(stage2, "evaluate_and_report", lambda **k: (_ for _ in ()).throw(Stop))
    with pytest.raises(Stop):
        stage2.run(config, str(tmp_path / "run"))
    first = iter_state(3)
    assert set(first) == {"dialogues", "sentences"} and first["sentences"] == {"step": 3}

    monkeypatch.setattr(stage2, "evaluate_and_report", real)
    config.stage2.loop.num_steps = 6
    report = stage2.run(config, str(tmp_path / "run"))
    assert report["steps"] == 6 and iter_state(6)["sentences"] == {"step": 6}
    assert iter_state(6)["dialogues"] != first["dialogues"]
    splits = load_splits(config.data)
    info = report["product_rehearsal"]
    assert {k: info[k] for k in ("weight", "batch_size", "zones", "sentences")} == dict(
        weight=1.0, batch_size=8, zones=True,
        sentences=len(lm_warmup.product_pairs(splits["train"].maps, zones=True)))
    name = config.stage2.eval.split      # afterwards: the LM alone on 6 held-out maps' prompts
    assert info["eval_split"] == name and info["eval_sentences"] == 6   # every map has dies
    assert 0.0 <= info["count_exact"] <= info["count_within_tol"] <= 1.0
    md = (tmp_path / "run" / "stage2" / "report.md").read_text()
    assert "- product rehearsal: weight 1.0" in md and "`%s` sentences" % name in md


@pytest.mark.slow
def test_rehearsal_with_a_frozen_lm_is_refused(tmp_path):
    from wamglm_jax.train import stage2

    config = _ci_config()
    config.stage2.optimizer.freeze = ("^vision/", "^lm/")
    with pytest.raises(ValueError, match=r"product_rehearsal.weight=1.0: no language-model "
                                         r"weight trains"):
        stage2.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "stage2" / "checkpoints").exists()


def test_dialogue_batches_refuse_a_rehearsal_checkpoints_state():
    """A checkpoint written with the rehearsal, resumed with weight 0: a named error, not a
    KeyError."""
    from wamglm_jax.train.stage2_data import DialogueBatches

    it = DialogueBatches([], [], image_size=8, batch_size=2, pad_id=0, boundaries=[8], seed=0)
    with pytest.raises(ValueError, match=r"\['dialogues', 'sentences'\]: expected 'epoch' and "
                                         r"'pos'.*product_rehearsal.weight > 0"):
        it.set_state({"dialogues": {"epoch": 0, "pos": 1}, "sentences": {"step": 1}})
    it.set_state({"epoch": 2, "pos": 5})
    assert it.get_state() == {"epoch": 2, "pos": 5}


@pytest.mark.parametrize("field,value,expected", [
    ("weight", -1.0, "a finite number >= 0"), ("weight", float("nan"), "a finite number >= 0"),
    ("weight", float("inf"), "a finite number >= 0"), ("batch_size", 0, "an integer >= 1"),
    ("max_len", 4, "an integer >= 8"), ("num_eval", -1, "an integer >= 0"),
    ("pack", 0, "an integer >= 1")])
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
