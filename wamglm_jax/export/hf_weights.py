"""Parameter-name and layout mapping between WamGLM (JAX) and Hugging Face (PyTorch) weights.

Per tower (names relative to the HF module):
    'vision'    <-> SiglipVisionModel.vision_model
                    (embeddings.*, encoder.layers.N.*, post_layernorm.*)
    'projector' <-> LlavaMultiModalProjector (linear_1.*, linear_2.*)
    'lm'        <-> LlamaForCausalLM
                    (model.embed_tokens, model.layers.N.*, model.norm, lm_head)
Whole model: `to_hf(params, cfg, layout)` / `from_hf(state_dict, cfg)` with layout
    "classic": vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*,
               language_model.lm_head.weight  (loads in transformers 4.5x, 5.x and vLLM)
    "v5":      model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*,
               lm_head.weight  (transformers 5.x `state_dict()` names)
`from_hf` accepts either layout.

Layout rules: Dense kernel [*in, *out] <-> Linear weight [prod(out), prod(in)] (reshape +
transpose; attention kernels are [D,H,hd] / [H,hd,D]); conv HWIO <-> OIHW; norm `scale` <->
`weight`. RoPE is split-half in both, so no q/k permutation. With tied embeddings no lm_head
is written (HF ties it to embed_tokens). Params are plain (unboxed) arrays; scanned stacks
(`layers`) are unstacked on export and re-stacked on import when cfg.scan_layers is set.
"""
from __future__ import annotations

import copy
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wamglm_jax.models.layers import stack_layers, unstack_layers
from wamglm_jax.models.vit import feature_layers, stem_kind

TOWERS = ("vision", "projector", "lm")
_PREFIX = {
    "classic": {"vision": "vision_tower.vision_model.", "projector": "multi_modal_projector.",
                "lm": "language_model."},
    "v5": {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.",
           "lm": "model.language_model."},
}
_OUT_PROJ = ("out_proj", "o_proj")    # kernels contracting two input axes [H, hd, D]


def _hf_name(tower: str, path: tuple[str, ...]) -> tuple[str, str]:
    """JAX param path inside a tower (unrolled) -> (HF name relative to the tower, kind)."""
    if tower == "vision" and path[0] == "embeddings":
        return {"kernel": ("embeddings.patch_embedding.weight", "conv"),
                "bias": ("embeddings.patch_embedding.bias", "copy"),
                "position_embedding": ("embeddings.position_embedding.weight", "copy")}[path[1]]
    mods = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path[:-1]]
    leaf = path[-1]
    if leaf == "kernel":
        name, kind = "weight", "dense2" if path[-2] in _OUT_PROJ else "dense1"
    elif leaf in ("scale", "embedding"):
        name, kind = "weight", "copy"
    elif leaf == "bias":
        name, kind = "bias", "copy"
    else:
        raise KeyError(f"no HF name for {tower}/{'/'.join(path)}")
    full = ".".join(mods + [name])
    if tower == "lm" and not full.startswith("lm_head"):
        full = "model." + full
    return full, kind


def _to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)                       # HWIO -> OIHW
    if kind in ("dense1", "dense2"):
        k = 1 if kind == "dense1" else 2
        return x.reshape(int(np.prod(x.shape[:k])), -1).T     # [*in,*out] -> [out, in]
    return x


