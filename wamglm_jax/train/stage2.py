"""Stage 2: language fine-tuning on WaferMapVMQA, then QA evaluation and the template baseline.

    run(config, workdir, mesh) -> report dict; writes workdir/stage2/{checkpoints,logs,
    config.json, model_config.json, vmqa/*.jsonl, qa_records.jsonl, report.json, report.md}
    and workdir/tokenizer/ (trained here unless config.stage2.tokenizer_dir names one).

Steps:
1. load_splits(config.data) -> dialogues (qa.dialogues.build_dialogues; train with training
   phrasings, val/test with a held-out fraction), training-only count drills if
   config.stage2.count_drills.prob > 0 (qa/drills.py) -> tokenizer -> config.model.image_token_id
   and lm.vocab_size (padded to a multiple of 128) from it -> question-wording noise on the
   training dialogues (qa/augment.py; not the drills) -> encoded dialogues (assistant-only
   loss masks from the chat template) -> length-bucketed batches (a resumable iterator;
   train/stage2_data.py).
2. WamGLM, sharded init; the vision tower is restored from the stage-1 checkpoint
   (`restore_stage1_vision`: orbax partial restore of `state` -> params/vision, best-on-val
   checkpoint if there is one, else the latest), the projector optionally from a short
   alignment phase (`workdir/stage2_align/`: only the projector trains, on "describe this
   map" dialogues), the LM from its init or from a local Hugging Face Llama-family dir
   (config.stage2.init_lm_from, via export/from_hf; use that LM's tokenizer with
   tokenizer_dir, the vocabulary grows to fit `<image>` and the padding), then optionally
   warmed up alone on the share-first product sentences of the training maps
   (config.stage2.lm_warmup, train/lm_warmup.py, `workdir/stage2_lm_warmup/`; before the
   alignment phase, which trains the projector against the warmed LM).
3. What trains is set by regexes (config.stage2.optimizer.freeze / trainable; default: vision
   frozen). LoRA (config.stage2.lora.rank > 0) adds adapters under params['lora'] for kernels
   matching lora.lm_regex / lora.vision_regex; they are applied inside the jitted forward
   (models.lora.apply_lora) and checkpoints keep them unmerged; by default only adapters and
   the projector train then. Loss: token cross-entropy on assistant tokens only (targets
   spelt with a digit weighted by config.stage2.numeric_loss_weight, in the alignment phase
   too; 1 = the plain mean; the metric `ce` is always the plain mean, comparable across runs),
   plus, with config.stage2.product_rehearsal.weight > 0, that weight x the LM's loss on a
   batch of product sentences each step (metric `product_ce`; not in the alignment phase).
4. train.loop.train_loop (checkpointing, resume, metrics, NaN guard, SIGTERM) in workdir/stage2.
5. Evaluation on config.stage2.eval.split (evaluate.qa: teacher-forced history, per kind,
   whole dialogue, held-out phrasings separately) and the stage-1 + KB template baseline
   (evaluate.baseline); report.json/.md with example dialogues (evaluate/stage2_report.py).

A finished run loads for chat with inference.load.load_for_inference(workdir).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from wamglm_jax.data.splits import load_splits
from wamglm_jax.evaluate.stage2_report import evaluate_and_report
from wamglm_jax.inference.load import STAGE2_DIR
from wamglm_jax.losses.lm import lm_loss
from wamglm_jax.models import lora as lora_lib
from wamglm_jax.models.decoder import Decoder
from wamglm_jax.models.wamglm import WamGLM, check_image_tokens, num_image_tokens
from wamglm_jax.parallel import sharding as shd
from wamglm_jax.qa import encode as qenc
from wamglm_jax.qa.answers import COUNT_FORMS, ZONE_FORMS
from wamglm_jax.qa.augment import check_probability, frame_questions, noise_questions
from wamglm_jax.qa.dialogues import build_dialogues
from wamglm_jax.qa.drills import build_count_drills, check_drill_config
from wamglm_jax.qa.io import write_jsonl
from wamglm_jax.qa.knowledge_base import load_knowledge_base
from wamglm_jax.qa.tokenizer import image_token_id, numeric_token_mask
from wamglm_jax.train import lm_warmup, loop, optim
from wamglm_jax.train.checkpoint import saved_tree
from wamglm_jax.train.stage2_data import (DialogueBatches, capped_indices, describe_items,
                                          get_tokenizer)
from wamglm_jax.train.state import TrainState

STAGE = STAGE2_DIR
ALIGN = "stage2_align"
WARMUP = "stage2_lm_warmup"


def default_stage2_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        batch_size=16,              # global batch of dialogues
        max_len=512,                # tokens per dialogue (<= model.lm.max_seq_len)
        per_map=1,                  # dialogues per training map
        count_form="share_first",   # count answers: 'share_first' ("8.4% of the 2046 dies
                                    # fail, which is 171 dies.") or 'count_first' ("171 of
                                    # the 2046 dies fail."); README "Share first"
        zone_form="count_first",    # zone answers: 'count_first' ("At the edge, 302 of 1120
                                    # dies fail (27.0%).") or 'share_first' ("At the edge,
                                    # 27.0% of the 1120 dies fail, which is 302 dies.", the
                                    # dies per zone then in the die count line); README
                                    # "Design notes" (zone counts)
        max_per_class=0,            # > 0: at most this many training maps per class (seeded)
        class_scaling="flat",       # with max_per_class: 'flat' (every class capped at it) or
                                    # 'sqrt' (the largest class gets max_per_class maps, class c
                                    # max_per_class * sqrt(n_c / n_max): stage 1's sqrt prior)
        question_noise=dict(dialogue_prob=0.5, word_prob=0.25,    # qa/augment.py; 0 = off
                            pseudo_share=0.5),   # replacements that are made-up words
                                                 # (README "Made-up words in the noise")
        question_frames=dict(prob=0.0),   # > 0: neutral frames around training questions
                                          # (qa/augment.py); off: README "Neutral frames"
        numeric_loss_weight=1.0,    # > 1: the loss weight of assistant targets spelt with a
                                    # digit (counts, shares, yields; qa.tokenizer.
                                    # numeric_token_mask), in the alignment phase too; off:
                                    # README "Numeric loss weight" (4 gave no gain, one run)
        count_drills=dict(prob=0.0, turns=4),   # > 0: that share of the training maps also
                                          # gets a count drill of `turns` exchanges (qa/drills.py);
                                          # off: README "Count drills" (no gain in one run)
        eval_heldout_fraction=0.5,  # val/test dialogues with held-out phrasings/orders
        vocab_size=1024,            # tokenizer training
        tokenizer_dir="",           # a pretrained HF tokenizer instead of training one
        chat_template="",           # its replacement template (with {% generation %} marks)
        kb_path="",                 # your fab's knowledge-base JSON (default: the packaged one)
        init_vision_from_stage1=True,
        init_lm_from="",            # a local HF Llama-family dir: the LM starts from its weights
                                    # (config.model.lm is then taken from it; use its tokenizer)
        lora=dict(rank=0, alpha=16.0,
                  lm_regex=r"^lm/.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                  vision_regex=""),
        lm_warmup=dict(num_steps=0, batch_size=32, learning_rate=1e-3, zones=True, max_len=32,
                       num_eval=500, log_every=100),
                                    # > 0: the LM alone first learns the share-first product
                                    # on the training maps' numbers (train/lm_warmup.py,
                                    # workdir/stage2_lm_warmup); off: README
                                    # "LM warm-up" (3,000 steps: 97.8% on text, then
                                    # worse answers after stage 2, one run)
        product_rehearsal=dict(weight=0.0, batch_size=32, zones=True, max_len=32, num_eval=500,
                               pack=1, die_line=False),
                                    # weight > 0: every stage-2 step adds weight x the LM's
                                    # loss on a batch of the warm-up's product sentences (text
                                    # only) to the dialogue loss, one objective and one clipped
                                    # gradient (train/lm_warmup.py WithSentences; the LM must
                                    # train); afterwards the LM alone writes the count
                                    # of num_eval eval-split maps' sentences (the report's
                                    # product_rehearsal entry); off: README "Product
                                    # rehearsal" (weight 1: 93.6% on text, numeric 43.9%
                                    # and the die count no longer copied, one run).
                                    # pack > 1: rows of `pack` sentences (batch_size rows a
                                    # step; max_len up to 30 x pack + 2), so the product is not
                                    # learnt only right after BOS (README "The product,
                                    # text alone"; packed, one run: product 57.9%, copy 0.6%).
                                    # die_line: each sentence after its die count line, "The
                                    # wafer has N dies.", the copied N in the loss too, as the
                                    # answers copy it (max_len up to 38 x pack + 2; not yet run)
        align=dict(num_steps=0, learning_rate=1e-3, log_every=20),
        eval=dict(split="val", num_maps=200, max_new_tokens=96, batch_size=16, num_examples=3,
                  baseline=True),
        loop=loop.default_loop_config(num_steps=1000, log_every=50, checkpoint_every=200,
                                      eval_every=0),
        optimizer=optim.default_optimizer_config(learning_rate=1e-3, weight_decay=0.01,
                                                 freeze=("^vision/",)),
    ))
    c.update(overrides)
    return c


def check_loss_weight(weight) -> None:
    """config.stage2.numeric_loss_weight must be a finite number > 0 (1 = plain CE)."""
    loop.check_positive_number("config.stage2.numeric_loss_weight", weight,
                               " (1 = plain cross-entropy on every assistant token)")


def attach_lora(params: dict, s2, model_cfg, mesh, seed: int) -> dict:
    """Adds unmerged LoRA factors (config.stage2.lora: rank, alpha, LM/tower regexes) to
    params['lora'], replicated on the mesh; returns them."""
    targets = "|".join(r for r in (s2.lora.lm_regex, s2.lora.vision_regex) if r)
    lo = lora_lib.init_lora(params, int(s2.lora.rank), float(s2.lora.alpha), targets,
                            jax.random.PRNGKey(seed + 2),
                            stacked_regex=r"/layers/" if model_cfg.scan_layers else None)
    params["lora"] = jax.device_put(lo, shd.replicated(mesh))
    return lo


def stage_cfg(config) -> ml_collections.ConfigDict:
    """config.stage2 on top of the defaults (nested sections merged field by field)."""
    base = loop.merge_section(config, "stage2", default_stage2_config())
    if base.max_len > config.model.lm.max_seq_len:
        raise ValueError(f"config.stage2.max_len={base.max_len} exceeds "
                         f"config.model.lm.max_seq_len={config.model.lm.max_seq_len}")
    return base


# ------------------------------------------------------------------------------- model
def model_config_for(config, tok, base=None) -> ml_collections.ConfigDict:
    """config.model (or `base`) with image_token_id and vocab_size taken from the tokenizer."""
    cfg = ml_collections.ConfigDict((base or config.model).to_dict())
    cfg.image_token_id = image_token_id(tok)
    cfg.lm.vocab_size = max(int(cfg.lm.vocab_size), shd.pad_vocab(len(tok)))
    return cfg


def import_lm(config, s2, tok):
    """(model_cfg, lm params as numpy) from the HF dir config.stage2.init_lm_from, with the
    vocabulary grown to fit the tokenizer (new rows = mean of the old ones)."""
    from wamglm_jax.export import from_hf
    params, cfg, info = from_hf.import_pretrained(config.model, lm=s2.init_lm_from,
                                                  seed=int(config.seed))
    model_cfg = model_config_for(config, tok, base=cfg)
    params, _ = from_hf.resize_vocab(params, cfg, int(model_cfg.lm.vocab_size))
    return model_cfg, params["lm"]


def find_stage1_checkpoint(workdir) -> str:
    """Path of the stage-1 `state` item: best-on-val if present, else the latest step."""
    root = epath.Path(workdir) / "stage1"
    for sub in ("best", "checkpoints"):
        d = root / sub
        if not d.exists():
            continue
        steps = sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()
                       and (p / "state").exists())
        if steps:
            return os.fspath(d / str(steps[-1]) / "state")
    raise FileNotFoundError(f"{root}: no stage-1 checkpoint (best/<step>/state or "
                            "checkpoints/<step>/state); run stage1 first or set "
                            "config.stage2.init_vision_from_stage1=False")


def restore_stage1_vision(state_dir: str, target_vision):
    """Orbax partial restore of params/vision from a stage-1 `state` item.

    target_vision: tree of jax.ShapeDtypeStruct (with shardings) or arrays shaped like
    WamGLM's params['vision']; the arrays come back in those shardings."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target_vision)
    sub = {"params": {"vision": abstract}}
    # Shapes are checked against the checkpoint's metadata first, so a mismatch is one
    # clear error naming the parameter (and no failed orbax restore is left in flight).
    saved = saved_tree(state_dir).get("params", {}).get("vision")
    if saved is None:
        raise ValueError(f"{state_dir}: no params/vision in the stage-1 checkpoint")
    saved_flat = {lora_lib.path_str(p): m for p, m in
                  jax.tree_util.tree_flatten_with_path(dict(saved))[0]}
    for p, b in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name, m = lora_lib.path_str(p), saved_flat.get(lora_lib.path_str(p))
        if m is None:
            raise ValueError(f"{state_dir}: params/vision/{name} is missing from the stage-1 "
                             "checkpoint (does config.model.vit match the stage-1 run?)")
        if tuple(m.shape) != tuple(b.shape):
            raise ValueError(f"{state_dir}: params/vision/{name} has shape {tuple(m.shape)} "
                             f"in the stage-1 checkpoint, the model expects {b.shape} (does "
                             "config.model.vit match the stage-1 run?)")
    with ocp.PyTreeCheckpointer() as ckptr:      # closed: no orbax threads left behind
        out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=sub, restore_args=ocp.checkpoint_utils.construct_restore_args(sub),
            partial_restore=True))
    return out["params"]["vision"]


