"""Stage 2: language fine-tuning on WaferMapVMQA, then QA evaluation and the template baseline.

    run(config, workdir, mesh) -> report dict; writes workdir/stage2/{checkpoints,logs,
    config.json, model_config.json, vmqa/*.jsonl, qa_records.jsonl, report.json, report.md}
    and workdir/tokenizer/ (trained here unless config.stage2.tokenizer_dir names one).

Steps:
1. load_splits(config.data) -> dialogues (qa.dialogues.build_dialogues; train with training
   phrasings, val/test with a held-out fraction) -> tokenizer -> config.model.image_token_id and
   lm.vocab_size (padded to a multiple of 128) from it -> encoded dialogues (assistant-only
   loss masks from the chat template) -> length-bucketed batches (a resumable iterator).
2. WamGLM, sharded init; the vision tower is restored from the stage-1 checkpoint
   (`restore_stage1_vision`: orbax partial restore of `state` -> params/vision, best-on-val
   checkpoint if there is one, else the latest), the projector optionally from a short
   alignment phase (`workdir/stage2_align/`: only the projector trains, on "describe this
   map" dialogues), the LM from its init or from a local Hugging Face Llama-family dir
   (config.stage2.init_lm_from, via export/from_hf; use that LM's tokenizer with
   tokenizer_dir, the vocabulary grows to fit `<image>` and the padding).
3. What trains is set by regexes (config.stage2.optimizer.freeze / trainable; default: vision
   frozen). LoRA (config.stage2.lora.rank > 0) adds adapters under params['lora'] for kernels
   matching lora.lm_regex / lora.vision_regex; they are applied inside the jitted forward
   (models.lora.apply_lora) and checkpoints keep them unmerged; by default only adapters and
   the projector train then. Loss: token cross-entropy on assistant tokens only.
4. train.loop.train_loop (checkpointing, resume, metrics, NaN guard, SIGTERM) in workdir/stage2.
5. Evaluation on config.stage2.eval.split (evaluate.qa: teacher-forced history, per kind,
   whole dialogue, held-out phrasings separately) and the stage-1 + KB template baseline
   (evaluate.baseline); report.json/.md with example dialogues.
"""
from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from wamglm_jax.data.preprocess import area_resize_onehot
from wamglm_jax.data.splits import load_splits
from wamglm_jax.models import lora as lora_lib
from wamglm_jax.models.wamglm import WamGLM, check_image_tokens, num_image_tokens
from wamglm_jax.parallel import sharding as shd
from wamglm_jax.qa import encode as qenc
from wamglm_jax.qa.answers import COUNT_FORMS
from wamglm_jax.qa.augment import noise_questions
from wamglm_jax.qa.dialogues import build_dialogues
from wamglm_jax.qa.io import write_jsonl
from wamglm_jax.qa.knowledge_base import load_knowledge_base
from wamglm_jax.qa.tokenizer import build_tokenizer, image_token_id, load_tokenizer
from wamglm_jax.train import loop, optim
from wamglm_jax.train.checkpoint import saved_tree
from wamglm_jax.train.state import TrainState

STAGE = "stage2"
ALIGN = "stage2_align"


def default_stage2_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        batch_size=16,              # global batch of dialogues
        max_len=512,                # tokens per dialogue (<= model.lm.max_seq_len)
        per_map=1,                  # dialogues per training map
        count_form="share_first",   # count answers: 'share_first' ("8.4% of the 2046 dies
                                    # fail, which is 171 dies.") or 'count_first' ("171 of
                                    # the 2046 dies fail."); README "Share first"
        max_per_class=0,            # > 0: at most this many training maps per class (seeded)
        class_scaling="flat",       # with max_per_class: 'flat' (every class capped at it) or
                                    # 'sqrt' (the largest class gets max_per_class maps, class c
                                    # max_per_class * sqrt(n_c / n_max): stage 1's sqrt prior)
        question_noise=dict(dialogue_prob=0.5, word_prob=0.25),   # qa/augment.py; 0 = off
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


