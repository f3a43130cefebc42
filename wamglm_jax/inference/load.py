"""A trained stage-2 run directory as (model config, params, tokenizer) for inference, chat
and export: what `workdir/stage2` wrote (model_config.json, the tokenizer it names, the latest
or a given checkpoint's params), with LoRA adapters merged; and `answer_forms`, the count and
zone answer forms the run was trained with (the chat's context lines depend on them)."""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from wamglm_jax.models import lora as lora_lib
from wamglm_jax.qa.tokenizer import load_tokenizer
from wamglm_jax.train.checkpoint import saved_tree

STAGE2_DIR = "stage2"     # train/stage2.py writes its run under workdir/STAGE2_DIR


def load_for_inference(workdir, step: int | None = None):
    """(model_cfg, plain params on one device, tokenizer) from workdir/stage2: the model config
    and tokenizer the run wrote, and params/ of the latest (or given) checkpoint's `state`
    (orbax partial restore of just the params, shapes from the checkpoint metadata), with
    LoRA adapters merged."""
    stage_dir = epath.Path(workdir).absolute() / STAGE2_DIR
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
    params = lora_lib.merged_params(params, float(meta.get("lora_alpha", 16.0)))
    return model_cfg, params, tok


def answer_forms(workdir) -> dict:
    """{"count_form", "zone_form"} of the stage-2 run in `workdir` (its stage2/config.json,
    which has every stage-2 field filled in since zone_form exists). An older file without a
    field gets the default of the time: zone_form 'count_first' (the only form before), and
    count_form 'share_first' (the default since count_form exists; runs from before it were
    'count_first', and their file cannot tell the two apart). zone_form 'share_first' means
    the model expects the dies per zone in the die count line:
    qa.dialogues.dataset_context_line(..., zone_dies=True)."""
    from wamglm_jax.qa.answers import COUNT_FORMS, ZONE_FORMS

    path = epath.Path(workdir).absolute() / STAGE2_DIR / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is {workdir} a stage-2 run directory?")
    try:
        s2 = json.loads(path.read_text()).get("stage2") or {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    out = {"count_form": s2.get("count_form", "share_first"),
           "zone_form": s2.get("zone_form", "count_first")}
    for name, allowed in (("count_form", COUNT_FORMS), ("zone_form", ZONE_FORMS)):
        if out[name] not in allowed:
            raise ValueError(f"{path}: stage2.{name}={out[name]!r}; expected one of {allowed}")
    return out
