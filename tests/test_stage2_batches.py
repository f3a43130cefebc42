"""train/stage2_data.DialogueBatches: one epoch holds every dialogue once, bucketed; processes
split each global batch (no duplicated rows); resume continues the same stream."""
import json

import numpy as np
import pytest

from wamglm_jax.data.generator import generate
from wamglm_jax.train.stage2_data import DialogueBatches

BOUNDS = (8, 16, 32)


def _encoded(n=23, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(3, 30))
        toks = np.full(t, 1000 + i, np.int32)            # the row's id, readable from any token
        out.append(dict(tokens=toks, loss_mask=np.ones(t, np.int32),
                        attention_mask=np.ones(t, np.int32), image_index=i % 5))
    return out


def _make(encoded, maps, **kw):
    return DialogueBatches(encoded, maps, image_size=16, batch_size=4, pad_id=0,
                           boundaries=BOUNDS, seed=3, **kw)


@pytest.fixture(scope="module")
def maps():
    return generate(5, seed=1).maps


def test_one_epoch_holds_every_dialogue_once_in_its_bucket(maps):
    enc = _encoded()
    it = _make(enc, maps)
    ids = []
    while it.epoch == 0:
        b = next(it)
        if it.epoch:
            break
        for row, valid, idx in zip(b["tokens"], b["valid"], b["image_index"]):
            if valid:
                i = int(row[0]) - 1000
                ids.append(i)
                length = len(enc[i]["tokens"])
                assert b["tokens"].shape[1] == min(x for x in BOUNDS if x >= length)
                assert (row[:length] == 1000 + i).all() and (row[length:] == 0).all()
                assert idx == i % 5
        assert b["image"].shape == (4, 16, 16, 3)
    assert sorted(ids) == list(range(len(enc)))


def test_two_processes_split_each_global_batch(maps):
    enc = _encoded()
    one = _make(enc, maps)
    two = [_make(enc, maps, process_index=p, process_count=2) for p in range(2)]
    for _ in range(15):                 # past the end of the first epoch
        whole, parts = next(one), [next(t) for t in two]
        assert parts[0]["tokens"].shape == parts[1]["tokens"].shape     # same bucket, same step
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        mine = [set(p["tokens"][p["valid"] > 0, 0].tolist()) for p in parts]
        assert not mine[0] & mine[1]    # no row twice in a global batch
    with pytest.raises(ValueError, match="batch size 4 is not a multiple of the 3 processes"):
        _make(enc, maps, process_index=0, process_count=3)


def test_resume_continues_the_same_stream(maps):
    enc = _encoded()
    it = _make(enc, maps)
    for _ in range(9):
        next(it)
    resumed = _make(enc, maps)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    for _ in range(6):
        a, b = next(it), next(resumed)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
