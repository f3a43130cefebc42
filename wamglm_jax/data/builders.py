"""TFDS builders writing ArrayRecord, read back with random access (no TensorFlow needed).

Builders (TFDS names): ``wm811k`` (manual_dir holding LSWMD.pkl, needs ``trust_pickle=True``,
or a ragged .npz), ``mixedwm38`` (manual_dir holding Wafer_Map_Datasets.npz or a dense .npz;
both also take an explicit ``path=``), ``synthetic_wafers`` (the procedural generator; splits train/val/test with distinct seeds) and
``wafer_files`` (any WaferDataset, for users' own .npz/.npy/.png/.csv maps).

Each example: ``map`` uint8[H,W] (variable shape, zlib), ``label`` int32 (-1 = unlabeled),
``lot`` text, ``wafer_index`` int32 (-1 = unknown), ``die_size`` float32 (-1 = unknown),
``index`` int64 (row in the source). ``data_source(dir, split)`` gives the random-access source
that ``pipeline.image_loader`` and grain read; ``load_prepared(dir)`` reads it all back as a
WaferDataset. ``prepare(...)`` writes one dataset dir with a ``dataset.json`` summary.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from wamglm_jax.data import labels as L
from wamglm_jax.data.dataset import DatasetFormatError, WaferDataset, concat

SUMMARY = "dataset.json"
_VERSION = tfds.core.Version("1.0.0")


def _features():
    return tfds.features.FeaturesDict({
        "map": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
        "label": tfds.features.Scalar(dtype=np.int32),
        "lot": tfds.features.Text(),
        "wafer_index": tfds.features.Scalar(dtype=np.int32),
        "die_size": tfds.features.Scalar(dtype=np.float32),
        "index": tfds.features.Scalar(dtype=np.int64),
    })


def _num(v, default):
    try:
        return default if v is None else type(default)(v)
    except (TypeError, ValueError):
        return default


def examples(ds: WaferDataset):
    for i in range(len(ds)):
        m = ds.meta[i] or {}
        yield i, {"map": ds.maps[i], "label": np.int32(ds.labels[i]),
                  "lot": str(m.get("lot") or ""), "wafer_index": _num(m.get("wafer_index"), -1),
                  "die_size": _num(m.get("die_size"), -1.0), "index": np.int64(i)}


class _WaferBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = _VERSION
    LABEL_SPACE = "wm811k"

    def __init__(self, *, file_format="array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    # No checksums file and no code-path lookup: TFDS's lookup needs the optional
    # `importlib_resources` package for builders defined inside a package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self):
        return self.dataset_info_from_configs(
            features=_features(), description=self.__doc__,
            metadata=tfds.core.MetadataDict(label_space=self.LABEL_SPACE,
                                            class_names=list(L.class_names(self.LABEL_SPACE))))

    def _datasets(self, dl_manager) -> dict[str, WaferDataset]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        return {k: examples(v) for k, v in self._datasets(dl_manager).items()}

    def _generate_examples(self, *args):  # pragma: no cover - _split_generators yields directly
        raise NotImplementedError


def _by_split(ds: WaferDataset, default: str = "train") -> dict[str, WaferDataset]:
    if ds.split is None:
        return {default: ds}
    return {s: ds.select(s) for s in ds.splits()}


def _manual_file(dl_manager, patterns, what):
    d = os.fspath(dl_manager.manual_dir)
    for pat in patterns:
        hits = sorted(glob.glob(os.path.join(d, pat)))
        if hits:
            return hits[0]
    raise DatasetFormatError(f"{d}: manual_dir holds none of {list(patterns)} ({what})")


class Wm811k(_WaferBuilder):
    """WM-811K (Wu et al. 2015): labelled rows split train/test; unlabeled rows in split
    'unlabeled' (label -1) when include_unlabeled=True."""
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place LSWMD.pkl (or a ragged .npz: maps_flat, offsets, "
                                    "shapes, labels[, split]) in manual_dir.")

    def __init__(self, *, trust_pickle: bool = False, include_unlabeled: bool = False,
                 path: str | None = None, **kw):
        self.trust_pickle, self.include_unlabeled, self.path = trust_pickle, include_unlabeled, path
        super().__init__(**kw)

    def _datasets(self, dl_manager):
        path = self.path or _manual_file(dl_manager, ("LSWMD.pkl", "*.pkl", "*.npz"), "WM-811K")
        if path.endswith(".pkl"):
            from wamglm_jax.data.wm811k import read_lswmd
            lab, unl = read_lswmd(path, trust_pickle=self.trust_pickle)
            out = _by_split(lab)
            if self.include_unlabeled and len(unl):
                out["unlabeled"] = unl
            return out
        from wamglm_jax.data.readers import read_npz_any
        return _by_split(read_npz_any(path, label_space="wm811k"))


class Mixedwm38(_WaferBuilder):
    """MixedWM38 (Wang et al. 2020): 38 classes; value-3 maps handled by ``value3``."""
    LABEL_SPACE = "mixedwm38"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place Wafer_Map_Datasets.npz (or a dense .npz) in manual_dir."

    def __init__(self, *, value3: str = "fail", path: str | None = None, **kw):
        self.value3, self.path = value3, path
        super().__init__(**kw)

    def _datasets(self, dl_manager):
        from wamglm_jax.data.readers import read_npz_any
        path = self.path or _manual_file(dl_manager, ("Wafer_Map_Datasets.npz", "*.npz"),
                                         "MixedWM38")
        ds = read_npz_any(path, value3=self.value3)
        if ds.label_space != "mixedwm38":
            raise DatasetFormatError(f"{path}: not a MixedWM38 layout (arr_0/arr_1 or "
                                     "maps + multi-hot labels)")
        return _by_split(ds)


class SyntheticWafers(_WaferBuilder):
    """Procedural wafer maps (wamglm_jax.data.generator)."""

    def __init__(self, *, num_train=1000, num_val=200, num_test=200, seed=0,
                 label_space="wm811k", balance="balanced", **kw):
        self.sizes = dict(train=num_train, val=num_val, test=num_test)
        self.seed, self.balance = seed, balance
        self.LABEL_SPACE = label_space
        super().__init__(**kw)

    def _datasets(self, dl_manager):
        from wamglm_jax.data.splits import default_data_config, synthetic_split
        cfg = default_data_config()
        cfg.update(dict(seed=self.seed, label_space=self.LABEL_SPACE, balance=self.balance))
        return {k: synthetic_split(cfg, k, n) for k, n in self.sizes.items() if n > 0}


class WaferFiles(_WaferBuilder):
    """Users' own maps (.npz/.npy/.png/.csv) already read into a WaferDataset."""

    def __init__(self, *, dataset: WaferDataset | None = None, **kw):
        self.dataset = dataset
        if dataset is not None:
            self.LABEL_SPACE = dataset.label_space
        super().__init__(**kw)

    def _datasets(self, dl_manager):
        if self.dataset is None:
            raise DatasetFormatError("wafer_files: no dataset given to the builder")
        return _by_split(self.dataset)


