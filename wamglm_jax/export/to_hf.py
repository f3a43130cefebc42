"""Export WamGLM params to a Hugging Face `LlavaForConditionalGeneration` directory.

    out = export(params, cfg, out_dir, tokenizer_dir=..., overwrite=False)
    params, cfg, info = load_stage2(workdir, step=None)      # stage-2 checkpoint, LoRA merged
    report = verify(out_dir, params, cfg)                    # JAX vs torch logits (fp32)

The directory holds
- config.json: the "classic" Llava layout that transformers 4.5x, 5.x and vLLM all read
  (shared/FACTS.md, "The serving format"): SigLIP vision_config with vision_use_head=False and
  gelu_pytorch_tanh, Llama text_config with `architectures` and `rope_theta` next to
  `rope_parameters`, image_token_index/image_token_id, image_seq_length, projector "gelu"
  (exact), vision_feature_layer = config.model.vit.feature_layer (an int; a list when the
  projector reads several layers, which transformers concatenates as we do), select strategy
  "full",
  multimodal_projector_bias, tie_word_embeddings.
- model.safetensors (sharded with an index above max_shard_bytes, 5 GiB): classic weight
  names (`vision_tower.vision_model.*`,
  `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head`)
  from export/hf_weights.py; transformers 5.x renames them on load (its "llava" key mapping).
- generation_config.json, tokenizer files (4.x-readable tokenizer_config from
  qa.tokenizer.save_tokenizer) and a LlavaProcessor with a SiglipImageProcessor that is the
  identity: do_resize/do_rescale/do_normalize all False (mean 0, std 1 for good measure).
  The JAX model takes float32[S,S,3] one-hot die-state fractions in [0,1]
  (data.preprocess.area_resize_onehot: channels off/good/fail); feed the processor exactly
  that array (HWC float) and it passes it through unchanged as pixel_values [1,3,S,S].
- wamglm_export.json: provenance (source checkpoint, step, model config, input convention).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np

from wamglm_jax.export import hf_weights
from wamglm_jax.models.vit import stem_kind

PROMPT = "<image>\nWhat defect pattern does this wafer map show?"
INPUT_CONVENTION = (
    "pixel_values float32[B,3,S,S]: per pixel the fractions of off-wafer / good / failing dies "
    "(wamglm_jax.data.preprocess.area_resize_onehot, channels in that order, values in [0,1]); "
    "the processor is the identity (no resize, rescale or normalisation)")


class ExportError(ValueError):
    """Bad export input: an existing output dir, a missing checkpoint or config."""


# ----------------------------------------------------------------------------- config
def hf_config(cfg, *, bos_id=None, eos_id=None, pad_id=None) -> dict:
    """config.json contents (a dict) for config.model `cfg` in the classic Llava layout."""
    import transformers

    kw = hf_weights.hf_config_kwargs(cfg)
    text = dict(kw["text"], bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    lc = transformers.LlavaConfig(vision_config=transformers.SiglipVisionConfig(**kw["vision"]),
                                  text_config=transformers.LlamaConfig(**text), **kw["llava"])
    d = lc.to_dict()
    d["architectures"] = ["LlavaForConditionalGeneration"]
    d["image_token_index"] = d["image_token_id"] = int(cfg.image_token_id)
    d["vision_feature_layer"] = kw["llava"]["vision_feature_layer"]
    d["vision_feature_select_strategy"] = "full"
    d["multimodal_projector_bias"] = True
    d["projector_hidden_act"] = "gelu"
    d["tie_word_embeddings"] = bool(cfg.lm.tie_embeddings)
    d["torch_dtype"] = d["dtype"] = "float32"
    t = d["text_config"]
    t["architectures"] = ["LlamaForCausalLM"]
    t["model_type"] = "llama"
    t["rope_theta"] = float(cfg.lm.rope_theta)              # 4.x / vLLM read this one
    t["rope_parameters"] = {"rope_theta": float(cfg.lm.rope_theta), "rope_type": "default"}
    t.setdefault("rope_scaling", None)
    t["tie_word_embeddings"] = bool(cfg.lm.tie_embeddings)
    v = d["vision_config"]
    v["model_type"] = "siglip_vision_model"
    v["vision_use_head"] = False
    v["hidden_act"] = "gelu_pytorch_tanh"
    return d


# ----------------------------------------------------------------------------- processor
def image_processor(cfg):
    from transformers import SiglipImageProcessor
    s = int(cfg.vit.image_size)
    return SiglipImageProcessor(do_resize=False, size={"height": s, "width": s},
                                do_rescale=False, do_normalize=False, do_convert_rgb=False,
                                image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])


def write_tokenizer_and_processor(out_dir: str, cfg, tokenizer_dir: str):
    """Tokenizer (4.x-readable config) + LlavaProcessor files into out_dir; -> the tokenizer."""
    from transformers import LlavaProcessor

    from wamglm_jax.qa.tokenizer import IMAGE, load_tokenizer, save_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    if int(tok.convert_tokens_to_ids(IMAGE)) != int(cfg.image_token_id):
        raise ExportError(f"{tokenizer_dir}: <image> has id {tok.convert_tokens_to_ids(IMAGE)} "
                          f"but config.model.image_token_id={cfg.image_token_id}")
    if len(tok) > cfg.lm.vocab_size:
        raise ExportError(f"{tokenizer_dir}: {len(tok)} tokens do not fit "
                          f"config.model.lm.vocab_size={cfg.lm.vocab_size}")
    proc = LlavaProcessor(image_processor=image_processor(cfg), tokenizer=tok,
                          patch_size=int(cfg.vit.patch_size),
                          vision_feature_select_strategy="full", image_token=IMAGE,
                          num_additional_image_tokens=0, chat_template=tok.chat_template)
    proc.save_pretrained(out_dir)
    _legacy_processor_files(out_dir)
    save_tokenizer(tok, out_dir)       # rewrite tokenizer_config.json in the 4.x+5.x form
    return tok


def _legacy_processor_files(out_dir: str):
    """transformers 5.x nests the image processor inside processor_config.json; 4.x (and vLLM
    on it) read it from preprocessor_config.json. Write the 4.x layout, which 5.x also loads."""
    path = os.path.join(out_dir, "processor_config.json")
    with open(path) as f:
        pc = json.load(f)
    ip = pc.pop("image_processor", None)
    if ip is not None:
        ip["image_processor_type"] = "SiglipImageProcessor"
        ip["processor_class"] = "LlavaProcessor"
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
            json.dump(ip, f, indent=2, sort_keys=True)
        with open(path, "w") as f:
            json.dump(pc, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- export
def _check_output(out_dir: str, overwrite: bool):
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"--output={out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ExportError(f"--output={out_dir} exists and is not empty; pass --overwrite "
                              "to replace it (nothing was written)")


def write_safetensors(state_dict: dict, out_dir: str, max_shard_bytes: int = 5 << 30):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    (the HF sharded layout) when the weights exceed max_shard_bytes."""
    from safetensors.numpy import save_file
    shards, cur, size = [], {}, 0
    for name in sorted(state_dict):
        nbytes = state_dict[name].nbytes
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = state_dict[name]
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = int(sum(x.nbytes for x in state_dict.values()))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                  sort_keys=True)


