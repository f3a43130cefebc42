"""Train / val / test datasets from ``config.data`` (``default_data_config()`` lists the fields).

source='synthetic': three generator runs with distinct seeds derived from ``seed`` (so the
splits share no lot and are deterministic); lot ids look alike in every split (``synthetic_lot
numbers``), so a model that reads a lot id from the prompt cannot rely on the split's name in
it. Any other source is a path that ``load_dataset``
reads; ``train_split`` / ``eval_split`` name its splits (a real file has train/val only; a
missing test split is returned as None, a missing train/eval split is an error).
"""
from __future__ import annotations

import ml_collections
import numpy as np

from wamglm_jax.data.dataset import WaferDataset, load_dataset
from wamglm_jax.data.generator import generate

# Seeds of the three synthetic splits are SeedSequence-like offsets of the base seed.
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_006}


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "synthetic"        # 'synthetic' or a path load_dataset reads
    c.label_space = "wm811k"      # 'wm811k' | 'mixedwm38'
    c.num_train = 20_000          # synthetic only
    c.num_val = 2_000
    c.num_test = 2_000
    c.seed = 0
    c.balance = "balanced"        # synthetic class frequencies: 'balanced' | 'wm811k'
    c.background = 1.0            # synthetic: scale of background random failures (0 = clean)
    c.balanced_sampling = "none"  # pipeline: 'none' | 'full' (1/n_c) | 'sqrt' (1/sqrt(n_c))
    c.train_split = "train"       # split names in a real file
    c.eval_split = "val"
    c.test_split = "test"
    c.path = ""                   # optional; used when source is 'file'
    return c


# Lot numbers: one permutation of [_LOT_LO, _LOT_HI) per data seed, cut into one block per split.
_LOT_LO, _LOT_HI = 100_000, 1_000_000
SYNTHETIC_LOT_PREFIX = "L"


def synthetic_lot_numbers(data_seed: int, name: str, num: int) -> np.ndarray:
    """int64[num // 8 + 1] lot numbers for split ``name``: 6-digit codes drawn without
    replacement from one permutation per data seed, a disjoint block per split, so that
    train/val/test lots never share an id and their ids have the same form."""
    need = int(num) // 8 + 1
    block = (_LOT_HI - _LOT_LO) // len(_SPLIT_OFFSET)
    if need > block:
        raise ValueError(f"synthetic split {name!r}: {num} maps need up to {need} lots, more "
                         f"than the {block} lot numbers a split has")
    perm = np.random.default_rng([int(data_seed), 0x10C]).permutation(_LOT_HI - _LOT_LO)
    k = list(_SPLIT_OFFSET).index(name)
    return perm[k * block:k * block + need] + _LOT_LO


def synthetic_split(data_cfg, name: str, num: int) -> WaferDataset:
    seed = int(data_cfg.seed) + _SPLIT_OFFSET[name]
    ds = generate(int(num), seed=seed, label_space=data_cfg.label_space,
                  balance=data_cfg.balance, background=float(data_cfg.get("background", 1.0)),
                  lot_prefix=SYNTHETIC_LOT_PREFIX,
                  lot_numbers=synthetic_lot_numbers(int(data_cfg.seed), name, int(num)))
    ds.source = f"synthetic:{name}(seed={seed})"
    return ds


def load_splits(data_cfg) -> dict[str, WaferDataset | None]:
    """{'train': WaferDataset, 'val': WaferDataset, 'test': WaferDataset or None}."""
    given = data_cfg.to_dict() if isinstance(data_cfg, ml_collections.ConfigDict) \
        else dict(data_cfg)
    # Plain merge (no ConfigDict type check): fields the data layer does not use here, such
    # as balanced_sampling (bool or str), pass through untouched.
    cfg = ml_collections.ConfigDict({**default_data_config().to_dict(), **given})
    if cfg.source == "synthetic":
        return {"train": synthetic_split(cfg, "train", cfg.num_train),
                "val": synthetic_split(cfg, "val", cfg.num_val),
                "test": synthetic_split(cfg, "test", cfg.num_test)}
    path = cfg.path if cfg.source == "file" else cfg.source
    full = load_dataset(path)
    if full.label_space != cfg.label_space:
        raise ValueError(f"{path}: holds label space {full.label_space!r} but "
                         f"config.data.label_space is {cfg.label_space!r}")
    out = {"train": full.select(cfg.train_split), "val": full.select(cfg.eval_split)}
    out["test"] = full.select(cfg.test_split) if cfg.test_split in full.splits() else None
    return out
