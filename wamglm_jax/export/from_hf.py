"""Import pretrained Hugging Face weights (local safetensors dirs only) into WamGLM params.

    hf_cfg, sd = read_hf_dir(path)                     # config.json + *.safetensors (sharded ok)
    params, cfg, info = import_pretrained(base_cfg, llava=DIR | None, vision=DIR | None,
                                          lm=DIR | None, seed=0)

Supported sources (each checked against what config.model can represent; anything else is
a clear ImportHFError naming the dir and field):
- `llava`: a LlavaForConditionalGeneration dir with a SigLIP tower and a Llama text model
  (e.g. one written by export/to_hf.py): all three towers.
- `vision`: SigLIP (`siglip_vision_model`, or a full `siglip` dir: its vision_config and
  `vision_model.*` weights). The attention-pooling head is not part of WamGLM and is dropped.
  CLIP towers are refused (class token, pre-LN, quick_gelu: not the SigLIP block).
- `lm`: Llama-family causal LMs without biases: `llama`, `mistral` (only when the sliding
  window covers max_seq_len). Qwen2-style q/k/v biases are refused (the decoder has none).
Towers not imported are initialised from `base_cfg` (random, `seed`); the projector is always
re-initialised unless a llava dir is given (its shape depends on both towers).
`resize_vocab` grows the embedding / lm_head rows (new rows = mean of the old rows), e.g. to
make room for `<image>` and pad to a multiple of 128 for the tensor axis.
No network access: paths must be local directories.
"""
from __future__ import annotations

import copy
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wamglm_jax.export import hf_weights
from wamglm_jax.models.vit import feature_blocks, set_feature_layer


class ImportHFError(ValueError):
    """An HF directory that cannot be imported into config.model as is."""