def export(params, cfg, out_dir: str, *, tokenizer_dir: str | None = None,
           overwrite: bool = False, provenance: dict | None = None,
           max_shard_bytes: int = 5 << 30) -> str:
    """Write the HF directory (see the module docstring). Everything goes into a temporary
    sibling first and is moved into place at the end, so a failed export leaves no half
    directory and an existing one is only replaced (with overwrite) after a complete write."""
    from transformers import GenerationConfig

    out_dir = os.path.abspath(out_dir)
    _check_output(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        ids = dict(bos_id=None, eos_id=None, pad_id=None)
        if tokenizer_dir:
            tok = write_tokenizer_and_processor(tmp, cfg, tokenizer_dir)
            ids = dict(bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, **ids), f, indent=2, sort_keys=True)
        GenerationConfig(bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"],
                         pad_token_id=ids["pad_id"]).save_pretrained(tmp)
        host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
        state_dict = hf_weights.to_hf(host, cfg, layout="classic")
        write_safetensors(state_dict, tmp, max_shard_bytes)
        info = dict(format="LlavaForConditionalGeneration (classic weight names)",
                    input=INPUT_CONVENTION, model=ml_collections.ConfigDict(cfg).to_dict(),
                    num_parameters=int(sum(x.size for x in state_dict.values())),
                    tokenizer=tokenizer_dir, **(provenance or {}))
        with open(os.path.join(tmp, "wamglm_export.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True, default=str)
        if os.path.exists(out_dir):
            _check_output(out_dir, overwrite)
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------- stage 2
def _checkpoint_steps(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n, "state")))


