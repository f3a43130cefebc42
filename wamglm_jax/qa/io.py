"""Writing and reading WaferMapVMQA: JSONL items + ragged maps npz, and a TFDS ArrayRecord
dataset that grain reads (`load_data_source`).

Layout of `write_vmqa(out_dir, splits)` (splits = {name: (items, dataset)}):
  {name}.jsonl          one item per line (see qa/dialogues.py; `images` = ["{name}_maps.npz#i"])
  {name}_maps.npz       ragged maps of the dataset: maps_flat uint8, offsets int64[N],
                        shapes int32[N,2], labels int32[N], lot str[N] ("" = none),
                        wafer_index int32[N] (-1 = none), label_space str
                        (the data layer's ragged layout, so load_dataset reads it too)
  tfds/wafer_map_vmqa/1.0.0/   ArrayRecord records: id, map uint8[H,W], messages (JSON),
                        answer_key (JSON), plan (JSON), class, heldout, image_index
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import numpy as np


def write_jsonl(items: Sequence[dict], path: str) -> None:
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """Items of a JSONL file; a malformed line is a ValueError naming the file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict) or "messages" not in item:
                raise ValueError(f"{path}:{n}: expected a dialogue item (a JSON object with "
                                 f"'messages'), got {type(item).__name__}")
            out.append(item)
    return out


def save_maps(dataset, path: str) -> None:
    maps = [np.asarray(m, np.uint8) for m in dataset.maps]
    shapes = np.array([m.shape for m in maps], np.int32).reshape(-1, 2)
    sizes = shapes[:, 0].astype(np.int64) * shapes[:, 1]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    meta = dataset.meta or [{} for _ in maps]
    np.savez_compressed(
        path, maps_flat=np.concatenate([m.reshape(-1) for m in maps]) if maps else
        np.zeros(0, np.uint8), offsets=offsets, shapes=shapes,
        labels=np.asarray(dataset.labels, np.int32),
        lot=np.array(["" if (md or {}).get("lot") is None else str(md["lot"]) for md in meta]),
        wafer_index=np.array([-1 if (md or {}).get("wafer_index") is None else
                              int(md["wafer_index"]) for md in meta], np.int32),
        label_space=np.array(dataset.label_space))


def load_maps(path: str):
    """Reads a maps npz written by save_maps back into a WaferDataset."""
    from wamglm_jax.data.dataset import WaferDataset

    with np.load(path, allow_pickle=False) as d:
        need = ("maps_flat", "offsets", "shapes", "labels", "lot", "wafer_index", "label_space")
        missing = [k for k in need if k not in d.files]
        if missing:
            raise ValueError(f"{path}: not a WaferMapVMQA maps file (written by save_maps): "
                             f"missing arrays {missing}")
        flat, off, shp = d["maps_flat"], d["offsets"], d["shapes"]
        maps = [flat[o:o + h * w].reshape(h, w) for o, (h, w) in zip(off, shp)]
        meta = [{"lot": (str(lot) or None), "wafer_index": (int(wi) if wi >= 0 else None),
                 "die_size": int((m > 0).sum())}
                for lot, wi, m in zip(d["lot"], d["wafer_index"], maps)]
        return WaferDataset(maps=maps, labels=d["labels"], label_space=str(d["label_space"]),
                            meta=meta, source=path)


_BUILDER = []


def _builder_class():
    """Defined lazily (TFDS import is slow) and once (TFDS registers builder classes)."""
    if _BUILDER:
        return _BUILDER[0]
    import tensorflow_datasets as tfds

    class WaferMapVmqa(tfds.core.GeneratorBasedBuilder):
        """WaferMapVMQA dialogues with their maps (ArrayRecord)."""
        VERSION = tfds.core.Version("1.0.0")
        # No downloads, so no checksum file; without this TFDS looks for the builder's code
        # path, which needs the (not installed) importlib_resources package.
        url_infos = None

        def __init__(self, *, splits=None, **kw):
            self._splits = splits or {}
            super().__init__(**kw)

        def _info(self):
            f = tfds.features
            return self.dataset_info_from_configs(features=f.FeaturesDict({
                "id": f.Text(), "map": f.Tensor(shape=(None, None), dtype=np.uint8,
                                                encoding="zlib"),
                "messages": f.Text(), "answer_key": f.Text(), "plan": f.Text(),
                "class": np.int32, "heldout": np.bool_, "image_index": np.int32}))

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(items, ds)
                    for name, (items, ds) in self._splits.items()}

        def _generate_examples(self, items, ds):
            for it in items:
                yield it["id"], {
                    "id": it["id"], "map": np.asarray(ds.maps[it["image_index"]], np.uint8),
                    "messages": json.dumps(it["messages"]),
                    "answer_key": json.dumps(it["answer_key"]), "plan": json.dumps(it["plan"]),
                    "class": it["class"], "heldout": it["heldout"],
                    "image_index": it["image_index"]}

    _BUILDER.append(WaferMapVmqa)
    return WaferMapVmqa


def write_tfds(out_dir: str, splits: dict) -> str:
    """Writes the ArrayRecord dataset under out_dir; returns the dataset version dir."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    cls = _builder_class()
    # TFDS silently reuses an existing prepared dataset: remove it so a rebuild is a rebuild.
    shutil.rmtree(os.path.join(out_dir, cls.name), ignore_errors=True)
    b = cls(splits=splits, data_dir=out_dir, file_format="array_record")
    b.download_and_prepare()
    return b.data_dir


def load_data_source(tfds_dir: str, split: str):
    """Random-access source for grain (`grain.python.DataLoader(data_source=...)`); records
    are dicts with messages/answer_key/plan as JSON strings (bytes) and the map array."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(tfds_dir).as_data_source(split)


def decode_record(rec: dict) -> dict:
    """A data-source record -> item-like dict (JSON fields parsed, text decoded)."""
    txt = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    return {"id": txt(rec["id"]), "map": np.asarray(rec["map"]),
            "messages": json.loads(txt(rec["messages"])),
            "answer_key": json.loads(txt(rec["answer_key"])), "plan": json.loads(txt(rec["plan"])),
            "class": int(rec["class"]), "heldout": bool(rec["heldout"]),
            "image_index": int(rec["image_index"])}


def write_vmqa(out_dir: str, splits: dict, tfds_too: bool = True) -> dict:
    """splits: {name: (items, dataset)}. Writes JSONL + maps npz (+ TFDS). Returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, (items, ds) in splits.items():
        maps_name = f"{name}_maps.npz"
        items = [dict(it, images=[f"{maps_name}#{it['image_index']}"]) for it in items]
        write_jsonl(items, os.path.join(out_dir, f"{name}.jsonl"))
        save_maps(ds, os.path.join(out_dir, maps_name))
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
    if tfds_too:
        paths["tfds"] = write_tfds(os.path.join(out_dir, "tfds"), splits)
    return paths


def load_vmqa(out_dir: str, split: str) -> tuple[list[dict], object]:
    """(items, WaferDataset) of one split written by write_vmqa; item['image_index'] indexes
    the dataset's maps."""
    items = read_jsonl(os.path.join(out_dir, f"{split}.jsonl"))
    return items, load_maps(os.path.join(out_dir, f"{split}_maps.npz"))
