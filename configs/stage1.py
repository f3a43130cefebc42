"""Stage 1 (PSCL) on synthetic wafer maps: the CPU benchmark config.

    python -m wamglm_jax.main --config=configs/stage1.py --workdir=DIR          # 9 classes
    python -m wamglm_jax.main --config=configs/stage1.py:mixed --workdir=DIR    # 38 classes

Targets (issue 5, tiny preset, 2 CPU cores, < 10 min): >= 97% accuracy and >= 0.95 macro-F1
on the held-out synthetic test split (9 classes); >= 95% accuracy with 38 classes.
The model is the tiny preset's ViT (2 blocks of width 64, 64 tokens) fed 64x64 maps in 8x8
patches instead of the preset's 32x32 in 4x4: the same tokens and cost per step, but a
one-die scratch survives the resize (at 32x32 Scratch/Loc/none were the classes it missed).
Measured on 2 CPU cores (README, "Results"): 9 classes, test 97.3% / macro-F1 0.972 in 9.1 min
wall (training seed 0), 96.95% with --config.seed=1, 97.3% with seed 2: 97.2% on average,
borderline. The same run at 32x32 gave
96.3% and at 48x48 (patch 6) 96.8%. 38 classes: 80.3%, 78.6% once mixed patterns no longer
share one angle, 81.7% once a pattern the others cover is drawn again (generator fixes), 82.7%
with the CE on all three views (`ce_all_views`, what `:mixed` now sets): not met; Scratch
present or absent on top of other patterns is the error.
"""
from configs import common
from wamglm_jax.data.splits import default_data_config
from wamglm_jax.train.stage1 import default_stage1_config


def get_config(arg: str = ""):
    arg = arg or "wm811k"
    if arg not in ("wm811k", "mixed"):
        raise ValueError(f"configs/stage1.py: arg {arg!r}; expected '' (9 classes) or 'mixed'")
    config = common.base_config("tiny")
    config.stages = ("stage1",)
    config.model.vit.image_size = 64         # tiny ViT, 8x8 patches: still 64 tokens
    config.model.vit.patch_size = 8
    config.data = default_data_config()
    config.data.source = "synthetic"
    config.data.label_space = "mixedwm38" if arg == "mixed" else "wm811k"
    config.data.num_train = 40_000
    config.data.num_val = 2_000
    config.data.num_test = 4_000
    config.data.balance = "balanced"
    config.stage1 = default_stage1_config()
    config.stage1.batch_size = 64
    config.stage1.loop.num_steps = 3600
    config.stage1.loop.log_every = 50
    config.stage1.loop.checkpoint_every = 200
    config.stage1.loop.eval_every = 1200
    config.stage1.optimizer.learning_rate = 2e-3
    config.stage1.tta = True                 # final evaluation: mean of the 8 dihedral views
    # 38 classes: CE averaged over the 3 views (not the reference recipe; val 0.814 vs 0.809).
    config.stage1.ce_all_views = arg == "mixed"
    return config
