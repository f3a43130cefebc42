"""grain pipeline: shapes, area-resize content, determinism, resume, sharding, balancing."""
import grain.python as gp
import numpy as np
import pytest

from wamglm_jax.data import pipeline
from wamglm_jax.data.dataset import WaferDataset
from wamglm_jax.data.generator import generate
from wamglm_jax.data.pipeline import balanced_ids, image_loader
from wamglm_jax.data.preprocess import DIHEDRAL, area_resize_onehot, dihedral


@pytest.fixture(scope="module")
def ds():
    return generate(90, seed=3)


def test_eval_batches_are_area_resized_in_order(ds):
    dl = image_loader(ds, image_size=16, batch_size=32, train=False)
    batches = list(dl)
    assert [len(b["label"]) for b in batches] == [32, 32, 26]     # no drop for eval
    idx = np.concatenate([b["index"] for b in batches])
    assert idx.tolist() == list(range(90))
    b = batches[1]
    assert b["image"].shape == (32, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int64
    for j in (0, 5):
        i = int(b["index"][j])
        # independent one-hot + resize by explicit overlap loop is tested in test_data_core;
        # here: the batch holds the resize of exactly this record.
        np.testing.assert_allclose(b["image"][j], area_resize_onehot(ds.maps[i], 16), atol=1e-6)
        assert b["label"][j] == ds.labels[i]


def test_train_views_preserve_labels_and_content(ds):
    dl = image_loader(ds, image_size=16, batch_size=8, num_views=3, train=True, seed=1)
    b = next(iter(dl))
    assert b["views"].shape == (8, 3, 16, 16, 3)
    for j in range(8):
        i = int(b["index"][j])
        assert b["label"][j] == ds.labels[i]
        base = area_resize_onehot(ds.maps[i], 16)
        for v in b["views"][j]:
            assert any(np.allclose(v, dihedral(base, k, f), atol=1e-6) for k, f in DIHEDRAL)


def test_deterministic_shuffle_epochs_and_drop_remainder(ds):
    mk = lambda seed: image_loader(ds, image_size=8, batch_size=16, train=True, seed=seed,
                                   num_epochs=2)
    a = [b["index"] for b in mk(0)]
    b = [b["index"] for b in mk(0)]
    c = [b["index"] for b in mk(1)]
    assert all(len(x) == 16 for x in a) and len(a) == 180 // 16
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    flat = np.concatenate(a)
    assert sorted(flat[:90].tolist()) == list(range(90))     # epoch 1 is a permutation
    assert flat[:16].tolist() != list(range(16))


def test_resume_from_state_gives_same_batches(ds):
    dl = image_loader(ds, image_size=8, batch_size=8, num_views=3, train=True, seed=4)
    it = iter(dl)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    it2 = iter(image_loader(ds, image_size=8, batch_size=8, num_views=3, train=True, seed=4))
    it2.set_state(state)
    got = [next(it2) for _ in range(4)]
    for w, g in zip(want, got):
        assert np.array_equal(w["index"], g["index"])
        np.testing.assert_array_equal(w["views"], g["views"])


def test_sharding_partitions_records(ds):
    seen = []
    for k in range(3):
        dl = image_loader(ds, image_size=8, batch_size=10, train=False,
                          shard_options=gp.ShardOptions(shard_index=k, shard_count=3))
        seen.append(np.concatenate([b["index"] for b in dl]))
    assert all(len(s) == 30 for s in seen)
    assert sorted(np.concatenate(seen).tolist()) == list(range(90))


def test_balanced_sampling_frequencies():
    y = np.array([0] * 900 + [1] * 90 + [2] * 10)
    full = np.bincount(y[balanced_ids(y, True, 0, 30000)], minlength=3) / 30000
    np.testing.assert_allclose(full, [1 / 3] * 3, atol=0.02)
    sq = np.bincount(y[balanced_ids(y, "sqrt", 0, 30000)], minlength=3) / 30000
    want = np.sqrt([900, 90, 10]) / np.sqrt([900, 90, 10]).sum()
    np.testing.assert_allclose(sq, want, atol=0.02)
    maps = [np.ones((3, 3), np.uint8)] * len(y)
    d = WaferDataset(maps, y)
    dl = image_loader(d, image_size=4, batch_size=100, train=True, balanced=True, num_epochs=1)
    labs = np.concatenate([b["label"] for b in dl])
    assert len(labs) == 1000 and abs((labs == 2).mean() - 1 / 3) < 0.06
    with pytest.raises(ValueError, match="balanced="):
        balanced_ids(y, "weird", 0)
    with pytest.raises(ValueError, match="balanced='weird'"):
        image_loader(d, image_size=4, batch_size=10, balanced="weird")
    plain = image_loader(d, image_size=4, batch_size=100, train=True, balanced="none",
                         num_epochs=1)
    assert sorted(np.concatenate([b["index"] for b in plain]).tolist()) == list(range(1000))
    sq = image_loader(d, image_size=4, batch_size=100, train=True, balanced="sqrt", num_epochs=1)
    assert 0.02 < (np.concatenate([b["label"] for b in sq]) == 2).mean() < 0.15


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match="num_views"):
        image_loader(ds, image_size=8, batch_size=4, num_views=2)
    with pytest.raises(ValueError, match="empty"):
        image_loader(WaferDataset([], np.zeros(0)), image_size=8, batch_size=4)


