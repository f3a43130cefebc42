"""Partial restore of the stage-1 vision tower into WamGLM params (orbax, target shardings)."""
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import presets
from configs.common import SHARDING_RULES
from wamglm_jax.models.wamglm import WamGLM, num_image_tokens
from wamglm_jax.parallel import sharding as shd
from wamglm_jax.parallel.mesh import make_mesh
from wamglm_jax.train import stage2


def _cfg():
    cfg = presets.model_config("tiny")
    cfg.vit.image_size = 16
    cfg.lm.vocab_size = 128
    return cfg


def _save_fake_stage1(workdir, vision, step=5):
    """A stage-1 style checkpoint: items `state` (params {vision, head}, opt_state, ...) and no
    data_iter, written by an orbax CheckpointManager like train/checkpoint.py does."""
    rng = np.random.default_rng(0)
    state = {"step": np.int32(step),
             "params": {"vision": vision,
                        "head": {"classifier": {"kernel": rng.normal(size=(64, 9)).astype(np.float32)}}},
             "opt_state": {"mu": {"head": rng.normal(size=(9,)).astype(np.float32)}},
             "batch_stats": {"bn": {"mean": np.zeros(4, np.float32)}},
             "rng": np.zeros(2, np.uint32)}
    mgr = ocp.CheckpointManager(workdir / "stage1" / "checkpoints", item_names=("state",))
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mgr.wait_until_finished()
    mgr.close()


def test_restore_vision_subtree_exactly_with_target_shardings(tmp_path):
    cfg = _cfg()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.rules_from_config(SHARDING_RULES)
    model = WamGLM(cfg)
    params, shardings = stage2.init_params(model, cfg, mesh, rules, seed=0)
    # stage-1 vision weights: same tree/shapes as WamGLM's, different values
    rng = np.random.default_rng(1)
    fake = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params["vision"])
    _save_fake_stage1(tmp_path, fake)
    path = stage2.find_stage1_checkpoint(tmp_path)
    assert path.endswith("stage1/checkpoints/5/state")
    before_lm = jax.tree.map(np.asarray, params["lm"])
    before_proj = jax.tree.map(np.asarray, params["projector"])
    got = stage2.restore_stage1_vision(path, params["vision"])
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree.leaves(fake)
    assert len(flat_got) == len(flat_want) > 0
    for (p, a), b in zip(flat_got, flat_want):
        np.testing.assert_array_equal(np.asarray(a), b)
    # shardings follow the target (e.g. tensor-sharded attention kernels), not the saved ones
    for a, s in zip(jax.tree.leaves(got), jax.tree.leaves(shardings["vision"])):
        assert a.sharding.is_equivalent_to(s, a.ndim)
    params["vision"] = got
    for a, b in zip(jax.tree.leaves(params["lm"]), jax.tree.leaves(before_lm)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(params["projector"]), jax.tree.leaves(before_proj)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # the restored model runs
    n = num_image_tokens(cfg)
    toks = np.array([[1] + [cfg.image_token_id] * n + [5]] * 8, np.int32)
    with shd.activate(mesh, rules):
        logits = jax.jit(lambda p: model.apply({"params": p}, np.zeros((8, 16, 16, 3), np.float32),
                                               toks, np.ones_like(toks)))(params)
    assert np.isfinite(np.asarray(logits)).all()


def test_restore_shape_mismatch_and_missing_checkpoint(tmp_path):
    cfg = _cfg()
    model = WamGLM(cfg)
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    params, _ = stage2.init_params(model, cfg, mesh, SHARDING_RULES, seed=0)
    with pytest.raises(FileNotFoundError, match="no stage-1 checkpoint"):
        stage2.find_stage1_checkpoint(tmp_path)
    other = _cfg()
    other.vit.hidden_size = 32
    other.vit.intermediate_size = 64
    p2, _ = stage2.init_params(WamGLM(other), other, mesh, SHARDING_RULES, seed=0)
    _save_fake_stage1(tmp_path, jax.tree.map(np.asarray, p2["vision"]))
    with pytest.raises(ValueError, match=r"params/vision/\S+ has shape \(\d+,.*expects"):
        stage2.restore_stage1_vision(stage2.find_stage1_checkpoint(tmp_path), params["vision"])
    # a tower without one of the model's parameters: named, not a KeyError from orbax
    partial = jax.tree.map(np.asarray, params["vision"])
    dropped = sorted(partial)[-1]
    del partial[dropped]
    (tmp_path / "stage1").rename(tmp_path / "old_stage1")
    _save_fake_stage1(tmp_path, partial)
    with pytest.raises(ValueError, match=f"params/vision/{dropped}/.* is missing"):
        stage2.restore_stage1_vision(stage2.find_stage1_checkpoint(tmp_path), params["vision"])


def test_lm_starts_from_a_pretrained_hf_llama(tmp_path):
    """config.stage2.init_lm_from: LM weights from an HF Llama dir (transposed into our
    layout), vocab grown to the tokenizer, config.model.lm taken from the HF config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from wamglm_jax.data.generator import generate
    from wamglm_jax.qa.dialogues import build_dialogues
    from wamglm_jax.qa.tokenizer import build_tokenizer
    from configs import quickstart

    tok = build_tokenizer(build_dialogues(generate(20, seed=0), seed=0), str(tmp_path / "tok"),
                          vocab_size=300)
    tc = transformers.LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, rope_theta=1000.0, rms_norm_eps=1e-6,
                                  max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(tc)
    hf.save_pretrained(tmp_path / "llama")
    config = quickstart.get_config("ci")
    config.stage2.init_lm_from = str(tmp_path / "llama")
    s2 = stage2.stage_cfg(config)
    cfg, lm = stage2.import_lm(config, s2, tok)
    assert (cfg.lm.hidden_size, cfg.lm.num_kv_heads, cfg.lm.rope_theta) == (32, 1, 1000.0)
    assert cfg.lm.vocab_size == 384 >= len(tok) and cfg.image_token_id == tok.convert_tokens_to_ids("<image>")
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    emb = np.asarray(lm["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(emb[:200], sd["model.embed_tokens.weight"])
    np.testing.assert_allclose(emb[200:], np.repeat(sd["model.embed_tokens.weight"].mean(0)[None],
                                                    184, 0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(lm["layers_1"]["mlp"]["down_proj"]["kernel"]),
                                  sd["model.layers.1.mlp.down_proj.weight"].T)
