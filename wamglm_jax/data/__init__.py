"""Wafer-map data layer.

wafer (map contract, check_map), labels (label spaces, alias table), dataset (WaferDataset,
load_dataset), readers (npz/npy/png/csv layouts), wm811k (LSWMD.pkl, trust flag), generator
(procedural maps), preprocess (area resize, views), builders (TFDS ArrayRecord), pipeline
(grain image_loader), splits (load_splits, default_data_config).
"""