def _from_torch_layout(w: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "conv":
        out = w.transpose(2, 3, 1, 0)                        # OIHW -> HWIO
    elif kind in ("dense1", "dense2"):
        out = w.T.reshape(shape)
    else:
        out = w.reshape(shape)
    if out.shape != tuple(shape):
        raise ValueError("shape mismatch")
    return out


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def tower_to_hf(tower_params, tower: str) -> dict[str, np.ndarray]:
    """One tower's params (unrolled or scanned) -> {HF name relative to the tower: array}."""
    tree = flax.core.unfreeze(nn.unbox(tower_params))     # accepts boxed / frozen trees too
    out = {}
    for path, x in _flatten(unstack_layers(tree)):
        name, kind = _hf_name(tower, path)
        x = np.asarray(jax.device_get(x), np.float32)
        if path[-1] == "bias" and x.ndim > 1:
            x = x.reshape(-1)                                  # [H, hd] -> [H*hd]
        else:
            x = _to_torch_layout(x, kind)
        out[name] = np.array(x, np.float32, order="C")        # writable copy
    return out


def _abstract_params(cfg):
    """Unrolled param shapes of WamGLM(cfg) (eval_shape: nothing is materialised)."""
    from wamglm_jax.models.wamglm import WamGLM, num_image_tokens
    ucfg = copy.deepcopy(cfg)
    ucfg.scan_layers, ucfg.remat = False, "none"
    s, n = cfg.vit.image_size, num_image_tokens(cfg)
    images = jnp.zeros((1, s, s, cfg.vit.num_channels), jnp.float32)
    tokens = jnp.full((1, n), cfg.image_token_id, jnp.int32)
    shapes = jax.eval_shape(lambda: nn.unbox(WamGLM(ucfg).init(
        jax.random.key(0), images, tokens, jnp.ones((1, n), jnp.int32))["params"]))
    return shapes


def tower_from_hf(state_dict, tower: str, cfg, _shapes=None):
    """{HF name relative to the tower: array (numpy or torch)} -> the tower's JAX params
    (stacked if cfg.scan_layers). Raises KeyError naming missing or unexpected weights,
    ValueError for a weight of the wrong shape (see _check_unexpected for what is skipped)."""
    if tower == "vision" and any(k.startswith("vision_model.") for k in state_dict):
        # SiglipVisionModel / full SiglipModel names: keep the vision tower's (a full SigLIP
        # checkpoint also holds text_model.*, logit_scale, ...).
        state_dict = {k[len("vision_model."):]: v for k, v in state_dict.items()
                      if k.startswith("vision_model.")}
    shapes = (_shapes or _abstract_params(cfg))[tower]
    out: dict = {}
    missing = []
    for path, sds in _flatten(shapes):
        name, kind = _hf_name(tower, path)
        if name not in state_dict:
            missing.append(name)
            continue
        w = _numpy(state_dict[name])
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        try:
            x = _from_torch_layout(w, kind, sds.shape)
        except ValueError:
            raise ValueError(f"HF weight {name!r} of shape {tuple(w.shape)} does not fit JAX "
                             f"shape {tuple(sds.shape)} ({tower}/{'/'.join(path)}); check that "
                             f"config.model matches the HF config") from None
        node[path[-1]] = jnp.asarray(x, jnp.float32)
    if missing:
        raise KeyError(f"HF {tower} weights missing: {missing[:6]}"
                       + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""))
    _check_unexpected(state_dict, tower, cfg, used={_hf_name(tower, p)[0]
                                                    for p, _ in _flatten(shapes)})
    return stack_layers(out) if cfg.scan_layers else out


def _numpy(w) -> np.ndarray:
    return w.detach().float().cpu().numpy() if hasattr(w, "detach") else np.asarray(w, np.float32)


def _check_unexpected(state_dict, tower: str, cfg, used: set) -> None:
    """Weights the JAX tower has no place for are an error (a deeper checkpoint, biases the
    model lacks, an untied lm_head under tie_embeddings), except ones that carry no
    information for it: SigLIP's attention-pooling `head.*` (Llava never uses it), RoPE
    `inv_freq` buffers, and with tied embeddings an `lm_head.weight` equal to embed_tokens
    (HF state dicts list the tied matrix under both names)."""
    extra = []
    for name in state_dict:
        if name in used or name.endswith("rotary_emb.inv_freq") or (
                tower == "vision" and name.startswith("head.")):
            continue
        if tower == "lm" and name == "lm_head.weight" and cfg.lm.tie_embeddings:
            emb = state_dict.get("model.embed_tokens.weight")
            if emb is not None and np.array_equal(_numpy(state_dict[name]), _numpy(emb)):
                continue
            raise ValueError("HF lm weights: lm_head.weight differs from embed_tokens but "
                             "config.model.lm.tie_embeddings=True (set it False to import an "
                             "untied head)")
        extra.append(name)
    if extra:
        raise KeyError(f"HF {tower} weights unexpected (config.model has no place for them; "
                       f"check num_layers / biases against the HF config): {sorted(extra)[:6]}"
                       + (f" (+{len(extra) - 6} more)" if len(extra) > 6 else ""))


