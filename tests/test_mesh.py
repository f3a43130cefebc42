"""Mesh construction from config.mesh: -1 resolution, errors, Auto axes, set_mesh vs `with mesh`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from configs.common import SHARDING_RULES
from wamglm_jax.parallel import mesh as mesh_lib
from wamglm_jax.parallel import sharding


@pytest.mark.parametrize("cfg,expected", [
    (dict(data=-1, fsdp=1, tensor=1), (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=1), (2, 4, 1)),
    (dict(data=2, fsdp=2, tensor=-1), (2, 2, 2)),
    (dict(data=1, fsdp=4, tensor=2), (1, 4, 2)),
])
def test_resolve_rest(cfg, expected):
    assert mesh_lib.resolve_mesh_shape(cfg, 8) == expected
    m = mesh_lib.make_mesh(cfg)
    assert tuple(m.shape.values()) == expected
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert m.devices.size == 8
    assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in jax.devices())


def test_config_dict_and_devices_subset():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=2))
    m = mesh_lib.make_mesh(cfg, devices=jax.devices()[:4])
    assert dict(m.shape) == dict(data=2, fsdp=1, tensor=2)
    assert {d.id for d in m.devices.flat} == {d.id for d in jax.devices()[:4]}


@pytest.mark.parametrize("cfg,match", [
    (dict(data=-1, fsdp=-1, tensor=1), r"at most one axis may be -1"),
    (dict(data=2, fsdp=2, tensor=1), r"product 4 != 8 devices"),
    (dict(data=0, fsdp=-1, tensor=1), r"config.mesh.data=0"),
    (dict(data=2, fsdp=1, tensor=-3), r"config.mesh.tensor=-3"),
    (dict(data=-1, fsdp=3, tensor=1), r"not divisible by the fixed axes' product 3"),
    (dict(data=2.0, fsdp=-1, tensor=1), r"config.mesh.data=2.0: expected an int"),
    (dict(data=-1, fsdp=1), r"missing field 'tensor'"),
])
def test_errors(cfg, match):
    with pytest.raises(mesh_lib.MeshConfigError, match=match):
        mesh_lib.make_mesh(cfg)


def test_axis_types_are_auto():
    m = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert tuple(m.axis_types) == (AxisType.Auto,) * 3
    # jax.make_mesh without axis_types would be Explicit: the reason we pass them.
    assert tuple(jax.make_mesh((8,), ("x",)).axis_types) == (AxisType.Explicit,)


class _Constrained(nn.Module):
    @nn.compact
    def __call__(self, x):              # float[B, D]
        x = nn.with_logical_constraint(x, ("batch", "act_embed"))
        h = nn.Dense(16, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        return nn.with_logical_constraint(h, ("batch", "mlp"))


def _constraints(text):
    return [l for l in text.splitlines()
            if "sdy.sharding_constraint" in l or 'custom_call_target="Sharding"' in l]


def test_set_mesh_lowers_constraints_but_with_mesh_does_not():
    m = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
    model = _Constrained()
    x = jnp.ones((8, 8))
    variables, _ = sharding.init_sharded(model, jax.random.key(0), x, mesh=m,
                                         rules=SHARDING_RULES)
    fn = jax.jit(lambda v, x: model.apply(v, x))
    with nn.logical_axis_rules(SHARDING_RULES):
        with pytest.warns(DeprecationWarning), m:
            old = fn.lower(variables, x).as_text()
        with jax.set_mesh(m):
            new = fn.lower(variables, x).as_text()
    assert _constraints(old) == []          # silently nothing under `with mesh:`
    got = _constraints(new)
    assert len(got) == 2
    assert '[{"data", "fsdp"}, {}]' in got[0]
    assert '[{"data", "fsdp"}, {"tensor"}]' in got[1]
    # and the constrained program computes the same as numpy
    with sharding.activate(m, SHARDING_RULES):
        out = fn(variables, x)
    k = np.asarray(variables["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(np.asarray(out), np.ones((8, 8)) @ k, rtol=1e-6, atol=1e-6)
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")


def test_describe():
    m = mesh_lib.make_mesh(dict(data=-1, fsdp=2, tensor=1))
    assert mesh_lib.describe(m) == "Mesh(data=4, fsdp=2, tensor=1; 8 devices, 1 process(es), cpu)"
