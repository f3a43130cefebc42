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


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the run-level sections main.py needs, where a config lacks them.

    Fills `seed`, `mesh` and `sharding_rules` from base_config (e.g. for
    `configs/presets.py:<name>`, which only defines `model` and `stages`); never overrides a
    value the config sets. `stages` has no default: a config must say what to run.
    """
    if "stages" not in config:
        raise ValueError("config has no `stages` field: set config.stages, e.g. ('shapes',) or "
                         "('stage1', 'stage2')")
    out = ml_collections.ConfigDict(config.to_dict())   # unlocked copy
    base = base_config("tiny")
    for key in ("seed", "mesh", "sharding_rules"):
        if key not in out:
            out[key] = base[key]
    return out
