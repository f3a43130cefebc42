"""Stage 1 (PSCL) on real MixedWM38 (38 classes, one id per map): train on `train`, select and
report on `val`.

    python -m wamglm_jax.main --config=configs/stage1_mixedwm38.py --workdir=DIR
        [--config.data.path=/path/to/mixedwm38_real.npz]
    python -m wamglm_jax.main --config=configs/stage1_mixedwm38.py:cpu --workdir=DIR

Classes are near-balanced (~1,000 maps each except Near-full 149 and Random 866): BalSCL plus
square-root class-balanced sampling. The default is the one-GPU run of the README: the `small`
ViT widths (6 blocks of width 192, MLP 768) at 64x64 on the 52x52 maps with the conv stem
(stem_depth=2), CE on all three views, batch 128 x 3 views, 1500 steps (14 epochs): on one
H100, sharing it with the README's 1,000-step WM-811K run, val 0.978 / macro-F1 0.977 in 174 s
(167 s training: ~13 steps/s steady, the rest compilation and evaluations; input-bound like
that run), still rising at the last step. `:cpu` is the 2-core CPU run of the README: a
4-block width-96 ViT at 64x64, 64 tokens, whose patch embedding is a convolutional stem of
three 3x3 stride-2 convs with one residual 3x3 unit each (`config.model.vit.stem='conv'`,
`stem_depth=2`), 4,500 steps of 64 x 3 views, CE on all three views, 8-view TTA at the end:
val 0.9809 / macro-F1 0.9801 in 61.2 min (0.9804 in an earlier run of the same recipe; the
README gives the variants it was selected among on val). Earlier variants, one view: 3,000
steps 0.978 (0.9786 with TTA) in 39.6 min; stem_depth=1 0.971 in 27.4 min; the SigLIP patch
conv at 48x48 / patch 6 0.916; drop_path_rate=0.1 with label_smoothing=0.1 0.976 (0.977
with TTA).
Any preset name works as the arg too (`:tiny`, `:base`).
`:cpu` averages the CE over the three views (`ce_all_views`, not the reference recipe): the
small ViT was underfit on 38 classes in CPU time, and this was selected on val (patch conv:
0.916 vs 0.906 with seed 0; seed 1 gave 0.932, so the gain is within the seed spread).
Test-time augmentation: with the patch conv it lost (a tiny run: identity view 0.904, the
8-view average 0.897); with the conv stem it gained on all four runs evaluated both ways
(3,000 steps 0.9781 -> 0.9786, regularised 0.9758 -> 0.9774, 4,500 steps 0.9739 -> 0.9804
and 0.9756 -> 0.9809), so `:cpu` uses it.
"""
from configs import common
from wamglm_jax.data.splits import default_data_config
from wamglm_jax.train.stage1 import default_stage1_config


def get_config(arg: str = ""):
    cpu = arg == "cpu"
    config = common.base_config("tiny" if cpu else (arg or "small"))
    config.stages = ("stage1",)
    config.data = default_data_config()
    config.data.source = "file"
    config.data.path = "../shared/data/mixedwm38_real.npz"
    config.data.label_space = "mixedwm38"
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.test_split = "test"         # absent in this file: val is reported
    config.data.balanced_sampling = "sqrt"  # 'none' | 'full' | 'sqrt'
    config.stage1 = default_stage1_config()
    config.stage1.batch_size = 128
    config.stage1.eval_batch_size = 512
    config.stage1.tta = False
    config.stage1.report_split = "val"
    config.stage1.loop.num_steps = 4000
    config.stage1.loop.log_every = 100
    config.stage1.loop.eval_every = 500
    config.stage1.loop.checkpoint_every = 500
    config.stage1.optimizer.learning_rate = 1e-3
    if not cpu and not arg:     # the one-GPU default: the `small` widths with the conv stem
        config.model.vit.update(image_size=64, patch_size=8, hidden_size=192,
                                intermediate_size=768, num_layers=6, num_heads=6, stem="conv",
                                stem_depth=2)
        config.stage1.ce_all_views = True
        config.stage1.loader_workers = 6
        config.stage1.loop.num_steps = 1500
        config.stage1.loop.eval_every = 300
        config.stage1.loop.checkpoint_every = 300
    if cpu:
        config.model.vit.update(image_size=64, patch_size=8, hidden_size=96,
                                intermediate_size=192, num_layers=4, num_heads=4, stem="conv",
                                stem_depth=2)
        config.stage1.batch_size = 64
        config.stage1.eval_batch_size = 256
        config.stage1.loop.num_steps = 4500
        config.stage1.loop.eval_every = 1000
        config.stage1.optimizer.learning_rate = 2e-3
        config.stage1.ce_all_views = True   # val 0.916 vs 0.906 with CE on view 1 only
        config.stage1.tta = True            # conv stem: + 0.05 to 0.65 points on val, 4 of 4 runs
    return config