def make_train_step(model, alpha, token_weights=None, product_weight: float = 0.0):
    """token_weights float[V] or None: see lm_loss (config.stage2.numeric_loss_weight).
    product_weight > 0 (config.stage2.product_rehearsal.weight): the batch also holds
    "sentences" (tokens/loss_mask/attention_mask int32[B_s,L_s], text only) and the objective
    is the dialogue loss + product_weight x the LM's loss on them (metric loss; ce and
    token_accuracy stay the dialogues', product_ce/product_token_accuracy the sentences')."""
    lm = Decoder(model.config)

    def train_step(state: TrainState, batch):
        mask = batch["loss_mask"] * batch["valid"][:, None]

        def loss_fn(params):
            eff = lora_lib.effective_params(params, alpha)
            logits = model.apply({"params": eff}, batch["image"], batch["tokens"],
                                 batch["attention_mask"])
            out = lm_loss(logits, batch["tokens"], mask, token_weights)
            if product_weight > 0:
                s = batch["sentences"]
                s_out = lm_loss(lm.apply({"params": eff["lm"]}, s["tokens"],
                                         attention_mask=s["attention_mask"]),
                                s["tokens"], s["loss_mask"])
                out = dict(out, loss=out["loss"] + product_weight * s_out["loss"],
                           product_ce=s_out["ce"],
                           product_token_accuracy=s_out["token_accuracy"])
            return out["loss"], out

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads)
        return state, dict(metrics, grad_norm=optax.global_norm(grads))
    return train_step