def to_hf(params, cfg, layout: str = "classic") -> dict[str, np.ndarray]:
    """Whole WamGLM params -> Llava state dict (numpy fp32) in the given layout."""
    if layout not in _PREFIX:
        raise ValueError(f"layout={layout!r}; expected one of {sorted(_PREFIX)}")
    out = {}
    for tower in TOWERS:
        for name, x in tower_to_hf(params[tower], tower).items():
            if tower == "lm" and layout == "v5":
                full = name if name.startswith("lm_head") else \
                    _PREFIX["v5"]["lm"] + name[len("model."):]
            else:
                full = _PREFIX[layout][tower] + name
            out[full] = x
    return out


# (prefix, tower, prefix of the tower-relative name) in match order; covers both layouts
# and the transformers 5.x `vision_tower.vision_model.` hybrid.
_SPLIT = (
    ("vision_tower.vision_model.", "vision", ""),
    ("model.vision_tower.vision_model.", "vision", ""),
    ("model.vision_tower.", "vision", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("language_model.model.", "lm", "model."),
    ("language_model.lm_head.", "lm", "lm_head."),
    ("model.language_model.", "lm", "model."),
    ("lm_head.", "lm", "lm_head."),
)


def _split_towers(state_dict):
    """Llava state dict in either layout -> {tower: {relative name: array}}. A name outside
    the three towers (e.g. llava-next's image_newline) is an error, not silently dropped."""
    towers = {t: {} for t in TOWERS}
    stray = []
    for name, w in state_dict.items():
        for pre, tower, rel in _SPLIT:
            if name.startswith(pre):
                towers[tower][rel + name[len(pre):]] = w
                break
        else:
            stray.append(name)
    if stray:
        raise KeyError(f"Llava weights outside vision tower / projector / language model: "
                       f"{sorted(stray)[:6]}" + (f" (+{len(stray) - 6} more)"
                                                 if len(stray) > 6 else ""))
    return towers


def from_hf(state_dict, cfg):
    """Llava state dict (classic or v5 names; numpy or torch tensors) -> WamGLM params."""
    towers = _split_towers(state_dict)
    shapes = _abstract_params(cfg)
    return {t: tower_from_hf(towers[t], t, cfg, shapes) for t in TOWERS}


def _hf_feature_layer(cfg):
    """HF vision_feature_layer: the int for one layer (what every loader reads), else a list."""
    layers = feature_layers(cfg)
    return layers[0] if len(layers) == 1 else list(layers)


def hf_config_kwargs(cfg) -> dict:
    """Keyword arguments for transformers SiglipVisionConfig / LlamaConfig / LlavaConfig that
    describe the same architecture as config.model `cfg`."""
    v, lm = cfg.vit, cfg.lm
    if stem_kind(cfg) != "patch":
        raise ValueError(f"config.model.vit.stem={v.stem!r}: Hugging Face SigLIP (and so Llava "
                         "in transformers and vLLM) has only the patch conv; a model trained "
                         "with stem='conv' cannot be exported (serve it with the JAX tools)")
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                  num_channels=v.num_channels, image_size=v.image_size,
                  patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                  hidden_act="gelu_pytorch_tanh", attention_dropout=0.0, vision_use_head=False)
    text = dict(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size,
                intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
                num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
                head_dim=lm.head_dim, rms_norm_eps=lm.rms_norm_eps, rope_theta=lm.rope_theta,
                max_position_embeddings=lm.max_seq_len, tie_word_embeddings=lm.tie_embeddings,
                hidden_act="silu", attention_bias=False, mlp_bias=False)
    n = (v.image_size // v.patch_size) ** 2
    llava = dict(image_token_index=cfg.image_token_id, image_seq_length=n,
                 projector_hidden_act=cfg.projector.hidden_act,
                 vision_feature_layer=_hf_feature_layer(cfg),
                 vision_feature_select_strategy="full",
                 multimodal_projector_bias=True, tie_word_embeddings=lm.tie_embeddings)
    return dict(vision=vision, text=text, llava=llava)
