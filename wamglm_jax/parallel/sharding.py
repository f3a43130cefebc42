"""Logical-axis sharding: abstract params -> NamedShardings -> sharded init; batch sharding.

How a trainer uses it (see also wamglm_jax/parallel/mesh.py)::

    rules = sharding.rules_from_config(config)             # config.sharding_rules
    mesh = make_mesh(config.mesh)
    with sharding.activate(mesh, rules):                   # jax.set_mesh + nn.logical_axis_rules
        sharding.check_model_config(config.model, mesh)    # heads / vocab / mlp vs 'tensor'
        state, state_sh = sharding.jit_init(make_state, rng, mesh=mesh, rules=rules)
        batch_sh = sharding.data_sharding(mesh)
        step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
        for local_batch in loader:                         # numpy, this process's rows only
            state, metrics = step(state, sharding.global_batch(local_batch, mesh))

`make_state(rng)` may return anything built from *boxed* flax variables (e.g. a TrainState whose
params come straight from `model.init`; optax's init maps over the boxes, so the optimizer
moments inherit the parameters' logical axes). `jit_init` evaluates it abstractly
(`jax.eval_shape`), reads the logical annotations (`nn.get_partition_spec`), maps them to mesh
axes with the rules (`nn.logical_to_mesh_sharding`), checks every sharded dimension divides its
mesh axes, and runs the real init under `jax.jit(..., out_shardings=...)`, so each device only
ever allocates its own shard. The result is unboxed (plain arrays); `model.apply` accepts that.

Activation constraints in the models (`nn.with_logical_constraint`) need both the mesh
(`jax.set_mesh`) and the rules (`nn.logical_axis_rules`) in context while the step is traced:
`activate` enters both.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")   # mesh axes the batch dimension is split over


class ShardingError(ValueError):
    """A size does not fit the mesh, or a logical axis has no rule."""


# ----------------------------------------------------------------------------- rules and context
def rules_from_config(config_or_rules) -> tuple:
    """config.sharding_rules (or the rules themselves) as flax's tuple-of-pairs format.

    Accepts lists (a config reloaded from JSON) and normalises mesh-axis lists to tuples.
    """
    rules = getattr(config_or_rules, "sharding_rules", config_or_rules)
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ShardingError(f"config.sharding_rules[{i}]={rule!r}: expected (logical_name, "
                                "mesh_axis | (mesh_axes...) | None)")
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        elif axes is not None and not isinstance(axes, str):
            raise ShardingError(f"config.sharding_rules[{i}]={rule!r}: mesh axis must be a str, "
                                "a tuple of str, or None")
        out.append((name, axes))
    return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Enter `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` together."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_from_config(rules)):
        yield


# ----------------------------------------------------------------------------- size checks
def pad_vocab(vocab_size: int, multiple: int = 128) -> int:
    """Smallest multiple of `multiple` >= vocab_size.

    The embedding and LM head are sharded over 'tensor' along the vocabulary, so the model's
    config.model.lm.vocab_size must divide by the tensor size. Whoever sets vocab_size from a
    tokenizer sets `config.model.lm.vocab_size = pad_vocab(len(tokenizer), 128 * tensor)`
    (128 keeps each shard lane-aligned on TPU); the extra rows are never produced by the
    tokenizer and their logits can be masked at sampling time.
    """
    if vocab_size <= 0 or multiple <= 0:
        raise ValueError(f"pad_vocab: sizes must be positive, got vocab_size={vocab_size}, "
                         f"multiple={multiple}")
    return -(-vocab_size // multiple) * multiple


def axis_size(mesh: Mesh, axes) -> int:
    """Product of the sizes of mesh axis name(s) `axes` (None -> 1)."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's rows of a global batch (global_batch concatenates the processes' rows
    in process order). ValueError unless the batch splits evenly."""
    if global_batch_size % process_count:
        raise ValueError(f"batch size {global_batch_size} is not a multiple of the "
                         f"{process_count} processes")
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def check_batch(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    n = axis_size(mesh, BATCH_AXES)
    if global_batch_size % n:
        raise ShardingError(
            f"{what} {global_batch_size} is not divisible by data*fsdp = {mesh.shape['data']}*"
            f"{mesh.shape['fsdp']} = {n}; choose a global batch that is a multiple of {n}")


def check_model_config(model_cfg, mesh: Mesh) -> None:
    """Sizes the 'tensor' axis splits must divide by it; raises one error listing all problems."""
    t = mesh.shape["tensor"]
    sizes = {
        "model.vit.num_heads": model_cfg.vit.num_heads,
        "model.vit.intermediate_size": model_cfg.vit.intermediate_size,
        "model.lm.num_heads": model_cfg.lm.num_heads,
        "model.lm.num_kv_heads": model_cfg.lm.num_kv_heads,
        "model.lm.intermediate_size": model_cfg.lm.intermediate_size,
        "model.lm.vocab_size": model_cfg.lm.vocab_size,
    }
    bad = [f"{k}={v}" for k, v in sizes.items() if v % t]
    if bad:
        hint = (f" (pad the vocabulary: sharding.pad_vocab({model_cfg.lm.vocab_size}, 128*{t}) = "
                f"{pad_vocab(model_cfg.lm.vocab_size, 128 * t)})"
                if model_cfg.lm.vocab_size % t else "")
        raise ShardingError(f"mesh tensor={t} does not divide {', '.join(bad)}; choose "
                            f"config.mesh.tensor dividing all of them{hint}")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def unbox_values(tree):
    """Strip nn.Partitioned boxes without applying sharding constraints.

    (`nn.unbox` constrains each value when a mesh is set, which fails on abstract or
    uncommitted arrays outside jit; inside jit use `nn.unbox`, whose constraints are wanted.)
    """
    return jax.tree_util.tree_map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def check_shardable(abstract, mesh: Mesh, rules) -> None:
    """Every boxed leaf: each logical axis has a rule, and each sharded dim divides its axes.

    `abstract` is the boxed output of `jax.eval_shape(init)`. Errors name the parameter path,
    its shape, the logical axis and the mesh axes.
    """
    rules = rules_from_config(rules)
    known = {name for name, _ in rules}
    problems = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=_is_box)[0]
    for path, leaf in leaves:
        if not _is_box(leaf):
            continue
        names = leaf.get_partition_spec()
        shape = leaf.value.shape
        missing = [n for n in names if n is not None and n not in known]
        if missing:
            problems.append(f"{_path_str(path)}: logical axes {missing} have no rule in "
                            f"config.sharding_rules")
            continue
        mesh_spec = nn.logical_to_mesh_axes(names, rules)
        for dim, (size, name, axes) in enumerate(zip(shape, names, mesh_spec)):
            n = axis_size(mesh, axes)
            if size % n:
                problems.append(f"{_path_str(path)} shape {tuple(shape)}: dim {dim} ({name!r}) "
                                f"= {size} is not divisible by mesh axes {axes} of size {n}")
    if problems:
        raise ShardingError("cannot shard over " + ", ".join(f"{k}={v}" for k, v in
                            mesh.shape.items()) + ":\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- init
def shardings_of(abstract, mesh: Mesh, rules):
    """NamedSharding tree (same structure as the *unboxed* tree) from a boxed abstract tree.

    Unannotated leaves (e.g. an optimizer step count) are replicated.
    """
    specs = nn.get_partition_spec(abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_from_config(rules))


def jit_init(fn: Callable, *args, mesh: Mesh, rules, check: bool = True, **kwargs):
    """Run fn(*args, **kwargs) (returning boxed variables / a state) sharded from the start.

    Returns (unboxed tree of sharded jax.Arrays, tree of NamedShardings).
    """
    rules = rules_from_config(rules)
    with activate(mesh, rules):
        abstract = jax.eval_shape(lambda *a: fn(*a, **kwargs), *args)
        if check:
            check_shardable(abstract, mesh, rules)
        out_sh = shardings_of(abstract, mesh, rules)
        tree = jax.jit(lambda *a: nn.unbox(fn(*a, **kwargs)), out_shardings=out_sh)(*args)
    return tree, out_sh


def abstract_init(model: nn.Module, rng, *inputs, method=None, **kwargs):
    """Boxed abstract variables of model.init (ShapeDtypeStructs; nothing is allocated)."""
    return jax.eval_shape(lambda r, *a: model.init(r, *a, method=method, **kwargs), rng, *inputs)


def init_sharded(model: nn.Module, rng, *inputs, mesh: Mesh, rules, method=None, **kwargs):
    """model.init(rng, *inputs) with every variable created directly in its sharding.

    Returns (variables, shardings): unboxed dict {'params': ..., ...} and the matching
    NamedSharding tree (use it as in/out_shardings for jitted steps).
    """
    return jit_init(lambda r, *a: model.init(r, *a, method=method, **kwargs), rng, *inputs,
                    mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------- data
def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over ('data', 'fsdp'); other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping | np.ndarray, mesh: Mesh):
    """Global jax.Arrays from this process's rows (a dict / pytree of numpy arrays).

    Every process passes its own local batch (equal sizes); the global batch is their
    concatenation in process order, sharded by `data_sharding(mesh)`.
    """
    sh = data_sharding(mesh)
    nproc = jax.process_count()

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ShardingError(f"batch field {_path_str(path)!r} is a scalar; batch fields need "
                                "a leading batch dimension")
        check_batch(x.shape[0] * nproc, mesh,
                    what=f"global batch of field {_path_str(path)!r} ({x.shape[0]} rows x "
                         f"{nproc} process(es))")
        return jax.make_array_from_process_local_data(sh, x, (x.shape[0] * nproc,) + x.shape[1:])

    return jax.tree_util.tree_map_with_path(one, local)