def _batch_fn(model_cfg):
    def fn(b):
        check_image_tokens(b["tokens"][b["valid"] > 0], model_cfg)
        keys = ("image", "tokens", "loss_mask", "attention_mask", "valid", "sentences")
        return {k: b[k] for k in keys if k in b}
    return fn


def init_params(model, model_cfg, mesh, rules, seed):
    s = model_cfg.vit.image_size
    n = shd.axis_size(mesh, shd.BATCH_AXES)
    nimg = num_image_tokens(model_cfg)
    tokens = jnp.asarray(np.tile([[1] + [model_cfg.image_token_id] * nimg + [2]], (n, 1)),
                         jnp.int32)
    variables, shardings = shd.init_sharded(
        model, jax.random.PRNGKey(seed), jnp.zeros((n, s, s, 3)), tokens, jnp.ones_like(tokens),
        mesh=mesh, rules=rules)
    return dict(variables["params"]), shardings["params"]


def make_state(params, opt_cfg, num_steps, mesh, rules, seed):
    tx, schedule = optim.make_optimizer(opt_cfg, num_steps, params)
    with shd.activate(mesh, rules):
        state = jax.jit(lambda p, r: TrainState.create(params=p, tx=tx, rng=r))(
            params, jax.random.PRNGKey(seed + 1))
    return state, schedule


