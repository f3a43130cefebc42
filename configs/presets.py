"""Model presets: `tiny` (CPU tests and quickstart), `small`, `base`, `pod7b`.

Usage in a config file: `config.model = presets.model_config("tiny")`.
As a config file of its own (shape checks): `--config=configs/presets.py:base`.
"""
import ml_collections

# Fields shared by every preset; a preset overrides what differs.
def _defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        vit=dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64,
                 intermediate_size=128, num_layers=2, num_heads=4, layer_norm_eps=1e-6,
                 # output of this block (HF hidden_states index), pre-norm; or a list of
                 # them, concatenated (HF vision_feature_layer list): any type, so an override
                 # may give either, e.g. --config.model.vit.feature_layer="(0,-1)"
                 feature_layer=ml_collections.FieldReference(-1, field_type=object),
                 stem="patch",          # patch (SigLIP patch conv) | conv (conv stem, no export)
                 stem_depth=1,          # stem='conv': 3x3 convs per stem stage (1 + residuals)
                 drop_path_rate=0.0),   # stochastic depth at the last block (stage-1 training)
        projector=dict(hidden_act="gelu"),  # LLaVA mlp2x_gelu, exact erf GELU
        lm=dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                rms_norm_eps=1e-5, tie_embeddings=False, max_seq_len=512),
        dtype="float32",        # compute dtype; params stay float32
        remat="none",           # none | full | dots
        scan_layers=False,
        image_token_id=3,       # set from the tokenizer at run time
    ))


PRESETS = {
    "tiny": {},
    "small": dict(
        vit=dict(image_size=64, patch_size=8, hidden_size=192, intermediate_size=768,
                 num_layers=6, num_heads=3),
        lm=dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4,
                num_heads=4, num_kv_heads=2, head_dim=64, max_seq_len=1024)),
    "base": dict(
        vit=dict(image_size=64, patch_size=4, hidden_size=384, intermediate_size=1536,
                 num_layers=8, num_heads=6, feature_layer=-2),
        lm=dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_layers=12,
                num_heads=12, num_kv_heads=4, head_dim=64, max_seq_len=2048)),
    # 7B-class LM (Llama-2-7B shapes) with a 400M-class ViT (SigLIP-so400m shapes). The image
    # is 378 = 27 x 14 (so400m's 384 leaves a 6-pixel border its conv ignores): same 729
    # patches, and N = (S/P)^2 holds exactly.
    "pod7b": dict(
        vit=dict(image_size=378, patch_size=14, hidden_size=1152, intermediate_size=4304,
                 num_layers=27, num_heads=16, feature_layer=-2),
        lm=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                num_heads=32, num_kv_heads=32, head_dim=128, max_seq_len=4096),
        dtype="bfloat16", remat="full", scan_layers=True),
}


def model_config(name: str) -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    cfg = _defaults()
    cfg.update_from_flattened_dict(
        {f"{k}.{kk}" if isinstance(v, dict) else k: (vv if isinstance(v, dict) else v)
         for k, v in PRESETS[name].items()
         for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])})
    return cfg


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config(arg or "tiny")
    config.stages = ("shapes",)     # main.py: print param shapes/shardings (wamglm_jax/train/shapes.py)
    # Run-level sections so main.py overrides like --config.mesh.fsdp=4 work (lazy import:
    # configs/common.py imports this module).
    from configs.common import base_config
    base = base_config(arg or "tiny")
    for key in ("seed", "mesh", "sharding_rules"):
        config[key] = base[key]
    return config
