"""Real multi-process JAX on one machine: 2 processes x 2 CPU devices (gloo) = 4 devices.

Each process feeds its own rows; `sharding.global_batch` assembles the global array with
jax.make_array_from_process_local_data; reductions over it (jit and shard_map psum) must equal
numpy on the full batch. Also runs `python -m wamglm_jax.main` as 2 processes.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 180

WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    from jax.sharding import PartitionSpec as P
    from wamglm_jax.parallel import mesh as mesh_lib, multihost, sharding
    addr, pid = sys.argv[1], int(sys.argv[2])
    assert multihost.maybe_initialize(addr, 2, pid)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    m = mesh_lib.make_mesh(dict(data=-1, fsdp=2, tensor=1))
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5      # the global batch
    local = full[4 * pid: 4 * pid + 4]                                   # this process's rows
    g = sharding.global_batch({"x": local, "y": local[:, 0].astype(np.int32)}, m)
    rep = sharding.replicated(m)
    col_sum, mean = jax.jit(lambda a: (a.sum(0), a.mean()), out_shardings=rep)(g["x"])
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a.sum(0), ("data", "fsdp")), mesh=m,
                                 in_specs=P(("data", "fsdp")), out_specs=P()))(g["x"])
    ysum = jax.jit(lambda y: y.sum(), out_shardings=rep)(g["y"])
    multihost.sync("test_done")
    print("RESULT " + json.dumps(dict(
        pid=pid, main=multihost.is_main_process(), shape=list(g["x"].shape),
        local_rows=sorted(int(s.index[0].start or 0) for s in g["x"].addressable_shards),
        col_sum=np.asarray(col_sum).tolist(), mean=float(mean),
        psum=np.asarray(psum).tolist(), ysum=int(ysum))))
""")


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)      # conftest's 8-device flag; each process uses 2 devices
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_all(cmds, env):
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"multi-process run exceeded {TIMEOUT}s: {cmds[0]}")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
def test_two_process_global_batch():
    addr = f"127.0.0.1:{portpicker.pick_unused_port()}"
    outs = _run_all([[sys.executable, "-c", WORKER, addr, str(i)] for i in range(2)], _env())
    results = [json.loads(next(l for l in o.splitlines() if l.startswith("RESULT "))[7:])
               for o in outs]
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5
    for pid, r in enumerate(results):
        assert r["pid"] == pid and r["main"] == (pid == 0)
        assert r["shape"] == [8, 3]
        # each process holds exactly its own 4 rows (2 devices x 2 rows)
        assert r["local_rows"] == [4 * pid, 4 * pid + 2]
        np.testing.assert_allclose(r["col_sum"], full.sum(0), rtol=1e-6)
        np.testing.assert_allclose(r["psum"], full.sum(0), rtol=1e-6)
        np.testing.assert_allclose(r["mean"], full.mean(), rtol=1e-6)
        assert r["ysum"] == int(full[:, 0].astype(np.int32).sum())


@pytest.mark.slow
def test_main_two_processes(tmp_path):
    """`python -m wamglm_jax.main` with --coordinator_address/--num_processes/--process_id."""
    addr = f"127.0.0.1:{portpicker.pick_unused_port()}"
    env = _env()
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env["JAX_NUM_CPU_DEVICES"] = "2"
    cmds = [[sys.executable, "-m", "wamglm_jax.main", "--config=configs/presets.py:tiny",
             f"--workdir={tmp_path}", "--config.mesh.fsdp=2", f"--coordinator_address={addr}",
             "--num_processes=2", f"--process_id={i}"] for i in range(2)]
    outs = _run_all(cmds, env)
    assert "4 devices, 2 process(es)" in outs[0]
    summary = json.load(open(tmp_path / "shapes.json"))
    assert summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert json.load(open(tmp_path / "config.json"))["mesh"]["fsdp"] == 2
    assert "total:" in outs[0] and "total:" not in outs[1]     # printing on process 0 only