# ----------------------------------------------------------------------------- reading
def read_hf_dir(path: str):
    """-> (config.json dict, {name: float32 numpy}) from a local safetensors HF directory."""
    from safetensors.numpy import load_file
    if not os.path.isdir(path):
        raise ImportHFError(f"{path}: not a local directory (no downloads: pass a directory "
                            "holding config.json and *.safetensors)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ImportHFError(f"{path}: no config.json")
    hf_cfg = json.load(open(cfg_path))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        raise ImportHFError(f"{path}: no *.safetensors weights" + (
            f" (found {bins}: pickle-based files are not loaded; convert them to safetensors "
            "with a trusted tool first)" if bins else ""))
    sd = {}
    for f in files:
        for k, v in load_file(os.path.join(path, f)).items():
            sd[k] = np.asarray(v, np.float32)
    return hf_cfg, sd


def _get(d: dict, key: str, where: str, default=KeyError):
    if key in d and d[key] is not None:
        return d[key]
    if default is KeyError:
        raise ImportHFError(f"{where}: config field {key!r} missing")
    return default


# ----------------------------------------------------------------------------- configs
def vision_fields(v: dict, where: str) -> dict:
    """config.model.vit fields from a SigLIP vision config dict."""
    mt = v.get("model_type", "siglip_vision_model")
    if mt not in ("siglip_vision_model", "siglip"):
        raise ImportHFError(f"{where}: vision model_type {mt!r} is not supported; only SigLIP "
                            "towers match the WamGLM ViT (CLIP has a class token, pre-LN and "
                            "quick_gelu)")
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ImportHFError(f"{where}: vision hidden_act={act!r}; the WamGLM ViT uses "
                            "tanh-approximate GELU (gelu_pytorch_tanh)")
    return dict(image_size=int(_get(v, "image_size", where)),
                patch_size=int(_get(v, "patch_size", where)),
                num_channels=int(v.get("num_channels", 3)),
                hidden_size=int(_get(v, "hidden_size", where)),
                intermediate_size=int(_get(v, "intermediate_size", where)),
                num_layers=int(_get(v, "num_hidden_layers", where)),
                num_heads=int(_get(v, "num_attention_heads", where)),
                layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
                stem="patch")           # SigLIP embeds with the patch conv


def lm_fields(t: dict, where: str, max_seq_len: int | None = None) -> dict:
    """config.model.lm fields from a Llama-family text config dict."""
    mt = t.get("model_type", "llama")
    if mt not in ("llama", "mistral"):
        hint = " (Qwen2 has q/k/v biases, which the WamGLM decoder does not)" \
            if mt.startswith("qwen") else ""
        raise ImportHFError(f"{where}: LM model_type {mt!r} is not supported; expected llama "
                            f"or mistral{hint}")
    for key in ("attention_bias", "mlp_bias"):
        if t.get(key):
            raise ImportHFError(f"{where}: {key}=True; the WamGLM decoder has no biases")
    if t.get("hidden_act", "silu") != "silu":
        raise ImportHFError(f"{where}: hidden_act={t['hidden_act']!r}; the decoder uses "
                            "SwiGLU (silu)")
    rp = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype != "default":
        raise ImportHFError(f"{where}: rope type {rtype!r}; only default RoPE is supported")
    theta = t.get("rope_theta", rp.get("rope_theta", 10000.0))
    heads = int(_get(t, "num_attention_heads", where))
    hidden = int(_get(t, "hidden_size", where))
    max_pos = int(t.get("max_position_embeddings", 2048))
    msl = min(max_pos, int(max_seq_len)) if max_seq_len else max_pos
    sw = t.get("sliding_window")
    if sw is not None and t.get("use_sliding_window", True) and int(sw) < msl:
        raise ImportHFError(f"{where}: sliding_window={sw} < max_seq_len={msl}; the decoder "
                            "attends over the whole sequence (lower max_seq_len)")
    return dict(vocab_size=int(_get(t, "vocab_size", where)), hidden_size=hidden,
                intermediate_size=int(_get(t, "intermediate_size", where)),
                num_layers=int(_get(t, "num_hidden_layers", where)), num_heads=heads,
                num_kv_heads=int(t.get("num_key_value_heads") or heads),
                head_dim=int(t.get("head_dim") or hidden // heads),
                rope_theta=float(theta), rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(t.get("tie_word_embeddings", False)), max_seq_len=msl)


def _vision_config_of(hf_cfg: dict) -> dict:
    return hf_cfg["vision_config"] if "vision_config" in hf_cfg else hf_cfg


def _text_config_of(hf_cfg: dict) -> dict:
    t = dict(hf_cfg.get("text_config", hf_cfg))
    if "tie_word_embeddings" not in t and "tie_word_embeddings" in hf_cfg:
        t["tie_word_embeddings"] = hf_cfg["tie_word_embeddings"]
    return t


def model_config_from_hf(base_cfg, *, llava: dict | None = None, vision: dict | None = None,
                         lm: dict | None = None, where=("llava", "vision", "lm")):
    """config.model: base_cfg with the vit / lm sections replaced by what the HF configs say."""
    cfg = ml_collections.ConfigDict(copy.deepcopy(base_cfg.to_dict()))
    if llava is not None:
        if llava.get("model_type") != "llava":
            raise ImportHFError(f"{where[0]}: model_type {llava.get('model_type')!r}, "
                                "expected 'llava'")
        strat = llava.get("vision_feature_select_strategy", "default")
        if strat != "full":
            raise ImportHFError(f"{where[0]}: vision_feature_select_strategy={strat!r}; a SigLIP "
                                "tower without a CLS token needs 'full'")
        if llava.get("projector_hidden_act", "gelu") != "gelu":
            raise ImportHFError(f"{where[0]}: projector_hidden_act must be 'gelu'")
        fl = llava.get("vision_feature_layer", -2)
        if not (isinstance(fl, int) or isinstance(fl, list) and fl
                and all(isinstance(k, int) for k in fl)):
            raise ImportHFError(f"{os.path.join(where[0], 'config.json')}: vision_feature_layer="
                                f"{fl!r}; a layer index or a non-empty list of them expected")
        vision, lm = _vision_config_of(llava), _text_config_of(llava)
        set_feature_layer(cfg, fl)
        cfg.image_token_id = int(llava.get("image_token_id", llava.get("image_token_index")))
    if vision is not None:
        cfg.vit.update(vision_fields(_vision_config_of(vision),
                                     where[1] if llava is None else where[0]))
    if lm is not None:
        cfg.lm.update(lm_fields(_text_config_of(lm), where[2] if llava is None else where[0],
                                base_cfg.lm.max_seq_len))
    feature_blocks(cfg)          # feature_layer still valid for the new depth
    return cfg


# ----------------------------------------------------------------------------- params
def init_towers(cfg, towers, seed: int = 0) -> dict:
    """Fresh params of the given towers ('vision', 'projector', 'lm'), each initialised by its
    own module (the same trees WamGLM builds; no whole-model init for towers replaced anyway)."""
    from wamglm_jax.models import Decoder, Projector, VisionTransformer
    from wamglm_jax.models.wamglm import num_image_tokens
    s, n = cfg.vit.image_size, num_image_tokens(cfg)
    inputs = {"vision": (VisionTransformer, jnp.zeros((1, s, s, cfg.vit.num_channels))),
              "projector": (Projector, jnp.zeros((1, n, cfg.vit.hidden_size))),
              "lm": (Decoder, jnp.zeros((1, 2), jnp.int32))}
    out = {}
    for i, tower in enumerate(("vision", "projector", "lm")):
        if tower in towers:
            module, x = inputs[tower]
            p = module(cfg).init(jax.random.fold_in(jax.random.key(seed), i), x)["params"]
            out[tower] = jax.tree.map(np.asarray, nn.unbox(p))
    return out


def import_pretrained(base_cfg, *, llava: str | None = None, vision: str | None = None,
                      lm: str | None = None, seed: int = 0):
    """-> (params {'vision','projector','lm'}, config.model, info). See the module docstring."""
    if llava and (vision or lm):
        raise ImportHFError("give either a llava dir or vision/lm dirs, not both")
    if not (llava or vision or lm):
        raise ImportHFError("nothing to import: give a llava, vision or lm dir")
    loaded = {k: read_hf_dir(p) for k, p in (("llava", llava), ("vision", vision), ("lm", lm)) if p}
    cfg = model_config_from_hf(base_cfg, **{k: v[0] for k, v in loaded.items()},
                               where=(llava, vision, lm))
    info = dict(imported=[], initialised=[], sources={k: os.path.abspath(p) for k, p in
                                                      (("llava", llava), ("vision", vision),
                                                       ("lm", lm)) if p})
    if llava:
        try:
            params = jax.tree.map(np.asarray, hf_weights.from_hf(loaded["llava"][1], cfg))
        except (KeyError, ValueError) as e:
            raise ImportHFError(f"{llava}: {e}") from None
        info["imported"] = ["vision", "projector", "lm"]
        return params, cfg, info
    params = init_towers(cfg, [t for t, p in (("vision", vision), ("projector", None),
                                               ("lm", lm)) if not p], seed)
    for tower, path in (("vision", vision), ("lm", lm)):
        if not path:
            info["initialised"].append(tower)
            continue
        sd = loaded[tower][1]
        if tower == "lm":
            if any(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in sd):
                raise ImportHFError(f"{path}: attention projections have biases; the WamGLM "
                                    "decoder has none")
        try:
            params[tower] = jax.tree.map(np.asarray, hf_weights.tower_from_hf(sd, tower, cfg))
        except (KeyError, ValueError) as e:
            raise ImportHFError(f"{path}: {e}") from None
        info["imported"].append(tower)
    info["initialised"].append("projector")
    return params, cfg, info


def resize_vocab(params, cfg, new_size: int):
    """Grow lm embed_tokens (and lm_head) to `new_size` rows; new rows = mean of the old ones.
    Returns (params, cfg) copies."""
    old = int(cfg.lm.vocab_size)
    if new_size < old:
        raise ImportHFError(f"resize_vocab: {new_size} < current vocab_size {old}")
    if new_size == old:
        return params, cfg
    params = jax.tree.map(lambda x: x, params)
    lm = dict(params["lm"])
    emb = np.asarray(lm["embed_tokens"]["embedding"])                  # float[V,D]
    pad = np.repeat(emb.mean(0, keepdims=True), new_size - old, 0)
    lm["embed_tokens"] = dict(lm["embed_tokens"], embedding=np.concatenate([emb, pad], 0))
    if "lm_head" in lm:
        k = np.asarray(lm["lm_head"]["kernel"])                         # float[D,V]
        pad = np.repeat(k.mean(1, keepdims=True), new_size - old, 1)
        lm["lm_head"] = dict(lm["lm_head"], kernel=np.concatenate([k, pad], 1))
    params = dict(params, lm=lm)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.lm.vocab_size = int(new_size)
    return params, cfg
