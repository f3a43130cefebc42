"""grain input pipelines: map -> one-hot area-resized image(s) -> batches.

``image_loader`` reads any random-access source of records ``{'map': uint8[H,W], 'label': int}``:
a ``WaferDataset`` (wrapped by ``WaferSource``) or a TFDS ArrayRecord data source from
``builders.data_source(...)``. Sampling: ``grain.python.IndexSampler`` with
``ShardByJaxProcess`` (each JAX process reads its own 1/P of the records, so ``batch_size`` is
the per-process batch), a seeded shuffle per epoch, ``num_epochs`` (None = forever). The
iterator of the returned DataLoader has ``get_state()`` / ``set_state()``: restoring a saved
state yields exactly the batches that followed it.

Class-balanced sampling (``balanced``): the epoch is a fixed, seeded draw with replacement of N
record ids with weight 1/n_c (``True`` / ``'full'``) or 1/sqrt(n_c) (``'sqrt'``; ``False`` /
``'none'`` = off, as in ``config.data.balanced_sampling``) per record of
class c (unlabeled records are left out); the sampler then shuffles that list every epoch.
"""
from __future__ import annotations

import os

import grain.python as gp
import numpy as np

from wamglm_jax.data.dataset import WaferDataset
from wamglm_jax.data.preprocess import area_resize_onehot, make_views


class WaferSource(gp.RandomAccessDataSource):
    """A WaferDataset as a grain data source of ``{'map', 'label', 'index'}`` records."""

    def __init__(self, ds: WaferDataset):
        self._maps, self._labels = ds.maps, ds.labels

    def __len__(self):
        return len(self._maps)

    def __getitem__(self, i):
        i = int(i)
        return {"map": self._maps[i], "label": np.int32(self._labels[i]), "index": np.int64(i)}

    def __repr__(self):
        return f"WaferSource(n={len(self._maps)})"


class _Remapped(gp.RandomAccessDataSource):
    """Source whose record k is ``base[ids[k]]`` with 'index' = ids[k], the record's position
    in ``base`` (ids = None: identity, to stamp positions on e.g. a TFDS source, whose own
    stored 'index' field is the row in the original file)."""

    def __init__(self, base, ids: np.ndarray | None = None):
        self._base = base
        self._ids = None if ids is None else np.asarray(ids, np.int64)

    def __len__(self):
        return len(self._base) if self._ids is None else len(self._ids)

    def __getitem__(self, k):
        i = int(k) if self._ids is None else int(self._ids[int(k)])
        rec = dict(self._base[i])
        rec["index"] = np.int64(i)
        return rec

    def __repr__(self):
        return f"_Remapped(n={len(self)}, base={self._base!r})"


def source_labels(source) -> np.ndarray:
    if isinstance(source, WaferSource):
        return np.asarray(source._labels)
    return np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)


def balanced_ids(labels: np.ndarray, mode, seed: int, num: int | None = None) -> np.ndarray:
    """Record ids drawn with replacement, weight 1/n_c (mode True/'full') or 1/sqrt(n_c)
    ('sqrt') per record of class c, so each present class gets an equal (or sqrt) share."""
    labels = np.asarray(labels)
    ok = labels >= 0
    if not ok.any():
        raise ValueError("balanced sampling: the dataset has no labelled records")
    _, inv, counts = np.unique(labels[ok], return_inverse=True, return_counts=True)
    if mode is True or mode == "full":
        w = 1.0 / counts[inv]
    elif mode == "sqrt":
        w = 1.0 / np.sqrt(counts[inv])
    else:
        raise ValueError(f"balanced={mode!r}: expected False, True/'full' or 'sqrt'")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xBA1]))
    cand = np.flatnonzero(ok)
    n = len(labels) if num is None else int(num)
    return cand[rng.choice(len(cand), size=n, replace=True, p=w / w.sum())]


def _balance_mode(b):
    """False/None/'none'/'false'/'off'/'' -> False; True/'true'/'full' -> 'full'; 'sqrt'."""
    if isinstance(b, str):
        k = b.strip().lower()
        if k in ("", "none", "false", "off", "0"):
            return False
        if k in ("true", "full", "balanced", "1"):
            return "full"
        if k == "sqrt":
            return "sqrt"
        raise ValueError(f"balanced={b!r}: expected 'none', 'full' or 'sqrt'")
    return "full" if b else False


def limit_blas_threads(n: int | None):
    """Caps numpy's BLAS thread pool of this process at ``n`` threads (None: leave it).

    The per-record resize is two tiny matmuls: multi-threaded OpenBLAS spinning against
    grain's reader threads and sibling workers made the pipeline 3x slower with 2 workers on 2
    cores (measured), and held a 16-core GPU host at ~12 steps/s with 6 or 12 workers (with the
    cap, 20-31 steps/s with 8 workers on the same H100)."""
    if n is None:
        return
    try:        # threadpoolctl comes with scikit-learn (requirements.txt)
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=int(n), user_api="blas")


