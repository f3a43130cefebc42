"""Stage-2 training data: the tokenizer (trained once per run directory), the per-class cap
on training maps, caption-like dialogues for the projector-alignment phase, and the resumable
iterator of length-bucketed dialogue batches with their wafer-map images."""
from __future__ import annotations

import os

import jax
import numpy as np

from wamglm_jax.data.preprocess import area_resize_onehot
from wamglm_jax.parallel.sharding import process_rows
from wamglm_jax.qa import encode as qenc
from wamglm_jax.qa.tokenizer import build_tokenizer, load_tokenizer


def get_tokenizer(s2, workdir, train_items):
    """config.stage2.tokenizer_dir, else workdir/tokenizer (trained there if absent)."""
    if s2.tokenizer_dir:
        return load_tokenizer(s2.tokenizer_dir, s2.chat_template or None), s2.tokenizer_dir
    path = os.path.join(os.fspath(workdir), "tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return load_tokenizer(path), path
    if jax.process_index() == 0:
        tok = build_tokenizer(train_items, path, vocab_size=int(s2.vocab_size))
    if jax.process_count() > 1:   # multi-host: the others load what process 0 wrote
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("stage2 tokenizer")
        if jax.process_index() != 0:
            tok = load_tokenizer(path)
    return tok, path


def capped_indices(labels, cap: int, seed: int, scaling: str = "flat"):
    """Training maps per class, sorted indices (None = all maps when cap <= 0), seeded.
    'flat': at most `cap` random maps of each class; 'sqrt': the largest class gets `cap`,
    class c round(cap * sqrt(n_c / n_max)) (at least 1, at most n_c), so the classes keep the
    square-root prior stage 1's balanced sampling trains the classifier with."""
    if scaling not in ("flat", "sqrt"):
        raise ValueError(f"config.stage2.class_scaling={scaling!r}: expected 'flat' or 'sqrt'")
    if cap <= 0:
        return None
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    out = []
    for c, n in zip(classes, counts):
        k = cap if scaling == "flat" else max(1, int(round(cap * np.sqrt(n / counts.max()))))
        out.extend(rng.permutation(np.flatnonzero(labels == c))[:k].tolist())
    return sorted(out)


def describe_items(items):
    """Caption-like dialogues for the projector-alignment phase: one question, the answers of
    the item's type/location/extent turns joined as the description; count drills
    (qa/drills.py) are left out: their counts are not the map's."""
    out = []
    for it in items:
        if it.get("drill"):
            continue
        parts = [it["messages"][k["turn"]]["content"] for k in it["answer_key"]
                 if k["kind"] in ("defect_type", "location", "count", "yield", "area")]
        if not parts:
            parts = [it["messages"][it["answer_key"][0]["turn"]]["content"]]
        msgs = [{"role": "user", "content": "<image>\nDescribe this wafer map."},
                {"role": "assistant", "content": " ".join(parts)}]
        out.append(dict(it, id=f"{it['id']}-describe", messages=msgs))
    return out


class DialogueBatches:
    """Endless, resumable iterator of bucketed batches (epoch e shuffled with seed + e).

    `batch_size` is the global batch: every process plans the same batches (same seed, so the
    same bucket length at every step) and yields its own rows of each, process_index's
    batch_size / process_count of them; one process yields the whole batch.

    Batches: image float32[B,S,S,3], tokens/loss_mask/attention_mask int32[B,T], valid int32[B]
    (rows with valid 0 fill the last batch of a bucket and carry no loss); B = the local rows."""

    def __init__(self, encoded, maps, *, image_size, batch_size, pad_id, boundaries, seed,
                 process_index: int = 0, process_count: int = 1):
        self.encoded, self.maps = encoded, maps
        self.s, self.b, self.pad, self.bounds, self.seed = (image_size, batch_size, pad_id,
                                                            boundaries, seed)
        self.rows = process_rows(batch_size, process_index, process_count)
        self.epoch, self.pos = 0, 0
        self._batches = None

    def _epoch(self):
        if self._batches is None:
            self._batches = list(qenc.bucketed_batches(
                self.encoded, self.b, self.pad, self.bounds, seed=self.seed + self.epoch))

    def __iter__(self):
        return self

    def __next__(self):
        self._epoch()
        if self.pos >= len(self._batches):
            self.epoch, self.pos, self._batches = self.epoch + 1, 0, None
            self._epoch()
        batch = {k: v[self.rows] for k, v in self._batches[self.pos].items()}
        self.pos += 1
        batch["image"] = images_for(self.maps, batch["image_index"], self.s)
        return batch

    def get_state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state):
        if set(state) != {"epoch", "pos"}:
            raise ValueError(f"data iterator state {sorted(state)}: expected 'epoch' and 'pos' "
                             "(was this checkpoint written with config.stage2.product_rehearsal."
                             "weight > 0? resume it with the same weight)")
        self.epoch, self.pos, self._batches = int(state["epoch"]), int(state["pos"]), None


def images_for(maps, index, size):
    """float32[B,S,S,3] for map indices (index < 0: an empty row -> zeros)."""
    out = np.zeros((len(index), size, size, 3), np.float32)
    for r, i in enumerate(np.asarray(index)):
        if i >= 0:
            out[r] = area_resize_onehot(maps[int(i)], size)
    return out
