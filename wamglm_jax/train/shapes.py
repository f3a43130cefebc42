"""`shapes` stage: parameter shapes, counts and shardings of WamGLM for any preset, abstractly.

    python -m wamglm_jax.main --config=configs/presets.py:pod7b --workdir=DIR
        [--config.mesh.fsdp=...]        (presets' get_config sets stages=('shapes',))

Nothing is materialised (`jax.eval_shape`), so the 7B preset checks on a laptop. Prints one line
per parameter (path, shape, logical axes, mesh axes, per-device shard shape), the totals per
tower, and per-device memory of fp32 params + AdamW moments; writes DIR/shapes.json (process 0).
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
from etils import epath

from wamglm_jax.parallel import multihost, sharding


def example_inputs(model_cfg, batch: int, text_len: int = 8):
    """Abstract (images, tokens, attention_mask) for WamGLM: N image tokens + text_len text."""
    from wamglm_jax.models.wamglm import num_image_tokens
    s, c = model_cfg.vit.image_size, model_cfg.vit.num_channels
    t = num_image_tokens(model_cfg) + text_len
    return (jax.ShapeDtypeStruct((batch, s, s, c), jnp.float32),
            jax.ShapeDtypeStruct((batch, t), jnp.int32),
            jax.ShapeDtypeStruct((batch, t), jnp.int32))


def param_table(config, mesh):
    """[(path, shape, logical, mesh_spec, shard_shape)] for WamGLM(config.model) on `mesh`."""
    import flax.linen as nn

    from wamglm_jax.models.wamglm import WamGLM
    rules = sharding.rules_from_config(config)
    sharding.check_model_config(config.model, mesh)
    model = WamGLM(config=config.model)
    batch = sharding.axis_size(mesh, sharding.BATCH_AXES)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    with sharding.activate(mesh, rules):
        abstract = sharding.abstract_init(model, rng, *example_inputs(config.model, batch))
        sharding.check_shardable(abstract, mesh, rules)
        shardings = sharding.shardings_of(abstract, mesh, rules)
    logical = nn.get_partition_spec(abstract)
    leaves = jax.tree_util.tree_flatten_with_path(sharding.unbox_values(abstract))[0]
    rows = []
    for (path, leaf), spec, sh in zip(leaves, jax.tree.leaves(logical),
                                      jax.tree.leaves(shardings)):
        rows.append(dict(path="/".join(str(k.key) for k in path), shape=tuple(leaf.shape),
                         logical=tuple(spec), mesh=tuple(sh.spec),
                         shard=tuple(sh.shard_shape(leaf.shape))))
    return rows


def summarize(rows):
    towers = {}
    for r in rows:
        tower = r["path"].split("/")[1] if r["path"].startswith("params/") else r["path"]
        towers[tower] = towers.get(tower, 0) + math.prod(r["shape"])
    total = sum(towers.values())
    per_device = sum(math.prod(r["shard"]) for r in rows)
    return dict(params_per_tower=towers, params_total=total,
                params_per_device=per_device,
                # fp32 params + AdamW mu and nu: 3 x 4 bytes per parameter on each device
                bytes_per_device_params_adamw=12 * per_device)


def run(config, workdir, mesh):
    rows = param_table(config, mesh)
    summary = summarize(rows)
    if multihost.is_main_process():
        w = max(len(r["path"]) for r in rows)
        for r in rows:
            print(f"{r['path']:<{w}}  {str(r['shape']):<22} logical={r['logical']} "
                  f"mesh={r['mesh']} shard={r['shard']}")
        for tower, n in summary["params_per_tower"].items():
            print(f"{tower}: {n:,} params")
        print(f"total: {summary['params_total']:,} params; per device: "
              f"{summary['params_per_device']:,} params, "
              f"{summary['bytes_per_device_params_adamw'] / 2**30:.2f} GiB fp32 params+AdamW "
              f"({dict(mesh.shape)})")
        out = epath.Path(workdir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "shapes.json").write_text(json.dumps(
            dict(summary=summary, mesh=dict(mesh.shape),
                 params=[{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                         for r in rows]), indent=1, default=str))
    return summary
