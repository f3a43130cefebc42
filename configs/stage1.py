"""Stage 1 (PSCL) on synthetic wafer maps: the CPU benchmark config.

    python -m wamglm_jax.main --config=configs/stage1.py --workdir=DIR          # 9 classes
    python -m wamglm_jax.main --config=configs/stage1.py:mixed --workdir=DIR    # 38 classes

Targets (issue 5, tiny preset, 2 CPU cores, < 10 min): >= 97% accuracy and >= 0.95 macro-F1
on the held-out synthetic test split (9 classes); >= 95% accuracy with 38 classes.
Measured (shared, overloaded 2-core CPU, defaults below): 9 classes test 96.1% / macro-F1 0.961
(val 98.1%), 20.6 min wall, 12 CPU-min; 38 classes: 72.1% test after 1500 steps (not reached).
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
    config.data = default_data_config()
    config.data.source = "synthetic"
    config.data.label_space = "mixedwm38" if arg == "mixed" else "wm811k"
    config.data.num_train = 20_000
    config.data.num_val = 1_000
    config.data.num_test = 2_000
    config.data.balance = "balanced"
    config.stage1 = default_stage1_config()
    config.stage1.batch_size = 64
    config.stage1.loop.num_steps = 3000
    config.stage1.loop.log_every = 50
    config.stage1.loop.checkpoint_every = 200
    config.stage1.loop.eval_every = 1000
    config.stage1.optimizer.learning_rate = 2e-3
    config.stage1.tta = True                 # final evaluation: mean of the 8 dihedral views
    return config
