"""Pieces shared by every run config. A run config calls `base_config()` and overrides."""
import ml_collections

from configs import presets

# Logical axis -> mesh axis rules (flax `logical_axis_rules` format). The first rule whose
# mesh axis is free is used. `None` means replicated.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),       # d_model dimension of weights (FSDP shards it)
    ("act_embed", None),     # d_model dimension of activations
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),            # per-head dimension
    ("vocab", "tensor"),
    ("patch", None),
    ("channels", None),
    ("classes", None),
    ("layers", None),        # stacked (nn.scan) layer axis
    ("norm", None),
)


def base_config(model: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = ("stage1", "stage2")    # which stages main.py runs, in order
    config.model = presets.model_config(model)
    # Device mesh: one of the sizes may be -1 (= all remaining devices).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.sharding_rules = SHARDING_RULES
    # Data: filled in by the data layer's defaults; see wamglm_jax/data.
    config.data = ml_collections.ConfigDict()
    config.stage1 = ml_collections.ConfigDict()
    config.stage2 = ml_collections.ConfigDict()
    return config
