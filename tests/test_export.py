"""Export to / import from Hugging Face: a stage-2 checkpoint (LoRA) -> tools.convert_to_hf ->
transformers LlavaForConditionalGeneration + AutoProcessor reproduce the JAX logits (fp32,
< 1e-4, same greedy tokens); config.json fields as shared/FACTS.md says; overwrite refusal;
HF (tiny random torch models saved to disk) -> tools.import_hf -> same logits in JAX."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from configs import presets  # noqa: E402
from wamglm_jax.export import from_hf, to_hf  # noqa: E402
from wamglm_jax.models import WamGLM, lora as lora_lib, num_image_tokens  # noqa: E402
from wamglm_jax.qa.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from wamglm_jax.train.checkpoint import Checkpointer  # noqa: E402
from wamglm_jax.train.state import TrainState  # noqa: E402
from test_hf_parity import randomise  # noqa: E402  (tests/ is on sys.path under pytest)

TOL = 1e-4
TEXTS = ["The wafer map shows an Edge-Ring pattern near the edge.",
         "Center defects come from CVD showerhead non-uniformity.",
         "Random failing dies, no systematic pattern, yield 93.5%."] * 20


def tiny_cfg(tie=False):
    cfg = presets.model_config("tiny")
    cfg.vit.update(dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48,
                        num_layers=3, num_heads=4, feature_layer=-2))
    cfg.lm.update(dict(vocab_size=384, hidden_size=32, intermediate_size=40, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=500000.0,
                       tie_embeddings=tie, max_seq_len=128))
    cfg.image_token_id = 3
    return cfg


def random_params(cfg, seed=0):
    """The WamGLM parameter tree (shapes from eval_shape) filled with random numbers: every
    weight, bias and norm scale non-trivial (numpy, so no per-leaf compilation)."""
    n = num_image_tokens(cfg)
    shapes = jax.eval_shape(lambda: nn.unbox(WamGLM(cfg).init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.full((1, n), cfg.image_token_id),
        jnp.ones((1, n)))["params"]))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: ((1.0 if str(getattr(path[-1], "key", "")) == "scale" else 0.0)
                         + 0.2 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    save_tokenizer(train_tokenizer(TEXTS, vocab_size=300), d)
    return d


@pytest.fixture(scope="module")
def stage2_workdir(tmp_path_factory, tokenizer_dir):
    """A stage-2 run dir as train/stage2.py writes it: model_config.json + an orbax
    checkpoint (items state/data_iter) whose params hold unmerged LoRA adapters."""
    wd = tmp_path_factory.mktemp("wd")
    cfg = tiny_cfg()
    params = random_params(cfg)
    lo = lora_lib.init_lora(params, 4, 8.0, r"^lm/.*(q_proj|down_proj)", jax.random.key(3))
    rng = np.random.default_rng(3)                           # B != 0: merging matters
    lo = jax.tree.map(lambda x: np.asarray(x + 0.1 * rng.standard_normal(x.shape), np.float32),
                      lo)
    state = TrainState.create(params=dict(params, lora=lo), tx=optax.adamw(1e-3),
                              rng=jax.random.PRNGKey(0))
    ck = Checkpointer(wd / "stage2" / "checkpoints", save_every=1, async_save=False)
    for step in (4, 7):
        ck.save(step, state.replace(step=jnp.asarray(step)), {"epoch": 0, "pos": step},
                force=True)
    ck.close()
    (wd / "stage2" / "model_config.json").write_text(json.dumps(
        dict(model=cfg.to_dict(), tokenizer=tokenizer_dir, lora_alpha=8.0)))
    merged = lora_lib.apply_lora(params, lo, 8.0)
    return str(wd), cfg, jax.tree.map(np.asarray, merged), params


def torch_logits(model, ids, pixel_values):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)[None]),
                     pixel_values=torch.from_numpy(pixel_values)).logits[0].numpy()


def test_convert_stage2_checkpoint_round_trip(stage2_workdir, tmp_path, capsys):
    from tools import convert_to_hf
    wd, cfg, merged, plain = stage2_workdir
    out = str(tmp_path / "hf")
    assert convert_to_hf.main(["--workdir", wd, "--output", out, "--verify"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 7 and res["lora_merged"] and res["verify"]["ok"]
    assert res["verify"]["max_abs_logit_diff"] < TOL and res["verify"]["greedy_equal"]

    # Independent check: transformers loads the dir with no missing/unexpected keys; the
    # processor is the identity on the JAX input; logits == JAX with the LoRA-merged params
    # (computed here with apply_lora, not the exporter's merge).
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    proc = transformers.AutoProcessor.from_pretrained(out)
    assert isinstance(proc, transformers.LlavaProcessor)
    rng = np.random.default_rng(0)
    image = rng.dirichlet(np.ones(3), (16, 16)).astype(np.float32)     # fractions, sum 1
    text = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat pattern is this?"}], tokenize=False,
        add_generation_prompt=True)
    enc = proc(text=text, images=image, return_tensors="np")
    np.testing.assert_array_equal(enc["pixel_values"][0], image.transpose(2, 0, 1))
    ids = enc["input_ids"][0]
    assert (ids == 3).sum() == num_image_tokens(cfg) and ids[0] == proc.tokenizer.bos_token_id
    ref = torch_logits(model.eval(), ids, enc["pixel_values"].astype(np.float32))
    fwd = jax.jit(lambda p: WamGLM(cfg).apply({"params": p}, image[None],
                                              ids[None].astype(np.int32),
                                              np.ones((1, len(ids)), np.int32))[0])
    got = np.asarray(fwd(merged))
    assert np.abs(got - ref).max() < TOL
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # Without the merge the logits differ clearly (the adapters were exported).
    unmerged = np.asarray(fwd(plain))
    assert np.abs(unmerged - ref).max() > 1e-2

    # 4.x layout of the processor files: image processor in preprocessor_config.json.
    pre = json.load(open(os.path.join(out, "preprocessor_config.json")))
    assert pre["image_processor_type"] == "SiglipImageProcessor"
    assert not (pre["do_resize"] or pre["do_rescale"] or pre["do_normalize"])
    pc = json.load(open(os.path.join(out, "processor_config.json")))
    assert "image_processor" not in pc and pc["patch_size"] == 4
    assert pc["vision_feature_select_strategy"] == "full" and pc["num_additional_image_tokens"] == 0
    # tokenizer_config readable by transformers 4.x; generation config ids.
    tc = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in tc
    gc = json.load(open(os.path.join(out, "generation_config.json")))
    assert gc["eos_token_id"] == proc.tokenizer.eos_token_id

    # --step selects an older checkpoint; small --max_shard_gb writes the sharded layout,
    # which transformers loads to the same weights; a missing step is a clear error.
    out2 = str(tmp_path / "hf4")
    assert convert_to_hf.main(["--workdir", wd, "--output", out2, "--step", "4",
                               "--max_shard_gb", str(40e3 / 2**30)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    index = json.load(open(os.path.join(out2, "model.safetensors.index.json")))
    files = set(index["weight_map"].values())
    assert len(files) > 3 and not os.path.exists(os.path.join(out2, "model.safetensors"))
    sharded = transformers.LlavaForConditionalGeneration.from_pretrained(out2, dtype=torch.float32)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[k], v, rtol=0, atol=0)
    assert convert_to_hf.main(["--workdir", wd, "--output", str(tmp_path / "x"),
                               "--step", "5"]) == 2
    assert "--step=5: no such checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("tie", [False, True])
def test_config_json_fields(tie):
    cfg = tiny_cfg(tie=tie)
    d = to_hf.hf_config(cfg, bos_id=1, eos_id=2, pad_id=0)
    assert d["architectures"] == ["LlavaForConditionalGeneration"] and d["model_type"] == "llava"
    assert d["image_token_index"] == d["image_token_id"] == 3
    assert d["image_seq_length"] == (16 // 4) ** 2
    assert d["projector_hidden_act"] == "gelu"
    assert d["vision_feature_layer"] == -2 and d["vision_feature_select_strategy"] == "full"
    assert d["multimodal_projector_bias"] is True and d["tie_word_embeddings"] is tie
    v, t = d["vision_config"], d["text_config"]
    assert v["model_type"] == "siglip_vision_model" and v["vision_use_head"] is False
    assert v["hidden_act"] == "gelu_pytorch_tanh" and v["num_hidden_layers"] == 3
    assert v["image_size"] == 16 and v["patch_size"] == 4 and v["layer_norm_eps"] == 1e-6
    assert t["architectures"] == ["LlamaForCausalLM"] and t["model_type"] == "llama"
    assert t["rope_theta"] == 500000.0 == t["rope_parameters"]["rope_theta"]
    assert t["num_key_value_heads"] == 2 and t["head_dim"] == 8 and t["vocab_size"] == 384
    assert t["tie_word_embeddings"] is tie and t["eos_token_id"] == 2


def test_export_tied_weights_and_refuses_overwrite(tmp_path):
    from safetensors.numpy import load_file
    cfg = tiny_cfg(tie=True)
    params = random_params(cfg, seed=5)
    out = tmp_path / "hf"
    to_hf.export(params, cfg, str(out))
    sd = load_file(str(out / "model.safetensors"))
    assert "language_model.lm_head.weight" not in sd
    assert "vision_tower.vision_model.encoder.layers.2.mlp.fc2.weight" in sd
    assert not any(k.startswith("vision_tower.vision_model.head") for k in sd)
    rep = to_hf.verify(str(out), params, cfg, new_tokens=4)   # no tokenizer: synthetic ids
    assert rep["max_abs_logit_diff"] < TOL and rep["greedy_equal"]
    before = sorted(os.listdir(out))
    with pytest.raises(to_hf.ExportError, match="exists and is not empty; pass --overwrite"):
        to_hf.export(params, cfg, str(out))
    assert sorted(os.listdir(out)) == before
    params2 = random_params(cfg, seed=6)
    to_hf.export(params2, cfg, str(out), overwrite=True)
    sd2 = load_file(str(out / "model.safetensors"))
    assert not np.array_equal(sd2["multi_modal_projector.linear_1.weight"],
                              sd["multi_modal_projector.linear_1.weight"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]     # no temp dirs left


def test_convert_cli_refuses_nonempty_output_and_bad_workdir(tmp_path, capsys):
    from tools import convert_to_hf
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert convert_to_hf.main(["--workdir", str(tmp_path), "--output", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
    assert convert_to_hf.main(["--workdir", str(tmp_path / "nowhere"),
                               "--output", str(tmp_path / "new")]) == 2
    assert "stage2/model_config.json" in capsys.readouterr().err
    # A conv-stem ViT has no SigLIP equivalent, and 'pixel' is no stem at all: both are
    # refused before anything is written, naming the file and the field.
    from configs import presets
    model = presets.model_config("tiny")
    (tmp_path / "w" / "stage2").mkdir(parents=True)
    for stem, message in (("conv", "model.vit.stem='conv', expected 'patch'"),
                          ("pixel", "config.model.vit.stem='pixel', expected one of")):
        model.vit.stem = stem
        (tmp_path / "w" / "stage2" / "model_config.json").write_text(
            json.dumps({"model": model.to_dict()}))
        assert convert_to_hf.main(["--workdir", str(tmp_path / "w"),
                                   "--output", str(tmp_path / "new")]) == 2
        assert f"model_config.json: {message}" in capsys.readouterr().err
        assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- import
def restore_import(out):
    import orbax.checkpoint as ocp
    meta = json.load(open(os.path.join(out, "model_config.json")))
    from ml_collections import ConfigDict
    return ocp.StandardCheckpointer().restore(os.path.join(out, "params")), \
        ConfigDict(meta["model"]), meta


def test_import_llama_and_siglip(tmp_path, capsys, tokenizer_dir):
    from tools import import_hf
    from wamglm_jax.models import Decoder, VisionTransformer
    vc = transformers.SiglipVisionConfig(hidden_size=24, intermediate_size=40,
                                         num_hidden_layers=3, num_attention_heads=3,
                                         image_size=16, patch_size=8, vision_use_head=True)
    sig = randomise(transformers.SiglipVisionModel(vc), 1)
    sig.save_pretrained(tmp_path / "siglip")
    tc = transformers.LlamaConfig(vocab_size=290, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, rope_theta=12345.0, rms_norm_eps=1e-6,
                                  max_position_embeddings=256, tie_word_embeddings=False)
    llama = randomise(transformers.LlamaForCausalLM(tc), 2)
    llama.save_pretrained(tmp_path / "llama")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(tmp_path / "llama")
    out = str(tmp_path / "imported")
    assert import_hf.main(["--output", out, "--lm", str(tmp_path / "llama"), "--vision",
                           str(tmp_path / "siglip"), "--pad_vocab", "128"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["imported"] == ["vision", "lm"] and res["initialised"] == ["projector"]
    params, cfg, meta = restore_import(out)
    assert os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json"))
    # vocab: len(tok) (has <image>) = 300ish -> padded to 384; the LM had 290 rows.
    assert cfg.lm.vocab_size == 384 == params["lm"]["embed_tokens"]["embedding"].shape[0]
    assert (cfg.lm.num_kv_heads, cfg.lm.head_dim, cfg.lm.rope_theta) == (1, 8, 12345.0)
    assert (cfg.vit.hidden_size, cfg.vit.patch_size, cfg.vit.num_layers) == (24, 8, 3)

    # LM logits == torch on the original 290 rows; the padded rows are the mean row.
    ids = np.random.default_rng(0).integers(0, 290, (2, 9)).astype(np.int32)
    with torch.no_grad():
        ref = llama(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    got = np.asarray(Decoder(cfg).apply({"params": params["lm"]}, ids))
    assert np.abs(got[..., :290] - ref).max() < TOL
    emb = llama.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(params["lm"]["embed_tokens"]["embedding"][300], emb.mean(0),
                               atol=1e-6)
    # Vision features == SigLIP hidden_states[feature_layer] (pre post_layernorm).
    images = np.random.default_rng(1).random((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        hs = sig(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                 output_hidden_states=True).hidden_states
    feats, _ = VisionTransformer(cfg).apply({"params": params["vision"]}, images)
    assert np.abs(np.asarray(feats) - hs[cfg.vit.feature_layer].numpy()).max() < TOL
    # The whole model runs with the new shapes (projector freshly initialised).
    n = num_image_tokens(cfg)
    toks = np.concatenate([[1], [cfg.image_token_id] * n, [5, 6]])[None].astype(np.int32)
    logits = WamGLM(cfg).apply({"params": params}, images[:1], toks, np.ones_like(toks))
    assert logits.shape == (1, n + 3, 384) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("feature_layer", [-2, (0, -1)])
def test_import_llava_export_round_trip_is_exact(tmp_path, feature_layer):
    cfg = tiny_cfg()
    cfg.vit.feature_layer = feature_layer
    params = random_params(cfg, seed=9)
    to_hf.export(params, cfg, str(tmp_path / "hf"))
    got, gcfg, info = from_hf.import_pretrained(presets.model_config("tiny"),
                                                llava=str(tmp_path / "hf"))
    assert info["imported"] == ["vision", "projector", "lm"]
    for sec in ("vit", "lm"):
        assert gcfg[sec].to_dict() == cfg[sec].to_dict()
    assert gcfg.image_token_id == cfg.image_token_id
    jax.tree.map(np.testing.assert_array_equal, got, params)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())["vision_feature_layer"]
    assert written == (list(feature_layer) if isinstance(feature_layer, tuple) else feature_layer)


def test_import_refusals_are_clear(tmp_path, capsys):
    from tools import import_hf
    qc = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1)
    transformers.Qwen2ForCausalLM(qc).save_pretrained(tmp_path / "qwen")
    with pytest.raises(from_hf.ImportHFError, match="model_type 'qwen2'.*q/k/v biases"):
        from_hf.import_pretrained(presets.model_config("tiny"), lm=str(tmp_path / "qwen"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    assert import_hf.main(["--output", str(tmp_path / "o"), "--lm", str(tmp_path / "bin")]) == 2
    assert "no *.safetensors weights" in capsys.readouterr().err
    cc = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8)
    transformers.CLIPVisionModel(cc).save_pretrained(tmp_path / "clip")
    with pytest.raises(from_hf.ImportHFError, match="clip_vision_model.*only SigLIP"):
        from_hf.import_pretrained(presets.model_config("tiny"), vision=str(tmp_path / "clip"))
    to_hf.export(random_params(tiny_cfg()), tiny_cfg(), str(tmp_path / "llava"))
    conf = json.loads((tmp_path / "llava" / "config.json").read_text())
    for bad in ([], ["-1"], "last"):
        (tmp_path / "llava" / "config.json").write_text(
            json.dumps(dict(conf, vision_feature_layer=bad)))
        with pytest.raises(from_hf.ImportHFError, match=r"config.json: vision_feature_layer="
                           r".*a layer index or a non-empty list"):
            from_hf.import_pretrained(presets.model_config("tiny"), llava=str(tmp_path / "llava"))
    with pytest.raises(from_hf.ImportHFError, match="not a local directory"):
        from_hf.import_pretrained(presets.model_config("tiny"), lm="meta-llama/Llama-2-7b")


def test_convert_verify_fails_on_a_wrong_export(stage2_workdir, tmp_path, monkeypatch, capsys):
    """--verify is a real check: a weight perturbed on its way to disk makes it exit 1."""
    from tools import convert_to_hf
    from wamglm_jax.export import hf_weights
    wd, _, _, _ = stage2_workdir
    real = hf_weights.to_hf

    def perturbed(params, cfg, layout="classic"):
        sd = real(params, cfg, layout)
        sd["language_model.model.norm.weight"] = sd["language_model.model.norm.weight"] * 1.01
        return sd
    monkeypatch.setattr(hf_weights, "to_hf", perturbed)
    assert convert_to_hf.main(["--workdir", wd, "--output", str(tmp_path / "bad"),
                               "--verify", "--new_tokens=2"]) == 1
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert "FAIL" in out and not res["verify"]["ok"] and res["verify"]["max_abs_logit_diff"] > TOL
