"""The quickstart: the whole pipeline on a tiny model and synthetic maps, < 15 min on 2 cores.

    python -m wamglm_jax.main --config=configs/quickstart.py --workdir=DIR

Generates the synthetic data, trains stage 1 (PSCL) and stage 2 (WaferMapVMQA), evaluates QA
against the stage-1 + knowledge-base baseline, prints a sample dialogue, and writes
DIR/stage1/report.{json,md}, DIR/stage2/report.{json,md} with plots (stage2/qa.png).
Re-running the same command resumes (finished stages keep their reports). The numbers are a
demonstration, not a benchmark (configs/benchmark_qa.py is the longer run).
`:ci` is a reduced size for the test suite.
"""
from configs import common
from wamglm_jax.data.splits import default_data_config
from wamglm_jax.train.stage1 import default_stage1_config
from wamglm_jax.train.stage2 import default_stage2_config


def get_config(arg: str = ""):
    if arg not in ("", "ci"):
        raise ValueError(f"configs/quickstart.py: arg {arg!r}; expected '' or 'ci'")
    ci = arg == "ci"
    config = common.base_config("tiny")
    config.stages = ("stage1", "stage2")
    config.model.lm.max_seq_len = 384
    config.data = default_data_config()
    config.data.source = "synthetic"
    config.data.num_train = 200 if ci else 3000
    config.data.num_val = 32 if ci else 300
    config.data.num_test = 32 if ci else 300
    config.stage1 = default_stage1_config()
    config.stage1.batch_size = 32 if ci else 64
    config.stage1.loop.num_steps = 6 if ci else 250
    config.stage1.loop.log_every = 3 if ci else 25
    config.stage1.loop.checkpoint_every = 0 if ci else 100
    config.stage1.loop.eval_every = 0 if ci else 100
    config.stage1.optimizer.learning_rate = 2e-3
    config.stage1.embedding_points = 300
    config.stage2 = default_stage2_config()
    config.stage2.batch_size = 16
    config.stage2.max_len = 384
    config.stage2.vocab_size = 512 if ci else 1024
    config.stage2.loop.num_steps = 6 if ci else 450
    config.stage2.loop.log_every = 3 if ci else 25
    config.stage2.loop.checkpoint_every = 0 if ci else 150
    config.stage2.optimizer.learning_rate = 2e-3
    config.stage2.align.num_steps = 0 if ci else 40
    config.stage2.eval.num_maps = 4 if ci else 80
    config.stage2.eval.max_new_tokens = 24 if ci else 96
    config.stage2.eval.num_examples = 1 if ci else 2
    return config