def _max_blas_threads():
    from threadpoolctl import threadpool_info
    return max([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] or [0])


def _fresh_process_blas_threads():
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_max_blas_threads)


class _ProbeImage(pipeline.ToImage):
    """ToImage that also records the BLAS pool size of the process that mapped the record."""

    def map(self, rec):
        out = super().map(rec)
        out["blas_threads"] = np.int32(_max_blas_threads())
        return out


def test_grain_workers_of_image_loader_run_with_capped_blas(ds, monkeypatch):
    """Through grain's own worker processes (2 of them), every record is mapped with BLAS
    capped at one thread, though a fresh interpreter on this machine starts with more."""
    base = _fresh_process_blas_threads()
    if base <= 1:
        pytest.skip(f"this machine's BLAS already runs {base} thread(s)")
    monkeypatch.setattr(pipeline, "ToImage", _ProbeImage)
    batches = list(image_loader(ds, image_size=8, batch_size=16, worker_count=2))
    seen = np.concatenate([b["blas_threads"] for b in batches])
    assert len(seen) == len(ds.maps) and (seen == 1).all(), np.unique(seen)


def test_remapped_repr_without_ids(ds):
    """repr is what grain's iterator state records for the source: it must work unbalanced."""
    src = pipeline._Remapped(pipeline.WaferSource(ds))
    assert repr(src).startswith(f"_Remapped(n={len(ds.maps)}, base=WaferSource(")


def _blas_threads_in_fresh_process(transform, rec):
    """Runs in a spawned interpreter, as a grain worker is: maps one record with `transform`
    (None: nothing) and reports the largest BLAS thread pool threadpoolctl sees."""
    if transform is not None:
        if isinstance(transform, gp.RandomMapTransform):
            transform.random_map(rec, np.random.default_rng(0))
        else:
            transform.map(rec)
    return _max_blas_threads()


def test_transforms_cap_blas_threads_in_worker_processes(ds):
    """grain's workers are fresh processes: the parent's threadpool limit does not reach them,
    so the transforms themselves must cap BLAS (a 3x slowdown with 2 workers on 2 cores)."""
    import multiprocessing as mp
    from wamglm_jax.data.pipeline import ToImage, ToViews
    rec = {"map": ds.maps[0], "label": int(ds.labels[0]), "index": 0}
    with mp.get_context("spawn").Pool(1) as pool:
        base = pool.apply(_blas_threads_in_fresh_process, (None, rec))
        if base <= 1:
            pytest.skip(f"this machine's BLAS already runs {base} thread(s)")
        for t in (ToViews(16, 3), ToImage(16)):
            # A new process per transform: the pool's worker already has its limit set.
            with mp.get_context("spawn").Pool(1) as fresh:
                assert fresh.apply(_blas_threads_in_fresh_process, (t, rec)) == 1, type(t)
        assert pool.apply(_blas_threads_in_fresh_process, (ToViews(16, 3, None), rec)) == base