def _opt_cfg(s2, lora_on: bool, **overrides):
    cfg = ml_collections.ConfigDict(s2.optimizer.to_dict())
    if lora_on and not tuple(cfg.trainable):
        cfg.trainable = ("^lora/", "^projector/")
    cfg.update(overrides)
    return cfg


def heldout_split(s2, splits):
    """The split the text-only product scores use: config.stage2.eval.split, else val, else
    test; None when there is none."""
    return next((n for n in (s2.eval.split, "val", "test") if splits.get(n) is not None), None)


def score_heldout_products(lm_params, model_cfg, tok, splits, name, num, max_len, seed, field,
                           mesh, rules, die_line: bool = False) -> dict:
    """lm_warmup.score_text_product on a seeded sample of `num` maps of splits[name] (as the
    QA evaluation draws its maps)."""
    held = splits[name].maps
    pick = np.random.default_rng(seed + 99).permutation(len(held))[:num]
    return lm_warmup.score_text_product(lm_params, model_cfg, tok, held, sorted(pick), max_len,
                                        field=field, mesh=mesh, rules=rules,
                                        die_line=die_line)


def warm_up_lm(s2, params, model_cfg, tok, splits, train_indices, *, workdir, mesh, rules,
               seed):
    """config.stage2.lm_warmup (train/lm_warmup.py): params['lm'] trained alone on the share-
    first product sentences of the training maps, in workdir/stage2_lm_warmup (train.loop:
    checkpointed, resumed, logged), then its greedy count scored on num_eval maps (seeded)
    of config.stage2.eval.split. -> (lm params, info for the report)."""
    w = s2.lm_warmup
    pairs = lm_warmup.product_pairs(splits["train"].maps, train_indices, zones=bool(w.zones))
    if not len(pairs):
        raise ValueError("config.stage2.lm_warmup: the training maps have no dies, so there is "
                         "no product sentence to warm up on")
    toks, mask, _, lens = lm_warmup.encode_sentences(tok, pairs, int(w.max_len),
                                                     int(tok.pad_token_id),
                                                     field="config.stage2.lm_warmup.max_len")
    w_cfg = _opt_cfg(s2, False, trainable=("^lm/",), freeze=(),
                     learning_rate=float(w.learning_rate))
    state, schedule = make_state(params, w_cfg, int(w.num_steps), mesh, rules, seed + 7)
    logging.info("stage2: LM warm-up on %d product sentences of %d training maps (zones %s), "
                 "%d steps of %d", len(pairs), len(splits["train"].maps) if train_indices is None
                 else len(train_indices), bool(w.zones), int(w.num_steps), int(w.batch_size))
    batches = lm_warmup.SentenceBatches(toks, mask, lens, global_batch_size=int(w.batch_size),
                                        seed=seed + 11, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    res = loop.train_loop(stage_dir=workdir / WARMUP, state=state, train_iter=batches,
                          cfg=loop.default_loop_config(num_steps=int(w.num_steps),
                                                       log_every=int(w.log_every),
                                                       checkpoint_every=0, eval_every=0),
                          train_step=lm_warmup.make_warmup_step(model_cfg), mesh=mesh,
                          rules=rules, learning_rate=schedule, name="stage2-lm-warmup")
    info = dict(steps=res.step, final_train_loss=res.final_train_loss, sentences=len(pairs),
                zones=bool(w.zones), resumed_from=res.resumed_from)
    name = heldout_split(s2, splits)
    if name is not None and int(w.num_eval) > 0:
        scored = score_heldout_products(res.state.params["lm"], model_cfg, tok, splits, name,
                                        int(w.num_eval), int(w.max_len), seed,
                                        "config.stage2.lm_warmup.max_len", mesh, rules)
        info.update(eval_split=name, eval_sentences=scored["sentences"],
                    count_within_tol=scored["within_tol"], count_exact=scored["exact"])
        if scored["sentences"]:
            logging.info("stage2: after the LM warm-up the count is within tolerance on %.1f%% "
                         "of %d held-out sentences (exact %.1f%%)",
                         100 * info["count_within_tol"], info["eval_sentences"],
                         100 * info["count_exact"])
    return res.state.params["lm"], info


def rehearse_products(s2, dialogue_batches, tok, splits, train_indices, seed):
    """config.stage2.product_rehearsal: the dialogue batches with a batch of the training
    maps' product sentences each (lm_warmup.WithSentences). -> (iterator, info)."""
    r = s2.product_rehearsal
    pairs = lm_warmup.product_pairs(splits["train"].maps, train_indices, zones=bool(r.zones))
    if len(pairs) < int(r.pack):
        raise ValueError(f"config.stage2.product_rehearsal.pack={int(r.pack)}: the training "
                         f"maps give {len(pairs)} product sentences, fewer than one row (maps "
                         "without dies give none)")
    rows = lm_warmup.pack_pairs(pairs, int(r.pack), seed + 17)        # int[M/K,K,2]
    toks, mask, _, lens = lm_warmup.encode_sentences(
        tok, rows, int(r.max_len), int(tok.pad_token_id),
        field="config.stage2.product_rehearsal.max_len", die_line=bool(r.die_line))
    sentences = lm_warmup.SentenceBatches(toks, mask, lens, global_batch_size=int(r.batch_size),
                                          seed=seed + 13, process_index=jax.process_index(),
                                          process_count=jax.process_count())
    logging.info("stage2: product rehearsal on %d sentences (zones %s, die line %s) in rows "
                 "of %d, %d rows per step, weight %.2f", rows.size // 2, bool(r.zones),
                 bool(r.die_line), int(r.pack), int(r.batch_size), float(r.weight))
    return (lm_warmup.WithSentences(dialogue_batches, sentences),
            dict(weight=float(r.weight), sentences=rows.size // 2, batch_size=int(r.batch_size),
                 zones=bool(r.zones), pack=int(r.pack), die_line=bool(r.die_line)))


def score_rehearsal(s2, lm_params, model_cfg, tok, splits, seed, mesh, rules) -> dict:
    """After a rehearsed stage 2: the trained LM alone on num_eval held-out maps' product
    sentences (score_heldout_products) -> report fields (empty when there is nothing to
    score)."""
    r = s2.product_rehearsal
    name = heldout_split(s2, splits)
    if name is None or int(r.num_eval) == 0:
        return {}
    scored = score_heldout_products(lm_params, model_cfg, tok, splits, name, int(r.num_eval),
                                    int(r.max_len), seed,
                                    "config.stage2.product_rehearsal.max_len", mesh, rules,
                                    die_line=bool(r.die_line))
    if scored["sentences"]:
        logging.info("stage2: after the rehearsed stage 2 the LM alone writes the count within "
                     "tolerance on %.1f%% of %d held-out sentences (exact %.1f%%)",
                     100 * scored["within_tol"], scored["sentences"], 100 * scored["exact"])
    return dict(eval_split=name, eval_sentences=scored["sentences"],
                count_within_tol=scored["within_tol"], count_exact=scored["exact"])


# ------------------------------------------------------------------------------- run
def run(config, workdir, mesh=None) -> dict:
    t0 = time.time()
    s2 = stage_cfg(config)
    if s2.count_form not in COUNT_FORMS:          # before anything is created or written
        raise ValueError(f"config.stage2.count_form={s2.count_form!r}: expected one of "
                         f"{COUNT_FORMS}")
    if s2.zone_form not in ZONE_FORMS:
        raise ValueError(f"config.stage2.zone_form={s2.zone_form!r}: expected one of "
                         f"{ZONE_FORMS}")
    for group, name in (("question_frames", "prob"), ("question_noise", "dialogue_prob"),
                        ("question_noise", "word_prob"), ("question_noise", "pseudo_share")):
        check_probability(f"config.stage2.{group}.{name}", s2[group][name])
    check_drill_config(s2.count_drills.prob, s2.count_drills.turns)
    check_loss_weight(s2.numeric_loss_weight)
    lm_warmup.check_warmup_config(s2.lm_warmup, s2.count_form, s2.zone_form)
    lm_warmup.check_rehearsal_config(s2.product_rehearsal, s2.count_form, s2.zone_form)
    rules = shd.rules_from_config(config)
    if mesh is None:
        from wamglm_jax.parallel.mesh import make_mesh
        mesh = make_mesh(config.mesh)
    shd.check_batch(int(s2.batch_size), mesh, "config.stage2.batch_size")
    if int(s2.lm_warmup.num_steps) > 0:
        shd.check_batch(int(s2.lm_warmup.batch_size), mesh, "config.stage2.lm_warmup.batch_size")
    product_weight = float(s2.product_rehearsal.weight)
    if product_weight > 0:
        shd.check_batch(int(s2.product_rehearsal.batch_size), mesh,
                        "config.stage2.product_rehearsal.batch_size")
    workdir = epath.Path(workdir).absolute()
    stage_dir = workdir / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)
    report_path = stage_dir / "report.json"
    num_steps = int(s2.loop.num_steps)
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("steps") == num_steps:
            logging.info("stage2: %s is finished (step %d); keeping its report", stage_dir,
                         num_steps)
            return report

    # 1. data, dialogues, tokenizer
    kb = load_knowledge_base(s2.kb_path or None)
    splits = load_splits(config.data)
    seed = int(config.seed)
    train_indices = capped_indices(splits["train"].labels, int(s2.max_per_class), seed,
                                   str(s2.class_scaling))
    items = {"train": build_dialogues(splits["train"], seed=seed, per_map=int(s2.per_map),
                                      heldout=False, kb=kb, id_prefix="train-",
                                      count_form=str(s2.count_form),
                                      zone_form=str(s2.zone_form), indices=train_indices)}
    for k, name in enumerate(("val", "test")):
        if splits.get(name) is not None:
            items[name] = build_dialogues(splits[name], seed=seed + 17 + k, per_map=1,
                                          heldout=float(s2.eval_heldout_fraction), kb=kb,
                                          id_prefix=f"{name}-",
                                          count_form=str(s2.count_form),
                                          zone_form=str(s2.zone_form))
    items["train"], n_framed = frame_questions(items["train"], seed=seed,
                                               prob=float(s2.question_frames.prob))
    if n_framed:
        logging.info("stage2: neutral frames around %d training questions (prob %.2f)", n_framed,
                     float(s2.question_frames.prob))
    drills = build_count_drills(splits["train"], prob=float(s2.count_drills.prob),
                                turns=s2.count_drills.turns, seed=seed, indices=train_indices,
                                count_form=str(s2.count_form), zone_form=str(s2.zone_form),
                                id_prefix="train-drill-")
    if drills:
        logging.info("stage2: %d count drills of %d exchanges (prob %.2f)", len(drills),
                     int(s2.count_drills.turns), float(s2.count_drills.prob))
    tok, tok_path = get_tokenizer(s2, workdir, items["train"] + drills)
    qn = s2.question_noise
    items["train"], n_noised = noise_questions(items["train"], seed=seed,
                                               dialogue_prob=float(qn.dialogue_prob),
                                               word_prob=float(qn.word_prob),
                                               pseudo_share=float(qn.pseudo_share))
    if n_noised:
        logging.info("stage2: question-wording noise on %d of %d training dialogues "
                     "(word_prob %.2f, made-up word share %.2f)", n_noised, len(items["train"]),
                     float(qn.word_prob), float(qn.pseudo_share))
    items["train"] += drills                    # after the noise: drills are never noised
    imported_lm = None
    if s2.init_lm_from:
        model_cfg, imported_lm = import_lm(config, s2, tok)
    else:
        model_cfg = model_config_for(config, tok)
    if jax.process_index() == 0:
        (stage_dir / "vmqa").mkdir(exist_ok=True)
        for name, its in items.items():
            write_jsonl(its, os.fspath(stage_dir / "vmqa" / f"{name}.jsonl"))
        written = ml_collections.ConfigDict(config.to_dict())
        written.stage2 = ml_collections.ConfigDict(s2.to_dict())   # with the defaults filled
        (stage_dir / "config.json").write_text(       # in: what the run used (answer_forms)
            written.to_json_best_effort(indent=2, sort_keys=True))
        (stage_dir / "model_config.json").write_text(json.dumps(
            dict(model=model_cfg.to_dict(),
                 # relative to the workdir when it lies inside (the run dir can move)
                 tokenizer=(os.path.relpath(tok_path, os.fspath(workdir))
                            if os.path.abspath(tok_path).startswith(os.fspath(workdir) + os.sep)
                            else tok_path),
                 lora_alpha=float(s2.lora.alpha)), indent=2, sort_keys=True))
    nimg = num_image_tokens(model_cfg)
    enc, enc_stats = qenc.encode_items(tok, items["train"], num_image_tokens=nimg,
                                       max_len=int(s2.max_len))
    numeric = numeric_token_mask(tok, int(model_cfg.lm.vocab_size))          # bool[V]
    numeric_weight = float(s2.numeric_loss_weight)
    enc_stats["numeric_loss_tokens"] = int(sum((numeric[e["tokens"]] & (e["loss_mask"] > 0)
                                                ).sum() for e in enc))
    logging.info("stage2: %d train dialogues, %d tokens (%d loss tokens, %d with a digit, "
                 "loss weight %.2f), %d truncated; vocab %d (model %d), image token %d",
                 enc_stats["samples"], enc_stats["tokens"], enc_stats["loss_tokens"],
                 enc_stats["numeric_loss_tokens"], numeric_weight, enc_stats["truncated"],
                 len(tok), model_cfg.lm.vocab_size, model_cfg.image_token_id)
    bounds = qenc.bucket_boundaries(int(s2.max_len), min_bucket=min(64, int(s2.max_len)))
    pad_id = int(tok.pad_token_id)
    image_size = int(model_cfg.vit.image_size)
    nproc = jax.process_count()

    def batches(encoded, seed_):
        return DialogueBatches(encoded, splits["train"].maps, image_size=image_size,
                               batch_size=int(s2.batch_size), pad_id=pad_id,
                               boundaries=bounds, seed=seed_,
                               process_index=jax.process_index(), process_count=nproc)

    # 2. model and initial params
    model = WamGLM(model_cfg)
    params, shardings = init_params(model, model_cfg, mesh, rules, seed)
    if imported_lm is not None:
        params["lm"] = jax.device_put(jax.tree.map(jnp.asarray, imported_lm), shardings["lm"])
        logging.info("stage2: LM initialised from %s", s2.init_lm_from)
    warmup_info = None
    if int(s2.lm_warmup.num_steps) > 0:
        params["lm"], warmup_info = warm_up_lm(s2, params, model_cfg, tok, splits, train_indices,
                                               workdir=workdir, mesh=mesh, rules=rules,
                                               seed=seed)
    vision_source = "random init"
    if s2.init_vision_from_stage1:
        src = find_stage1_checkpoint(workdir)
        params["vision"] = restore_stage1_vision(src, params["vision"])
        vision_source = src
        logging.info("stage2: vision tower restored from %s", src)
    alpha = float(s2.lora.alpha)
    lora_on = int(s2.lora.rank) > 0
    token_weights = (None if numeric_weight == 1.0 else
                     np.where(numeric, numeric_weight, 1.0).astype(np.float32))
    train_step = make_train_step(model, alpha, token_weights)
    align_info = None
    if int(s2.align.num_steps) > 0:
        a_enc, _ = qenc.encode_items(tok, describe_items(items["train"]), num_image_tokens=nimg,
                                     max_len=int(s2.max_len))
        a_cfg = _opt_cfg(s2, False, trainable=("^projector/",), freeze=(),
                         learning_rate=float(s2.align.learning_rate))
        a_state, a_sched = make_state(params, a_cfg, int(s2.align.num_steps), mesh, rules, seed)
        a_loop = loop.default_loop_config(num_steps=int(s2.align.num_steps),
                                          log_every=int(s2.align.log_every),
                                          checkpoint_every=0, eval_every=0)
        a_res = loop.train_loop(stage_dir=workdir / ALIGN, cfg=a_loop, state=a_state,
                                train_step=train_step, train_iter=batches(a_enc, seed + 5),
                                mesh=mesh, rules=rules, batch_fn=_batch_fn(model_cfg),
                                learning_rate=a_sched, name="stage2-align")
        params["projector"] = a_res.state.params["projector"]
        align_info = dict(steps=a_res.step, final_train_loss=a_res.final_train_loss)
    if lora_on:
        lo = attach_lora(params, s2, model_cfg, mesh, seed)
        logging.info("stage2: LoRA rank %d on %d kernels (%d adapter parameters)",
                     int(s2.lora.rank), len(jax.tree.leaves(lo)) // 2, lora_lib.count(lo))
    state, schedule = make_state(params, _opt_cfg(s2, lora_on), num_steps, mesh, rules, seed)
    mask = optim.trainable_mask(state.params, *(lambda c: (c.freeze, c.trainable))(
        _opt_cfg(s2, lora_on)))
    n_train = sum(int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(state.params),
                                                      jax.tree.leaves(mask)) if m)
    n_all = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    logging.info("stage2: %.3fM parameters, %.3fM trained", n_all / 1e6, n_train / 1e6)
    if product_weight > 0 and not any(
            m and lora_lib.path_str(p).startswith(("lm/", "lora/lm/"))
            for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]):
        raise ValueError(f"config.stage2.product_rehearsal.weight={product_weight}: no "
                         "language-model weight trains (config.stage2.optimizer freeze/"
                         "trainable, or LoRA without lora.lm_regex), so the product sentences "
                         "would change nothing; set weight=0 or let the LM train")

    # 3. train
    train_iter, rehearsal_info = batches(enc, seed), None
    if product_weight > 0:
        train_iter, rehearsal_info = rehearse_products(s2, train_iter, tok, splits,
                                                       train_indices, seed)
        train_step = make_train_step(model, alpha, token_weights, product_weight)
    t_loop = time.time()
    result = loop.train_loop(stage_dir=stage_dir, cfg=s2.loop, state=state,
                             train_step=train_step, train_iter=train_iter,
                             mesh=mesh, rules=rules, batch_fn=_batch_fn(model_cfg),
                             learning_rate=schedule, name="stage2")
    setup_seconds = t_loop - t0

    # 4. evaluate
    t_eval = time.time()
    plain = jax.device_get(lora_lib.merged_params(result.state.params, alpha))
    if rehearsal_info is not None:
        rehearsal_info.update(score_rehearsal(s2, plain["lm"], model_cfg, tok, splits, seed,
                                              mesh, rules))
    report = evaluate_and_report(
        stage=STAGE, config=config, s2=s2, workdir=workdir, stage_dir=stage_dir, mesh=mesh,
        rules=rules, model_cfg=model_cfg, params=plain, tok=tok, splits=splits, items=items, kb=kb,
        result=result, wall_seconds=result.wall_seconds + setup_seconds,
        t_eval=t_eval, extra=dict(vision_source=vision_source, align=align_info,
                                  lm_source=s2.init_lm_from or "random init",
                                  lm_warmup=warmup_info,
                                  product_rehearsal=rehearsal_info,
                                  lora=dict(s2.lora.to_dict()) if lora_on else None,
                                  trained_parameters=n_train, parameters=n_all,
                                  encode_stats=enc_stats, tokenizer=tok_path))
    return report