# ------------------------------------------------------------------------------- data
def get_tokenizer(s2, workdir, train_items):
    """config.stage2.tokenizer_dir, else workdir/tokenizer (trained there if absent)."""
    if s2.tokenizer_dir:
        return load_tokenizer(s2.tokenizer_dir, s2.chat_template or None), s2.tokenizer_dir
    path = os.path.join(os.fspath(workdir), "tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return load_tokenizer(path), path
    if jax.process_index() == 0:
        tok = build_tokenizer(train_items, path, vocab_size=int(s2.vocab_size))
    if jax.process_count() > 1:   # multi-host: the others load what process 0 wrote
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("stage2 tokenizer")
        if jax.process_index() != 0:
            tok = load_tokenizer(path)
    return tok, path


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


def capped_indices(labels, cap: int, seed: int, scaling: str = "flat"):
    """Training maps per class, sorted indices (None = all maps when cap <= 0), seeded.
    'flat': at most `cap` random maps of each class; 'sqrt': the largest class gets `cap`,
    class c round(cap * sqrt(n_c / n_max)) (at least 1, at most n_c), so the classes keep the
    square-root prior stage 1's balanced sampling trains the classifier with."""
    if scaling not in ("flat", "sqrt"):
        raise ValueError(f"config.stage2.class_scaling={scaling!r}: expected 'flat' or 'sqrt'")
    if cap <= 0:
        return None
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    out = []
    for c, n in zip(classes, counts):
        k = cap if scaling == "flat" else max(1, int(round(cap * np.sqrt(n / counts.max()))))
        out.extend(rng.permutation(np.flatnonzero(labels == c))[:k].tolist())
    return sorted(out)


def describe_items(items):
    """Caption-like dialogues for the projector-alignment phase: one question, the answers of
    the item's type/location/extent turns joined as the description."""
    out = []
    for it in items:
        parts = [it["messages"][k["turn"]]["content"] for k in it["answer_key"]
                 if k["kind"] in ("defect_type", "location", "count", "yield", "area")]
        if not parts:
            parts = [it["messages"][it["answer_key"][0]["turn"]]["content"]]
        msgs = [{"role": "user", "content": "<image>\nDescribe this wafer map."},
                {"role": "assistant", "content": " ".join(parts)}]
        out.append(dict(it, id=f"{it['id']}-describe", messages=msgs))
    return out


class DialogueBatches:
    """Endless, resumable iterator of bucketed batches (epoch e shuffled with seed + e).

    Batches: image float32[B,S,S,3], tokens/loss_mask/attention_mask int32[B,T], valid int32[B]
    (rows with valid 0 fill the last batch of a bucket and carry no loss)."""

    def __init__(self, encoded, maps, *, image_size, batch_size, pad_id, boundaries, seed):
        self.encoded, self.maps = encoded, maps
        self.s, self.b, self.pad, self.bounds, self.seed = (image_size, batch_size, pad_id,
                                                            boundaries, seed)
        self.epoch, self.pos = 0, 0
        self._batches = None

    def _epoch(self):
        if self._batches is None:
            self._batches = list(qenc.bucketed_batches(
                self.encoded, self.b, self.pad, self.bounds, seed=self.seed + self.epoch))

    def __iter__(self):
        return self

    def __next__(self):
        self._epoch()
        if self.pos >= len(self._batches):
            self.epoch, self.pos, self._batches = self.epoch + 1, 0, None
            self._epoch()
        batch = dict(self._batches[self.pos])
        self.pos += 1
        batch["image"] = images_for(self.maps, batch["image_index"], self.s)
        return batch

    def get_state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state):
        self.epoch, self.pos, self._batches = int(state["epoch"]), int(state["pos"]), None


def images_for(maps, index, size):
    """float32[B,S,S,3] for map indices (index < 0: an empty row -> zeros)."""
    out = np.zeros((len(index), size, size, 3), np.float32)
    for r, i in enumerate(np.asarray(index)):
        if i >= 0:
            out[r] = area_resize_onehot(maps[int(i)], size)
    return out


# ------------------------------------------------------------------------------- model
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


def effective_params(params, alpha):
    """Params with LoRA applied (when params holds a 'lora' subtree) for model.apply."""
    if "lora" not in params:
        return params
    base = {k: v for k, v in params.items() if k != "lora"}
    return lora_lib.apply_lora(base, params["lora"], alpha)


