"""Device mesh from the config: axes ('data', 'fsdp', 'tensor'), all of AxisType.Auto.

Usage (a trainer)::

    mesh = make_mesh(config.mesh)            # config.mesh = {data: -1, fsdp: 1, tensor: 1}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):   # or sharding.activate(mesh, rules)
        ...trace / run jitted steps...

Enter the mesh with `jax.set_mesh(mesh)`, NOT the older `with mesh:`. In jax 0.10 flax reads the
mesh from `jax.sharding.get_abstract_mesh()`, which only `jax.set_mesh` sets; under `with mesh:`
every `nn.with_logical_constraint` silently lowers to nothing (tests/test_mesh.py checks the HLO).

Axis types are Auto on purpose: the logical-axis-rule code (flax `with_logical_constraint`,
`logical_to_mesh_sharding`) is written for GSPMD propagation; `jax.make_mesh` would default to
Explicit, where every op needs explicit output shardings.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


class MeshConfigError(ValueError):
    """config.mesh does not describe a mesh over the available devices."""


def _field(mesh_cfg, name):
    if isinstance(mesh_cfg, Mapping):
        if name not in mesh_cfg:
            raise MeshConfigError(f"config.mesh: missing field {name!r}; expected fields {AXES}")
        return mesh_cfg[name]
    if not hasattr(mesh_cfg, name):
        raise MeshConfigError(f"config.mesh: missing field {name!r}; expected fields {AXES}")
    return getattr(mesh_cfg, name)


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with the one -1 (if any) replaced by the remaining devices.

    Raises MeshConfigError naming config.mesh.<field> for: a non-integer or non-positive size
    (other than -1), more than one -1, a product that does not equal num_devices, or a -1 whose
    remainder is not a whole number.
    """
    sizes = []
    for name in AXES:
        v = _field(mesh_cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise MeshConfigError(f"config.mesh.{name}={v!r}: expected an int (>= 1, or -1 = rest)")
        v = int(v)
        if v == 0 or v < -1:
            raise MeshConfigError(f"config.mesh.{name}={v}: expected a positive size or -1 (= rest)")
        sizes.append(v)
    rest = [n for n, v in zip(AXES, sizes) if v == -1]
    if len(rest) > 1:
        raise MeshConfigError(
            f"config.mesh: at most one axis may be -1, got -1 for {rest} ({dict(zip(AXES, sizes))})")
    known = math.prod(v for v in sizes if v != -1)
    if rest:
        if num_devices % known:
            raise MeshConfigError(
                f"config.mesh={dict(zip(AXES, sizes))}: {num_devices} devices are not divisible by "
                f"the fixed axes' product {known}, so config.mesh.{rest[0]}=-1 cannot be resolved")
        sizes[AXES.index(rest[0])] = num_devices // known
    elif known != num_devices:
        raise MeshConfigError(
            f"config.mesh={dict(zip(AXES, sizes))}: product {known} != {num_devices} devices; "
            f"make the sizes multiply to {num_devices} or set one of them to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes AXES over `devices` (default: all of jax.devices(), every process).

    On a multi-slice TPU system (devices with several `slice_index` values) the slices are laid
    along the 'data' axis (data-parallel over DCN), which must then be a multiple of the number
    of slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        if shape[0] % num_slices:
            raise MeshConfigError(
                f"config.mesh.data={shape[0]} must be a multiple of the {num_slices} TPU slices "
                "(slices are data-parallel over DCN)")
        ici = (shape[0] // num_slices,) + shape[1:]
        grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Topology-aware placement can refuse odd shapes; a plain reshape always works.
            grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
    """E.g. "Mesh(data=2, fsdp=2, tensor=2; 8 devices, 1 process, cpu)"."""
    sizes = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    procs = len({d.process_index for d in mesh.devices.flat})
    kind = mesh.devices.flat[0].platform
    return f"Mesh({sizes}; {mesh.devices.size} devices, {procs} process(es), {kind})"
