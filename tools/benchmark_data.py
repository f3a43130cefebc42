"""Throughput of the data layer: generator maps/s and grain pipeline examples/s.

  python -m tools.benchmark_data [--num=100000] [--image_size=32] [--batches=50]
      [--real=PATH (any file load_dataset reads)] [--workers=0,2] [--json=PATH]
Prints a table; --json writes the same rows. Single process, worker_count=0 (the default),
except the rows of `--workers` (the 3-view train pipeline on --real, else the synthetic maps,
with that many grain worker processes, as config.stage1.loader_workers sets).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from wamglm_jax.data.generator import generate
from wamglm_jax.data.pipeline import image_loader


def time_generator(num, label_space, balance):
    t = time.perf_counter()
    ds = generate(num, seed=0, label_space=label_space, balance=balance)
    dt = time.perf_counter() - t
    return ds, dict(what=f"generate {label_space} {balance}", n=num, seconds=round(dt, 2),
                    rate=round(num / dt, 1), unit="maps/s")


def time_loader(name, source, image_size, batch_size, num_views, batches, worker_count=None):
    """worker_count None: in-process, unlabelled row; an int: that many workers, labelled."""
    dl = image_loader(source, image_size=image_size, batch_size=batch_size,
                      num_views=num_views, train=True, seed=0, worker_count=worker_count or 0)
    it = iter(dl)
    next(it)                                            # warm-up (first batch)
    t = time.perf_counter()
    n = sum(len(next(it)["label"]) for _ in range(batches))
    dt = time.perf_counter() - t
    workers = "" if worker_count is None else f" workers={worker_count}"
    return dict(what=f"pipeline {name} S={image_size} views={num_views}{workers}", n=n,
                seconds=round(dt, 2), rate=round(n / dt, 1), unit="examples/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num", type=int, default=100_000)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--tfds_num", type=int, default=4000, help="maps in the ArrayRecord test")
    p.add_argument("--real", default=None)
    p.add_argument("--workers", default="",
                   help="comma-separated grain worker counts to time, e.g. 0,2")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        workers = [int(x) for x in a.workers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--workers={a.workers!r}: expected comma-separated integers, e.g. 0,2")
    if any(w < 0 for w in workers):
        p.error(f"--workers: {min(workers)} is negative; expected counts >= 0")
    rows = []
    ds, r = time_generator(a.num, "wm811k", "balanced")
    rows.append(r)
    rows.append(time_generator(max(a.num // 5, 1), "wm811k", "wm811k")[1])
    rows.append(time_generator(max(a.num // 5, 1), "mixedwm38", "balanced")[1])
    for v in (1, 3):
        rows.append(time_loader("synthetic in-memory", ds, a.image_size, a.batch_size, v,
                                a.batches))
    from wamglm_jax.data import builders
    with tempfile.TemporaryDirectory() as d:
        builders.prepare("synthetic_wafers", d, num_train=a.tfds_num, num_val=0, num_test=0)
        src = builders.data_source(d, "train")
        rows.append(time_loader("TFDS ArrayRecord", src, a.image_size, a.batch_size, 3,
                                a.batches))
    name, src = "synthetic in-memory", ds
    if a.real:
        from wamglm_jax.data.dataset import load_dataset
        name, src = f"real {os.path.basename(a.real)}", load_dataset(a.real)
        rows.append(time_loader(name, src, a.image_size, a.batch_size, 3, a.batches))
    for w in workers:
        rows.append(time_loader(name, src, a.image_size, a.batch_size, 3, a.batches, w))
    w = max(len(r["what"]) for r in rows)
    print(f"{'what':<{w}}  {'n':>8}  {'seconds':>8}  {'rate':>10}  unit")
    for r in rows:
        print(f"{r['what']:<{w}}  {r['n']:>8}  {r['seconds']:>8}  {r['rate']:>10}  {r['unit']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows, cpu_count=os.cpu_count(),
                           loadavg=os.getloadavg()), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