def merged_params(params, alpha):
    """Plain WamGLM params (LoRA merged) for inference/export."""
    if "lora" not in params:
        return params
    base = {k: v for k, v in params.items() if k != "lora"}
    return lora_lib.merge(base, params["lora"], float(alpha))


def lm_loss(logits, tokens, loss_mask):
    """Mean token CE of positions t-1 -> tokens[t] where loss_mask[t] == 1; and token accuracy."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)    # float[B,T-1,V]
    tgt = tokens[:, 1:]
    w = loss_mask[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    n = jnp.maximum(w.sum(), 1.0)
    acc = ((jnp.argmax(logp, -1) == tgt) * w).sum() / n
    return (nll * w).sum() / n, acc, w.sum()


def make_train_step(model, alpha):
    def train_step(state: TrainState, batch):
        mask = batch["loss_mask"] * batch["valid"][:, None]

        def loss_fn(params):
            logits = model.apply({"params": effective_params(params, alpha)}, batch["image"],
                                 batch["tokens"], batch["attention_mask"])
            loss, acc, n = lm_loss(logits, batch["tokens"], mask)
            return loss, (acc, n)

        (loss, (acc, n)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads)
        return state, dict(loss=loss, token_accuracy=acc, loss_tokens=n,
                           grad_norm=optax.global_norm(grads))
    return train_step


def _batch_fn(model_cfg):
    def fn(b):
        check_image_tokens(b["tokens"][b["valid"] > 0], model_cfg)
        return {k: b[k] for k in ("image", "tokens", "loss_mask", "attention_mask", "valid")}
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


# ------------------------------------------------------------------------------- run
def run(config, workdir, mesh=None) -> dict:
    t0 = time.time()
    s2 = stage_cfg(config)
    if s2.count_form not in COUNT_FORMS:          # before anything is created or written
        raise ValueError(f"config.stage2.count_form={s2.count_form!r}: expected one of "
                         f"{COUNT_FORMS}")
    rules = shd.rules_from_config(config)
    if mesh is None:
        from wamglm_jax.parallel.mesh import make_mesh
        mesh = make_mesh(config.mesh)
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
    items = {"train": build_dialogues(splits["train"], seed=seed, per_map=int(s2.per_map),
                                      heldout=False, kb=kb, id_prefix="train-",
                                      count_form=str(s2.count_form),
                                      indices=capped_indices(splits["train"].labels,
                                                             int(s2.max_per_class), seed,
                                                             str(s2.class_scaling)))}
    for k, name in enumerate(("val", "test")):
        if splits.get(name) is not None:
            items[name] = build_dialogues(splits[name], seed=seed + 17 + k, per_map=1,
                                          heldout=float(s2.eval_heldout_fraction), kb=kb,
                                          id_prefix=f"{name}-",
                                          count_form=str(s2.count_form))
    tok, tok_path = get_tokenizer(s2, workdir, items["train"])
    qn = s2.question_noise
    items["train"], n_noised = noise_questions(items["train"], seed=seed,
                                               dialogue_prob=float(qn.dialogue_prob),
                                               word_prob=float(qn.word_prob))
    if n_noised:
        logging.info("stage2: question-wording noise on %d of %d training dialogues "
                     "(word_prob %.2f)", n_noised, len(items["train"]), float(qn.word_prob))
    imported_lm = None
    if s2.init_lm_from:
        model_cfg, imported_lm = import_lm(config, s2, tok)
    else:
        model_cfg = model_config_for(config, tok)
    if jax.process_index() == 0:
        (stage_dir / "vmqa").mkdir(exist_ok=True)
        for name, its in items.items():
            write_jsonl(its, os.fspath(stage_dir / "vmqa" / f"{name}.jsonl"))
        (stage_dir / "config.json").write_text(
            ml_collections.ConfigDict(config.to_dict()).to_json_best_effort(indent=2,
                                                                            sort_keys=True))
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
    logging.info("stage2: %d train dialogues, %d tokens (%d loss tokens), %d truncated; "
                 "vocab %d (model %d), image token %d", enc_stats["samples"],
                 enc_stats["tokens"], enc_stats["loss_tokens"], enc_stats["truncated"],
                 len(tok), model_cfg.lm.vocab_size, model_cfg.image_token_id)
    shd.check_batch(int(s2.batch_size), mesh, "config.stage2.batch_size")
    bounds = qenc.bucket_boundaries(int(s2.max_len), min_bucket=min(64, int(s2.max_len)))
    pad_id = int(tok.pad_token_id)
    image_size = int(model_cfg.vit.image_size)
    nproc = jax.process_count()

    def batches(encoded, seed_):
        return DialogueBatches(encoded, splits["train"].maps, image_size=image_size,
                               batch_size=int(s2.batch_size) // nproc, pad_id=pad_id,
                               boundaries=bounds, seed=seed_)

    # 2. model and initial params
    model = WamGLM(model_cfg)
    params, shardings = init_params(model, model_cfg, mesh, rules, seed)
    if imported_lm is not None:
        params["lm"] = jax.device_put(jax.tree.map(jnp.asarray, imported_lm), shardings["lm"])
        logging.info("stage2: LM initialised from %s", s2.init_lm_from)
    vision_source = "random init"
    if s2.init_vision_from_stage1:
        src = find_stage1_checkpoint(workdir)
        params["vision"] = restore_stage1_vision(src, params["vision"])
        vision_source = src
        logging.info("stage2: vision tower restored from %s", src)
    alpha = float(s2.lora.alpha)
    lora_on = int(s2.lora.rank) > 0
    train_step = make_train_step(model, alpha)
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

    # 3. train
    t_loop = time.time()
    result = loop.train_loop(stage_dir=stage_dir, cfg=s2.loop, state=state,
                             train_step=train_step, train_iter=batches(enc, seed),
                             mesh=mesh, rules=rules, batch_fn=_batch_fn(model_cfg),
                             learning_rate=schedule, name="stage2")
    setup_seconds = t_loop - t0

    # 4. evaluate
    t_eval = time.time()
    plain = jax.device_get(merged_params(result.state.params, alpha))
    report = evaluate_and_report(
        config=config, s2=s2, workdir=workdir, stage_dir=stage_dir, mesh=mesh, rules=rules,
        model_cfg=model_cfg, params=plain, tok=tok, splits=splits, items=items, kb=kb,
        result=result, wall_seconds=result.wall_seconds + setup_seconds,
        t_eval=t_eval, extra=dict(vision_source=vision_source, align=align_info,
                                  lm_source=s2.init_lm_from or "random init",
                                  lora=dict(s2.lora.to_dict()) if lora_on else None,
                                  trained_parameters=n_train, parameters=n_all,
                                  encode_stats=enc_stats, tokenizer=tok_path))
    return report


# ------------------------------------------------------------------------------- report
def evaluate_and_report(*, config, s2, workdir, stage_dir, mesh, rules, model_cfg, params, tok,
                        splits, items, kb, result, wall_seconds, t_eval, extra) -> dict:
    """QA evaluation of the model and of the baseline on config.stage2.eval.split; writes
    qa_records.jsonl, qa.png, report.json and report.md (process 0)."""
    from wamglm_jax.evaluate import baseline as bl
    from wamglm_jax.evaluate import qa as qa_eval
    from wamglm_jax.evaluate.classification import atomic_write_text

    ev = s2.eval
    split = ev.split if ev.split in items else "val"
    pool = items[split]
    pick = np.random.default_rng(int(config.seed) + 99).permutation(len(pool))[:int(ev.num_maps)]
    eval_items = [pool[i] for i in sorted(pick)]        # a seeded random sample of the split
    ndev = shd.axis_size(mesh, shd.BATCH_AXES)
    bs = -(-int(ev.batch_size) // ndev) * ndev
    summary, records = qa_eval.evaluate_model(
        model_cfg, params, tok, eval_items, splits[split].maps,
        max_new_tokens=int(ev.max_new_tokens), batch_size=bs,
        progress=lambda m: logging.info("stage2 %s", m))
    logging.info("stage2 %s QA: turn accuracy %.3f, dialogue accuracy %.3f (%d dialogues); "
                 "held-out phrasings %s", split, summary["turn_accuracy"],
                 summary["dialogue_accuracy"], summary["n_dialogues"],
                 summary["heldout"]["turn_accuracy"])
    baseline = None
    if ev.baseline:
        try:
            baseline = bl.run_baseline(config, workdir, mesh, rules, splits[split], eval_items, kb,
                                       model_records=records)
        except FileNotFoundError as e:
            logging.warning("stage2: no baseline: %s", e)
            baseline = {"error": str(e)}
    report = {}
    if jax.process_index() == 0:
        write_jsonl(records, os.fspath(stage_dir / "qa_records.jsonl"))
        png = qa_eval.plot_qa(summary, baseline if baseline and "by_kind" in baseline else None,
                              result.history, os.fspath(stage_dir / "qa.png"))
        report = dict(
            stage=STAGE, steps=int(result.step), final_train_loss=result.final_train_loss,
            wall_seconds=float(wall_seconds + time.time() - t_eval), eval_split=split,
            qa=summary["by_kind"], qa_summary={k: v for k, v in summary.items() if k != "by_kind"},
            baseline=baseline, examples=qa_eval.example_dialogues(records, eval_items,
                                                                  int(ev.num_examples)),
            plot=png, history=result.history, **extra)
        report = json.loads(json.dumps(report, default=_json_default))
        atomic_write_text(os.fspath(stage_dir / "report.json"), json.dumps(report, indent=2) + "\n")
        atomic_write_text(os.fspath(stage_dir / "report.md"), report_markdown(report))
        logging.info("stage2: report %s", stage_dir / "report.json")
        print(sample_dialogue_text(report), flush=True)
    return report


def sample_dialogue_text(report: dict) -> str:
    """The first example dialogue as plain text (printed at the end of stage 2)."""
    if not report.get("examples"):
        return ""
    ex = report["examples"][0]
    lines = [f"--- sample dialogue ({ex['id']}, true class {ex['class']}) ---"]
    for t in ex["turns"]:
        if "user" in t:
            lines.append(f"Q: {t['user']}")
        else:
            lines.append(f"A: {t['model']}" + ("" if t["correct"] is None else
                                                 "   [correct]" if t["correct"] else
                                                 f"   [wrong; reference: {t['reference']}]"))
    return "\n".join(lines)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def report_markdown(r: dict) -> str:
    lines = [f"# Stage 2 report", "",
             f"- steps: {r['steps']}, final train loss: {r['final_train_loss']}, "
             f"wall: {r['wall_seconds']:.0f} s",
             f"- evaluated on `{r['eval_split']}`: {r['qa_summary']['n_dialogues']} dialogues, "
             f"{r['qa_summary']['n_turns']} answers (teacher-forced history)",
             f"- answer accuracy {_pct(r['qa_summary']['turn_accuracy'])}, whole-dialogue "
             f"accuracy {_pct(r['qa_summary']['dialogue_accuracy'])}; held-out phrasings: "
             f"{_pct(r['qa_summary']['heldout']['turn_accuracy'])} "
             f"(dialogues {_pct(r['qa_summary']['heldout']['dialogue_accuracy'])})",
             ]
    ans = r["qa_summary"].get("answerable") or {}
    if ans.get("excluded_kinds"):     # kinds the model's input cannot answer (none by default)
        lines.append(f"- without {', '.join(ans['excluded_kinds'])} (not answerable from the "
                     f"model's input): answer accuracy {_pct(ans['turn_accuracy'])}, "
                     f"whole-dialogue {_pct(ans['dialogue_accuracy'])}")
    lines += [f"- vision tower: {r.get('vision_source')}", "",
              "| kind | WamGLM | n | training phrasings | held-out phrasings | "
              "stage-1 + KB baseline (training / held-out) |",
              "|---|---|---|---|---|---|"]
    b = r.get("baseline") or {}
    base = b.get("by_kind", {})
    bseen = b.get("seen", {}).get("by_kind", {})
    bho = b.get("heldout", {}).get("by_kind", {})
    ho = r["qa_summary"]["heldout"]["by_kind"]
    seen = r["qa_summary"].get("seen", {}).get("by_kind", {})

    def cell(d, k):
        return _pct(d[k]["accuracy"]) if k in d else "n/a"

    for k, v in r["qa"].items():
        split = f" ({cell(bseen, k)} / {cell(bho, k)})" if k in bseen or k in bho else ""
        lines.append(f"| {k} | {_pct(v['accuracy'])} | {v['n']} | {cell(seen, k)} | "
                     f"{cell(ho, k)} | {cell(base, k)}{split} |")
    cd = r["qa_summary"].get("count_diagnostics") or {}
    if cd.get("n_count_answers"):
        bins = ", ".join(f"{k} failing: {_pct(v['accuracy'])} (n={v['n']})"
                         for k, v in cd["by_failing"].items() if v["n"])
        med = cd["median_rel_error"]
        lines += ["", f"Failing-die counts ({cd['n_count_answers']} answers): die count copied "
                      f"from the context line {_pct(cd['die_count_copied'])}; implied failing "
                      f"share within 10% {_pct(cd['share_within_tol'])}; median relative error "
                      f"{'n/a' if med is None else f'{100 * med:.1f}%'}; within tolerance by "
                      f"true count: {bins}."]
        if cd.get("n_stated"):
            lines[-1] += (f" Share-first answers ({cd['n_stated']}): stated share within 10% "
                          f"{_pct(cd['share_stated_within_tol'])}; count within 10% of the "
                          f"stated share of the stated die count "
                          f"{_pct(cd['product_within_tol'])}; counts within tolerance had they "
                          f"been that product exactly {_pct(cd['exact_product_accuracy'])}.")
    if r.get("baseline") and "classifier_accuracy" in r["baseline"]:
        lines += ["", f"Baseline classifier accuracy on these maps: "
                      f"{_pct(r['baseline']['classifier_accuracy'])} "
                      f"({r['baseline'].get('checkpoint')}); not applicable to the baseline: "
                      f"{r['baseline']['not_applicable']}."]
    paired = b.get("paired") or {}
    if paired:
        lines += ["", "Answer for answer (the same questions on the same maps; p: exact McNemar "
                      "test of equal accuracy on the answers where exactly one is right):", "",
                  "| kind | n | WamGLM | baseline | only WamGLM right | only baseline right | p |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {_pct(v['model_accuracy'])} | "
                  f"{_pct(v['baseline_accuracy'])} | {v['model_only']} | {v['baseline_only']} | "
                  f"{v['p_value']:.3g} |" for k, v in paired.items()]
    lines += ["", f"![QA accuracy]({os.path.basename(r['plot'])})", "", "## Example dialogues"]
    for ex in r.get("examples", []):
        lines += ["", f"### {ex['id']} ({ex['class']}, held-out phrasing: {ex['heldout']})", ""]
        for t in ex["turns"]:
            if "user" in t:
                lines.append(f"- **Q:** {t['user']}")
            else:
                mark = "" if t["correct"] is None else (" (correct)" if t["correct"] else
                                                        " (wrong)")
                lines.append(f"  - reference: {t['reference']}")
                lines.append(f"  - model{mark}: {t['model']}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- inference
def load_for_inference(workdir, step: int | None = None):
    """(model_cfg, plain params on one device, tokenizer) from workdir/stage2: the model config
    and tokenizer the run wrote, and params/ of the latest (or given) checkpoint's `state`
    (orbax partial restore of just the params, shapes from the checkpoint metadata), with
    LoRA adapters merged."""
    stage_dir = epath.Path(workdir).absolute() / STAGE
    mc = stage_dir / "model_config.json"
    if not mc.exists():
        raise FileNotFoundError(f"{mc}: not found; is {workdir} a stage-2 run directory?")
    meta = json.loads(mc.read_text())
    model_cfg = ml_collections.ConfigDict(meta["model"])
    tok_dir = meta["tokenizer"]
    if not os.path.isabs(tok_dir):
        tok_dir = os.path.join(os.fspath(epath.Path(workdir).absolute()), tok_dir)
    tok = load_tokenizer(tok_dir)
    ckdir = stage_dir / "checkpoints"
    steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) \
        if ckdir.exists() else []
    if not steps:
        raise FileNotFoundError(f"{ckdir}: no stage-2 checkpoint; train stage 2 first")
    step = steps[-1] if step is None else int(step)
    path = os.fspath(ckdir / str(step) / "state")
    pmeta = saved_tree(path)["params"]
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), dict(pmeta))}
    with ocp.PyTreeCheckpointer() as ckptr:
        params = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))["params"]
    params = merged_params(params, float(meta.get("lora_alpha", 16.0)))
    return model_cfg, params, tok
