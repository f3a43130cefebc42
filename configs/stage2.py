"""Both stages on synthetic wafer maps: stage 1 (PSCL) then stage 2 (WaferMapVMQA fine-tuning).

    python -m wamglm_jax.main --config=configs/stage2.py --workdir=DIR
    python -m wamglm_jax.main --config=configs/stage2.py:lora --workdir=DIR   # LoRA on the LM

Stage 2 restores the stage-1 vision tower (frozen), trains projector + LM (or LoRA adapters +
projector with `:lora`) on dialogues about the training maps, and evaluates QA on `val`
(half of its dialogues with held-out phrasings) against the stage-1 + KB template baseline.
"""
from configs import common
from wamglm_jax.data.splits import default_data_config
from wamglm_jax.train.stage1 import default_stage1_config
from wamglm_jax.train.stage2 import default_stage2_config


def get_config(arg: str = ""):
    if arg not in ("", "lora"):
        raise ValueError(f"configs/stage2.py: arg {arg!r}; expected '' or 'lora'")
    config = common.base_config("tiny")
    config.stages = ("stage1", "stage2")
    config.data = default_data_config()
    config.data.source = "synthetic"
    config.data.num_train = 4000
    config.data.num_val = 400
    config.data.num_test = 400
    config.stage1 = default_stage1_config()
    config.stage1.loop.num_steps = 600
    config.stage1.loop.eval_every = 200
    config.stage1.optimizer.learning_rate = 2e-3
    config.stage2 = default_stage2_config()
    config.stage2.batch_size = 16
    config.stage2.loop.num_steps = 1500
    config.stage2.loop.log_every = 50
    config.stage2.loop.checkpoint_every = 500
    config.stage2.optimizer.learning_rate = 2e-3
    config.stage2.align.num_steps = 100
    config.stage2.eval.num_maps = 200
    if arg == "lora":
        config.stage2.lora.rank = 8
        config.stage2.lora.alpha = 16.0
    return config
