"""Stage 1 (PSCL) on real MixedWM38 (38 classes, one id per map): train on `train`, select and
report on `val`.

    python -m wamglm_jax.main --config=configs/stage1_mixedwm38.py --workdir=DIR
        [--config.data.path=/path/to/mixedwm38_real.npz]

Classes are near-balanced (~1,000 maps each except Near-full 149 and Random 866): BalSCL plus
square-root class-balanced sampling. Sized for one GPU (the `small` ViT at 64x64 on 52x52 maps).
"""
from configs import common
from wamglm_jax.data.splits import default_data_config
from wamglm_jax.train.stage1 import default_stage1_config


def get_config(arg: str = ""):
    config = common.base_config(arg or "small")
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
    config.stage1.tta = True
    config.stage1.report_split = "val"
    config.stage1.loop.num_steps = 4000
    config.stage1.loop.log_every = 100
    config.stage1.loop.eval_every = 500
    config.stage1.loop.checkpoint_every = 500
    config.stage1.optimizer.learning_rate = 1e-3
    return config
