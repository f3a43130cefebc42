"""Builds a wafer-map dataset directory (TFDS ArrayRecord) that load_dataset / grain read.

  python -m tools.make_dataset --source=synthetic --output=DIR --num=20000 --seed=0
  python -m tools.make_dataset --source=wm811k --input=LSWMD.pkl --output=DIR --trust_pickle
  python -m tools.make_dataset --source=mixedwm38 --input=Wafer_Map_Datasets.npz --output=DIR
  python -m tools.make_dataset --source={npz,npy,png,csv} --input=FILE_OR_DIR --output=DIR

--input for npz/npy/png/csv is a file or a directory of such files; PNG/CSV/NPY files in
sub-directories named after a class (``DIR/Center/a.png``) get that label. Files without a
split go to 'train' unless --val_fraction splits off a stratified, seeded 'val'.
The LAST line printed is one JSON object: {"counts": {class: n over all splits},
"splits": {split: {class: n}}, "duplicates_across_splits": k, "output": DIR,
"warnings": [reader warnings, e.g. the counted MixedWM38 value-3 mapping]}. Byte-identical
maps found in more than one split are reported as a warning with counts (leakage).
An existing non-empty --output is an error unless --overwrite; with --overwrite the new
dataset is built beside it and swapped in only once complete.
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

SOURCES = ("synthetic", "wm811k", "mixedwm38", "npz", "npy", "png", "csv")


def _read_user_files(src: str, path: str, label_space: str):
    from wamglm_jax.data import labels as L
    from wamglm_jax.data.dataset import DatasetFormatError, concat, load_dataset
    if not os.path.isdir(path):
        return load_dataset(path, label_space=label_space)
    files = sorted(glob.glob(os.path.join(path, "**", f"*.{src}"), recursive=True))
    if not files:
        raise DatasetFormatError(f"{path}: no *.{src} files in this directory")
    parts = []
    for f in files:
        ds = load_dataset(f, label_space=label_space)
        cls = os.path.basename(os.path.dirname(f))
        if os.path.dirname(f) != path.rstrip("/") and (ds.labels < 0).all():
            try:
                ds.labels[:] = L.wm811k_id(cls, f)
            except L.UnknownLabelError:
                pass
        parts.append(ds)
    return concat(parts, source=path)


def _val_split(ds, frac: float, seed: int):
    rng = np.random.default_rng(seed)
    split = np.full(len(ds), "train", dtype=object)
    for c in np.unique(ds.labels):
        idx = rng.permutation(np.flatnonzero(ds.labels == c))
        split[idx[: int(round(frac * len(idx)))]] = "val"
    ds.split = split.astype(str)
    return ds


def duplicates_across_splits(ds) -> tuple[int, dict]:
    """Maps whose bytes (and shape) occur in more than one split: (count, {pair: count})."""
    if ds.split is None:
        return 0, {}
    where = collections.defaultdict(set)
    keys = []
    for m, s in zip(ds.maps, ds.split):
        k = hashlib.blake2b(m.tobytes() + np.array(m.shape, np.int32).tobytes(),
                            digest_size=16).digest()
        where[k].add(str(s))
        keys.append(k)
    n, pairs = 0, collections.Counter()
    for k in keys:
        if len(where[k]) > 1:
            n += 1
    for k, ss in where.items():
        if len(ss) > 1:
            pairs["/".join(sorted(ss))] += 1
    return n, dict(pairs)


def build(a) -> dict:
    from wamglm_jax.data import builders
    from wamglm_jax.data.dataset import load_dataset
    out = os.path.abspath(a.output)
    if os.path.isdir(out) and os.listdir(out) and not a.overwrite:
        raise FileExistsError(f"{out}: output directory exists and is not empty; pass "
                              "--overwrite to replace it (nothing was written)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out}: exists and is not a directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".make_dataset-", dir=parent)
    try:
        if a.source == "synthetic":
            kw = dict(num_train=a.num, num_val=a.num_val if a.num_val >= 0 else a.num // 10,
                      num_test=a.num_test if a.num_test >= 0 else a.num // 10, seed=a.seed,
                      label_space=a.label_space, balance=a.balance)
            builders.prepare("synthetic_wafers", tmp, **kw)
        elif a.source in ("wm811k", "mixedwm38"):
            if not a.input:
                raise ValueError(f"--source={a.source} needs --input")
            kw = dict(trust_pickle=a.trust_pickle, include_unlabeled=a.include_unlabeled) \
                if a.source == "wm811k" else dict(value3=a.value3)
            if os.path.isdir(a.input):
                builders.prepare(a.source, tmp, manual_dir=a.input, **kw)
            else:
                from wamglm_jax.data.readers import require_file
                builders.prepare(a.source, tmp, path=require_file(a.input), **kw)
        else:
            if not a.input:
                raise ValueError(f"--source={a.source} needs --input")
            ds = _read_user_files(a.source, a.input, a.label_space)
            if ds.split is None and a.val_fraction > 0:
                ds = _val_split(ds, a.val_fraction, a.seed)
            builders.prepare("wafer_files", tmp, dataset=ds)
        with open(os.path.join(tmp, builders.SUMMARY)) as f:
            summary = json.load(f)
        summary["source"], summary["input"] = a.source, a.input
        with open(os.path.join(tmp, builders.SUMMARY), "w") as f:
            json.dump(summary, f, indent=1)
        ds = load_dataset(tmp)
        if os.path.exists(out):
            old = out + ".old-" + os.path.basename(tmp)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    names = list(ds.class_names) + (["unlabeled"] if (ds.labels < 0).any() else [])
    total = ds.class_counts()
    splits = {s: ds.select(s).class_counts() for s in ds.splits()}
    ndup, pairs = duplicates_across_splits(ds)
    for s, c in splits.items():
        print(f"{s}: {sum(c.values())} maps", file=sys.stderr)
    if ndup:
        print(f"WARNING: {ndup} maps are byte-identical to a map in another split "
              f"(distinct maps shared per split pair: {pairs}); train/val leakage",
              file=sys.stderr)
    return {"counts": {n: total.get(n, 0) for n in names},
            "splits": {s: {n: c.get(n, 0) for n in names} for s, c in splits.items()},
            "duplicates_across_splits": ndup, "output": out}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--input", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow unpickling LSWMD.pkl (pickle runs code; trusted files only)")
    p.add_argument("--include_unlabeled", action="store_true", help="wm811k: keep the "
                   "unlabeled rows as split 'unlabeled'")
    p.add_argument("--value3", default="fail", choices=("fail", "error"),
                   help="MixedWM38 maps holding value 3: map to 2 (counted warning) or fail")
    p.add_argument("--num", type=int, default=10000, help="synthetic: train maps")
    p.add_argument("--num_val", type=int, default=-1, help="synthetic: val maps (num/10)")
    p.add_argument("--num_test", type=int, default=-1, help="synthetic: test maps (num/10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label_space", default="wm811k", choices=("wm811k", "mixedwm38"))
    p.add_argument("--balance", default="balanced", help="synthetic: balanced | wm811k")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="user files without a split: stratified fraction put in 'val'")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = build(a)
    except (FileExistsError, FileNotFoundError, ValueError, PermissionError) as e:
        print(f"make_dataset: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    msgs = list(dict.fromkeys(str(w.message) for w in caught
                              if issubclass(w.category, UserWarning)))
    for m in msgs:
        print(f"WARNING: {m}", file=sys.stderr)
    result["warnings"] = msgs
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