class _BlasLimited:
    """Mixin for transforms: the first record a process maps caps that process's BLAS pool.

    grain's worker processes start fresh interpreters that do not inherit the parent's
    threadpool limit; a transform is pickled into each of them, so it carries the limit."""

    blas_threads: int | None = 1
    _limited_pid: int | None = None

    def _limit_once(self):
        pid = os.getpid()
        if self._limited_pid != pid:
            limit_blas_threads(self.blas_threads)
            self._limited_pid = pid


class ToImage(_BlasLimited, gp.MapTransform):
    """Eval transform: one image, no augmentation."""

    def __init__(self, image_size: int, num_views: int = 1, blas_threads: int | None = 1):
        self.size, self.num_views = int(image_size), int(num_views)
        self.blas_threads = blas_threads

    def map(self, rec):
        self._limit_once()
        img = area_resize_onehot(np.asarray(rec["map"]), self.size)
        out = {"label": np.int32(rec["label"]), "index": np.int64(rec.get("index", -1))}
        if self.num_views == 1:
            out["image"] = img
        else:
            out["views"] = np.repeat(img[None], self.num_views, 0)
        return out


class ToViews(_BlasLimited, gp.RandomMapTransform):
    """Train transform: random label-preserving views (rotations / flips)."""

    def __init__(self, image_size: int, num_views: int, blas_threads: int | None = 1):
        self.size, self.num_views = int(image_size), int(num_views)
        self.blas_threads = blas_threads

    def random_map(self, rec, rng: np.random.Generator):
        self._limit_once()
        img = area_resize_onehot(np.asarray(rec["map"]), self.size)
        views = make_views(img, self.num_views, rng)
        out = {"label": np.int32(rec["label"]), "index": np.int64(rec.get("index", -1))}
        if self.num_views == 1:
            out["image"] = views[0]
        else:
            out["views"] = views
        return out


def image_loader(dataset, *, image_size: int, batch_size: int, num_views: int = 1,
                 train: bool = False, seed: int = 0, num_epochs: int | None = None,
                 balanced=False, worker_count: int = 0, shard_options=None,
                 drop_remainder: bool | None = None,
                 blas_threads: int | None = 1) -> gp.DataLoader:
    """grain DataLoader of batches {'image' float32[B,S,S,3] | 'views' float32[B,V,S,S,3],
    'label' int32[B], 'index' int64[B]} (index = position of the record in ``dataset``, so
    ``dataset[index]`` / ``dataset.maps[index]`` is the map the image came from).

    dataset: WaferDataset or a random-access source of {'map', 'label'} records.
    train: shuffle every epoch and draw random views; eval keeps the order, no augmentation
        (with ``worker_count`` > 0 each worker batches records w, w+W, ...: batches come
        interleaved, and 'index' gives every record's position).
    num_epochs: None = repeat forever when training, 1 pass when not.
    shard_options: default ShardByJaxProcess(drop_remainder=train).
    blas_threads: caps numpy's BLAS thread pool at this size, in this process and in every
        worker process (see ``limit_blas_threads``); None leaves it.
    """
    if num_views not in (1, 3):
        raise ValueError(f"num_views={num_views}: expected 1 or 3")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size={batch_size}, image_size={image_size}: expected >= 1")
    limit_blas_threads(blas_threads)
    if worker_count:
        # grain reads its absl flags in the process that starts the workers; outside
        # absl.app.run (tools with argparse, notebooks, tests) nothing parsed them. Side
        # effect: absl's flags count as parsed from here on, with their default values (a
        # later app.run still parses its argv).
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    source = WaferSource(dataset) if isinstance(dataset, WaferDataset) else _Remapped(dataset)
    if len(source) == 0:
        raise ValueError("image_loader: the dataset is empty")
    balanced = _balance_mode(balanced)
    if balanced:
        source = _Remapped(source, balanced_ids(source_labels(source), balanced, seed))
    if num_epochs is None and not train:
        num_epochs = 1
    if drop_remainder is None:
        drop_remainder = train
    shard = shard_options or gp.ShardByJaxProcess(drop_remainder=train)
    sampler = gp.IndexSampler(num_records=len(source), shard_options=shard, shuffle=train,
                              num_epochs=num_epochs, seed=int(seed))
    op = (ToViews(image_size, num_views, blas_threads) if train
          else ToImage(image_size, num_views, blas_threads))
    return gp.DataLoader(data_source=source, sampler=sampler,
                         operations=[op, gp.Batch(batch_size, drop_remainder=drop_remainder)],
                         worker_count=worker_count)