def restore_params(state_dir: str) -> dict:
    """The `params` subtree of an orbax `state` item as host numpy arrays (shapes from the
    checkpoint's own metadata, so no model has to be built to restore it)."""
    import orbax.checkpoint as ocp

    from wamglm_jax.train.checkpoint import saved_tree
    tree = saved_tree(state_dir)
    if "params" not in tree:
        raise ExportError(f"{state_dir}: checkpoint has no `params` (items: {sorted(tree)})")
    sub = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                  tree["params"])}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), sub)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=sub, restore_args=args,
                                                                  partial_restore=True))
    return out["params"]


def load_stage2(workdir: str, step: int | None = None):
    """-> (plain params with LoRA merged, config.model, info dict) from workdir/stage2."""
    from wamglm_jax.models import lora as lora_lib
    stage_dir = os.path.join(os.path.abspath(workdir), "stage2")
    mc_path = os.path.join(stage_dir, "model_config.json")
    if not os.path.exists(mc_path):
        raise ExportError(f"{mc_path} not found: --workdir must hold a stage-2 run "
                          "(wamglm_jax.train.stage2 writes stage2/model_config.json)")
    mc = json.load(open(mc_path))
    cfg = ml_collections.ConfigDict(mc["model"])
    try:
        stem = stem_kind(cfg)
    except ValueError as e:
        raise ExportError(f"{mc_path}: {e}") from None
    if stem != "patch":
        raise ExportError(f"{mc_path}: model.vit.stem={stem!r}, expected 'patch': Hugging Face "
                          "SigLIP (Llava in transformers and vLLM) has only the patch conv, so "
                          "a conv-stem model cannot be exported; serve it with the JAX tools")
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    steps = _checkpoint_steps(ckpt_dir)
    if not steps:
        raise ExportError(f"{ckpt_dir}: no checkpoint (<step>/state); train stage 2 first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"--step={step}: no such checkpoint in {ckpt_dir}; available {steps}")
    params = restore_params(os.path.join(ckpt_dir, str(step), "state"))
    alpha = float(mc.get("lora_alpha", 16.0))
    lora = params.pop("lora", None)
    if lora:
        params = jax.device_get(lora_lib.merge(params, lora, alpha))
    tok = mc.get("tokenizer") or os.path.join(os.path.abspath(workdir), "tokenizer")
    if not os.path.isabs(tok):
        tok = os.path.join(os.path.abspath(workdir), tok)
    info = dict(source=os.path.join(ckpt_dir, str(step)), step=int(step),
                lora_merged=bool(lora), lora_alpha=alpha if lora else None,
                tokenizer_dir=tok if os.path.isdir(tok) else None)
    return params, cfg, info


# ----------------------------------------------------------------------------- verify
def sample_inputs(cfg, tokenizer=None, seed: int = 0):
    """(image float32[S,S,3], token ids int32[T]) for a check: a generated wafer map resized
    like the data pipeline does, and the chat-template prompt (or a synthetic id sequence
    holding the N image tokens when there is no tokenizer)."""
    from wamglm_jax.data.generator import generate
    from wamglm_jax.data.preprocess import area_resize_onehot
    from wamglm_jax.models.wamglm import num_image_tokens
    ds = generate(1, seed=seed, label_space="wm811k")
    image = area_resize_onehot(ds.maps[0], int(cfg.vit.image_size)).astype(np.float32)
    n = num_image_tokens(cfg)
    if tokenizer is not None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                             tokenize=False, add_generation_prompt=True)
        return image, text
    rng = np.random.default_rng(seed)
    lo = min(8, cfg.lm.vocab_size - 1)
    ids = rng.integers(lo, cfg.lm.vocab_size, 6 + n).astype(np.int32)
    ids = np.where(ids == cfg.image_token_id, lo, ids)
    ids[2:2 + n] = cfg.image_token_id
    return image, ids


