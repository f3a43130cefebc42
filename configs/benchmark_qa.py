"""The longer synthetic run whose numbers the stage-2 targets refer to (issue 6).

    python -m wamglm_jax.main --config=configs/benchmark_qa.py --workdir=DIR
    python -m wamglm_jax.main --config=configs/benchmark_qa.py:cpu --workdir=DIR

`:cpu` is the reduced 2-core run of the README: stage 1 as configs/stage1.py was before its
conv stem (40k maps, the tiny ViT at 64x64 / patch 8, SigLIP patch conv so that the model
exports, 3,600 steps), then a 4-layer, 128-wide LM (1.1M parameters),
one dialogue per map, 2,500 steps of 32 dialogues (53 min at 0.79 steps/s on 2 cores in the
first runs; about 80 min at 0.52 steps/s with the current answers and `(0,-1)` features).

Targets on held-out synthetic maps (`test` split, half of its dialogues with held-out
phrasings/orders): defect-type answers >= 95% (>= 90% on the held-out phrasings), numeric
answers (count, zone extent, yield, area) >= 80% within tolerance.

The default is the run made on one H100 (2026-11-28; the older count answer and phrasing
bank): a `small`-shaped, 4-layer, 256-wide LM
(3.6M parameters in all, 3.5M trained) on the tiny ViT (32x32, patch 4: 64 image tokens); two
dialogues per training map (40,000); 300 alignment steps, then 5,000 steps of 32 dialogues
(307 s of stage 2, about 42 steps/s; stage 1 ran beside two other jobs). On 500 `test` maps
(2,035 answers): defect type 95.9% (99.4% with training phrasings, 92.1% held out): met;
numeric 67.1% within tolerance (yield 98.7%, area 86.6%, failing-die count 47.1%, zone count
21.1%): not met. 5,000 rather than the 8,000 steps first planned, because 8,000 did not fit
the device time of that session; README "Stage 2" has the whole table.
`:cpu` (2 cores, 2,500 steps at 0.52 steps/s alone), with the current code (share-first count
answers, the wider phrasing bank, made-up words, one opening) and
`--config.model.vit.feature_layer="(0,-1)"` (2026-11-29, one run): defect type 94.6% (98.8% /
90.6% held out), numeric 63.0% (yield 93.3%, area 77.2%, failing-die count 44.5%, zone count
18.1%); README "Synthetic QA, `configs/benchmark_qa.py:cpu`" has the table and how it moved.
"""
from configs import common
from wamglm_jax.data.splits import default_data_config
from wamglm_jax.train.stage1 import default_stage1_config
from wamglm_jax.train.stage2 import default_stage2_config


def get_config(arg: str = ""):
    if arg not in ("", "cpu"):
        raise ValueError(f"configs/benchmark_qa.py: arg {arg!r}; expected '' or 'cpu'")
    config = common.base_config("tiny")
    config.stages = ("stage1", "stage2")
    config.model.lm.hidden_size = 256
    config.model.lm.intermediate_size = 688
    config.model.lm.num_layers = 4
    config.model.lm.num_heads = 4
    config.model.lm.num_kv_heads = 2
    config.model.lm.head_dim = 64
    config.model.lm.max_seq_len = 512
    config.data = default_data_config()
    config.data.source = "synthetic"
    config.data.num_train = 20_000
    config.data.num_val = 1_000
    config.data.num_test = 1_000
    config.stage1 = default_stage1_config()
    config.stage1.loop.num_steps = 1200
    config.stage1.loop.eval_every = 400
    config.stage1.optimizer.learning_rate = 2e-3
    config.stage2 = default_stage2_config()
    config.stage2.per_map = 2
    config.stage2.batch_size = 32
    config.stage2.max_len = 512
    config.stage2.vocab_size = 1024
    config.stage2.loop.num_steps = 5000
    config.stage2.loop.log_every = 100
    config.stage2.loop.checkpoint_every = 1000
    config.stage2.optimizer.learning_rate = 1e-3
    config.stage2.align.num_steps = 300
    config.stage2.eval.split = "test"
    config.stage2.eval.num_maps = 500
    if arg == "cpu":
        lm = common.base_config("tiny").model.lm            # tiny vocab/positions, wider LM
        lm.update(hidden_size=128, num_layers=4, intermediate_size=344, head_dim=32,
                  max_seq_len=512)
        config.model.lm = lm
        config.model.vit.update(image_size=64, patch_size=8)
        config.data.update(num_train=40_000, num_val=2_000, num_test=4_000)
        config.stage1.batch_size = 64
        config.stage1.loop.num_steps = 3600
        config.stage1.loop.eval_every = 1200
        config.stage1.tta = True
        config.stage2.per_map = 1
        config.stage2.loop.num_steps = 2500
    return config
