"""Throughput of the data layer: generator maps/s and grain pipeline examples/s.

  python -m tools.benchmark_data [--num=100000] [--image_size=32] [--batches=50]
      [--real=PATH (any file load_dataset reads)] [--json=PATH]
Prints a table; --json writes the same rows. Single process, worker_count=0 (the default).
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


def time_loader(name, source, image_size, batch_size, num_views, batches):
    dl = image_loader(source, image_size=image_size, batch_size=batch_size,
                      num_views=num_views, train=True, seed=0)
    it = iter(dl)
    next(it)                                            # warm-up (first batch)
    t = time.perf_counter()
    n = sum(len(next(it)["label"]) for _ in range(batches))
    dt = time.perf_counter() - t
    return dict(what=f"pipeline {name} S={image_size} views={num_views}", n=n,
                seconds=round(dt, 2), rate=round(n / dt, 1), unit="examples/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num", type=int, default=100_000)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--tfds_num", type=int, default=4000, help="maps in the ArrayRecord test")
    p.add_argument("--real", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
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
    if a.real:
        from wamglm_jax.data.dataset import load_dataset
        real = load_dataset(a.real)
        rows.append(time_loader(f"real {os.path.basename(a.real)}", real, a.image_size,
                                a.batch_size, 3, a.batches))
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