BUILDERS = {"wm811k": Wm811k, "mixedwm38": Mixedwm38, "synthetic_wafers": SyntheticWafers,
            "wafer_files": WaferFiles}


def prepare(name: str, output_dir: str, manual_dir: str | None = None, **kw):
    """Builds builder ``name`` into output_dir; writes ``dataset.json``; returns the builder."""
    tfds.disable_progress_bar()
    builder = BUILDERS[name](data_dir=output_dir, **kw)
    cfg = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=cfg)
    summary = {"builder": name, "version": str(builder.version),
               "label_space": builder.LABEL_SPACE,
               "builder_dir": os.path.relpath(builder.data_dir, output_dir),
               "splits": {k: int(v.num_examples) for k, v in builder.info.splits.items()}}
    with open(os.path.join(output_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=1)
    return builder


def _summary(path: str) -> dict:
    p = os.path.join(path, SUMMARY)
    if not os.path.exists(p):
        raise DatasetFormatError(f"{path}: not a dataset directory written by tools.make_dataset "
                                 f"(no {SUMMARY})")
    with open(p) as f:
        return json.load(f)


def open_builder(path: str):
    s = _summary(path)
    return tfds.builder_from_directory(os.path.join(path, s["builder_dir"])), s


def data_source(path: str, split: str):
    """Random-access source of records {'map', 'label', 'lot', 'wafer_index', 'die_size',
    'index'} for grain (``builder.as_data_source``)."""
    b, s = open_builder(path)
    if split not in s["splits"]:
        raise DatasetFormatError(f"{path}: no split {split!r}; available {sorted(s['splits'])}")
    return b.as_data_source(split=split)


def load_prepared(path: str) -> WaferDataset:
    b, s = open_builder(path)
    parts = []
    for split in sorted(s["splits"]):
        src = b.as_data_source(split=split)
        recs = [src[i] for i in range(len(src))]
        txt = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        meta = [dict(lot=txt(r["lot"]) or None,
                     wafer_index=None if r["wafer_index"] < 0 else int(r["wafer_index"]),
                     die_size=None if r["die_size"] < 0 else float(r["die_size"]))
                for r in recs]
        parts.append(WaferDataset([np.asarray(r["map"], np.uint8) for r in recs],
                                  np.array([r["label"] for r in recs], np.int32),
                                  s["label_space"], np.full(len(recs), split), meta, path))
    return concat(parts, source=path)