def _jax_greedy(params, cfg, image, ids, new_tokens: int):
    """Greedy continuation with full forwards over a fixed buffer (one compile): causal
    attention makes the not-yet-written tail irrelevant to earlier positions."""
    import jax.numpy as jnp

    from wamglm_jax.models.wamglm import WamGLM
    model = WamGLM(cfg)
    t = len(ids)
    buf = np.zeros((1, t + new_tokens), np.int32)
    buf[0, :t] = ids
    fwd = jax.jit(lambda p, im, tk: model.apply({"params": p}, im, tk, jnp.ones_like(tk)))
    logits0 = None
    for i in range(new_tokens):
        logits = np.asarray(fwd(params, image[None], jnp.asarray(buf)))
        if i == 0:
            logits0 = logits[0, :t]
        buf[0, t + i] = int(logits[0, t + i - 1].argmax())
    return logits0, buf[0, t:]


def verify(out_dir: str, params, cfg, *, new_tokens: int = 8, seed: int = 0) -> dict:
    """Load out_dir with transformers (torch CPU, fp32, eager attention), run one image+prompt
    through it and through the JAX model; -> dict(max_abs_logit_diff, argmax_agreement,
    greedy_jax, greedy_torch, greedy_equal, processor_identity)."""
    import torch
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tok_present = os.path.exists(os.path.join(out_dir, "tokenizer.json"))
    processor_identity = None
    if tok_present:
        proc = transformers.AutoProcessor.from_pretrained(out_dir)
        image, text = sample_inputs(cfg, proc.tokenizer, seed)
        enc = proc(text=text, images=image, return_tensors="np")
        ids = enc["input_ids"][0].astype(np.int32)
        pv = enc["pixel_values"].astype(np.float32)
        processor_identity = float(np.abs(pv[0].transpose(1, 2, 0) - image).max())
    else:
        image, ids = sample_inputs(cfg, None, seed)
        pv = image.transpose(2, 0, 1)[None]
    jparams = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.dtype, cfg.remat = "float32", "none"          # the parity check is in fp32
    with jax.default_matmul_precision("highest"):
        jlogits, jgreedy = _jax_greedy(jparams, cfg, image, ids, new_tokens)
    tids = torch.from_numpy(ids[None].astype(np.int64))
    tpv = torch.from_numpy(np.ascontiguousarray(pv))
    tgreedy = []
    with torch.no_grad():
        tlogits = model(input_ids=tids, pixel_values=tpv).logits[0].numpy()
        cur = tids
        for _ in range(new_tokens):
            nxt = model(input_ids=cur, pixel_values=tpv).logits[0, -1].argmax()
            tgreedy.append(int(nxt))
            cur = torch.cat([cur, nxt.view(1, 1)], dim=1)
    diff = float(np.abs(jlogits - tlogits).max())
    return dict(max_abs_logit_diff=diff,
                argmax_agreement=float((jlogits.argmax(-1) == tlogits.argmax(-1)).mean()),
                greedy_jax=[int(x) for x in jgreedy], greedy_torch=tgreedy,
                greedy_equal=[int(x) for x in jgreedy] == tgreedy, tokens=int(len(ids)),
                processor_identity_max_diff=processor_identity)
