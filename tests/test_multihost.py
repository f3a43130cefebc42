"""Real multi-process JAX on one machine: 2 processes x 2 CPU devices (gloo) = 4 devices.

Each process feeds its own rows; `sharding.global_batch` assembles the global array with
jax.make_array_from_process_local_data; reductions over it (jit and shard_map psum) must equal
numpy on the full batch. Also runs launch/slurm_gpu.sbatch (stub srun) = main.py as 2
processes, and checks the TPU pod script's gcloud commands (dry run).
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
    addr, pid, result_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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
    with open(result_path, "w") as f:   # a file, not stdout: C++ logging can interleave there
        json.dump(dict(
            pid=pid, main=multihost.is_main_process(), shape=list(g["x"].shape),
            local_rows=sorted(int(s.index[0].start or 0) for s in g["x"].addressable_shards),
            col_sum=np.asarray(col_sum).tolist(), mean=float(mean),
            psum=np.asarray(psum).tolist(), ysum=int(ysum)), f)
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
def test_two_process_global_batch(tmp_path):
    addr = f"127.0.0.1:{portpicker.pick_unused_port()}"
    paths = [tmp_path / f"result.{i}.json" for i in range(2)]
    _run_all([[sys.executable, "-c", WORKER, addr, str(i), str(paths[i])] for i in range(2)],
             _env())
    results = [json.loads(p.read_text()) for p in paths]
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
def test_slurm_script_runs_main_on_two_processes(tmp_path):
    """launch/slurm_gpu.sbatch with stub `srun` (2 local tasks) and `scontrol`: the script's
    main.py line (--coordinator_address/--num_processes/--process_id) forms one 4-device run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"                                   # drop srun options, run 2 tasks
        "while [[ $1 == --* ]]; do shift; done\n"
        "pids=()\n"
        "for i in 0 1; do SLURM_PROCID=$i \"$@\" > \"$SRUN_LOG.$i\" 2>&1 & pids+=($!); done\n"
        "rc=0; for p in ${pids[@]}; do wait $p || rc=1; done; exit $rc\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="node1",
               SLURM_NTASKS="2", PORT=str(portpicker.pick_unused_port()), PYTHON=sys.executable,
               SRUN_LOG=str(tmp_path / "task"), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               JAX_NUM_CPU_DEVICES="2", SLURM_SUBMIT_DIR=ROOT)
    workdir = tmp_path / "run"
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"),
                          "configs/presets.py:tiny", str(workdir), "--config.mesh.fsdp=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    logs = [(tmp_path / f"task.{i}").read_text() for i in range(2)]
    assert out.returncode == 0, out.stderr[-2000:] + "\n".join(l[-2000:] for l in logs)
    assert "4 devices, 2 process(es)" in logs[0]
    summary = json.load(open(workdir / "shapes.json"))
    assert summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert json.load(open(workdir / "config.json"))["mesh"]["fsdp"] == 2
    assert "total:" in logs[0] and "total:" not in logs[1]     # printing on process 0 only


def test_tpu_pod_script_commands():
    env = dict(os.environ, DRY_RUN="1", PROJECT="proj")
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "mytpu", "zone-a",
                          "configs/presets.py:pod7b", "gs://b/run", "--config.mesh.fsdp=-1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("gcloud")]
    assert len(lines) == 4 and all("--worker=all" in l and "--project=proj" in l for l in lines)
    assert "WAMGLM_DISTRIBUTED=auto" in lines[-1]
    assert "python\\ -m\\ wamglm_jax.main\\ --config=configs/presets.py:pod7b" in lines[-1]
    assert "--workdir=gs://b/run\\ --config.mesh.fsdp=-1" in lines[-1]
    assert subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh")],
                          capture_output=True, text=True).returncode == 2     # usage


def test_maybe_initialize_arguments(monkeypatch):
    from wamglm_jax.parallel import multihost
    with pytest.raises(ValueError, match=r"--num_processes=2 needs --coordinator_address"):
        multihost.maybe_initialize(None, 2, 0)
    with pytest.raises(ValueError, match=r"--process_id=2 is outside \[0, 2\)"):
        multihost.maybe_initialize("127.0.0.1:1234", 2, 2)
    monkeypatch.delenv("WAMGLM_DISTRIBUTED", raising=False)
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES",
              "CLOUD_TPU_TASK_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    assert multihost.maybe_initialize(None, None, None) is False    # single host: no init
    assert multihost.maybe_initialize(None, 1, 0) is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert multihost.is_multihost_env()
    monkeypatch.setenv("WAMGLM_DISTRIBUTED", "off")
    assert not multihost.is_multihost_env()
    monkeypatch.setenv("WAMGLM_DISTRIBUTED", "")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not multihost.is_multihost_env()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1w0,t1w1")
    assert multihost.is_multihost_env()
