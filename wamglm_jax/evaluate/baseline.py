"""Template baseline: the stage-1 classifier + the knowledge base answering the same questions.

For each answer-key turn, the predicted class of the map (stage-1 argmax) replaces the true
class: the answer value is computed exactly as the dialogue builder computes it
(`qa.dialogues.answer_value`) but from the *predicted* defect set, rendered with the same
template sentence, parsed and scored like the model's answers (`evaluate.qa.score`).

Kinds a classifier cannot answer (failing-die counts, yield, area, location, zone extent:
facts of the map itself, not of its class) are reported as not applicable, so the comparison
is on the kinds that depend on the defect type: defect_type, type_location (presence), cause,
adjustment, why_type, severity, why_severity, and batch (the lot context line, which the
baseline is given like the model, combined with the predicted defect set).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from wamglm_jax.data.labels import WM811K_CLASSES, defect_set
from wamglm_jax.evaluate.qa import score, summarize
from wamglm_jax.qa import facts as F
from wamglm_jax.qa.answers import parse_answer, render_answer
from wamglm_jax.qa.dialogues import answer_value
from wamglm_jax.qa.knowledge_base import KnowledgeBase, load_knowledge_base

CLASS_KINDS = ("defect_type", "type_location", "cause", "adjustment", "why_type", "severity",
               "why_severity", "batch")


def baseline_records(items: Sequence[dict], maps, predicted: dict[int, int], label_space: str,
                     kb: KnowledgeBase | None = None) -> list[dict]:
    """predicted: {image_index: predicted class id}. One record per answerable turn."""
    kb = kb or load_knowledge_base()
    records = []
    for it in items:
        i = int(it["image_index"])
        m = maps[i]
        facts = F.compute_facts(m)
        types = sorted(defect_set(label_space, int(predicted[i])), key=WM811K_CLASSES.index)
        for step, key in zip(it["plan"], it["answer_key"]):
            kind = key["kind"]
            if kind not in CLASS_KINDS:
                continue
            value = answer_value(kind, step, m, types, facts,
                                 it.get("lot_context", {"lot": None}), kb)
            text = render_answer(kind, value, kb)
            parsed = parse_answer(kind, text, kb)
            records.append(dict(id=it["id"], turn=key["turn"], kind=kind, answer=text,
                                correct=bool(score(kind, parsed, key["value"], text)),
                                heldout=bool(it.get("heldout", False))))
    return records


def summarize_baseline(records: Sequence[dict], predicted: dict[int, int], labels) -> dict:
    """Per-kind accuracy over all records, and over the same training-phrasing (`seen`) and
    held-out-phrasing (`heldout`) answers the model's summary splits by (so the two can be
    compared answer for answer): the model's own `evaluate.qa.summarize`, applied to the
    baseline's records."""
    idx = sorted(predicted)
    cls_acc = float(np.mean([predicted[i] == int(labels[i]) for i in idx])) if idx else None
    s = summarize(records)
    return {"by_kind": s["by_kind"],
            "seen": {"by_kind": s["seen"]["by_kind"]},
            "heldout": {"by_kind": s["heldout"]["by_kind"]},
            "not_applicable": "count, zone_extent, yield, area, location (map facts, "
                              "not answerable from a class label)",
            "classifier_accuracy": cls_acc, "n_maps": len(idx)}


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under "A and B are equally accurate" each discordant
    pair (one right, the other wrong) is a fair coin, so min(only_a, only_b) follows
    Binomial(only_a + only_b, 1/2); p = min(1, 2 * P[X <= min]). 1.0 with no discordant pair."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    # exact integers, then one rounding: 2.0 ** n overflows a float beyond n = 1023
    return min(1.0, float(Fraction(2 * sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)))


def paired_comparison(model_records: Sequence[dict], baseline_recs: Sequence[dict],
                      kinds: Sequence[str] = CLASS_KINDS) -> dict:
    """Model against baseline answer for answer: per kind, over the (id, turn) pairs both
    answered, {n, model_accuracy, baseline_accuracy, model_only (model right, baseline wrong),
    baseline_only, p_value (mcnemar_exact_p)}. The two accuracies come from the same questions
    on the same maps, so their difference is not sampling noise between map sets; p_value
    says whether it exceeds what chance disagreement gives."""
    base = {(r["id"], r["turn"]): bool(r["correct"]) for r in baseline_recs}
    out = {}
    for kind in kinds:
        pairs = [(bool(r["correct"]), base[(r["id"], r["turn"])]) for r in model_records
                 if r["kind"] == kind and (r["id"], r["turn"]) in base]
        if not pairs:
            continue
        m = np.array(pairs, dtype=bool)                          # bool[n, 2]: model, baseline
        only_m, only_b = int((m[:, 0] & ~m[:, 1]).sum()), int((~m[:, 0] & m[:, 1]).sum())
        out[kind] = {"n": len(pairs), "model_accuracy": float(m[:, 0].mean()),
                     "baseline_accuracy": float(m[:, 1].mean()), "model_only": only_m,
                     "baseline_only": only_b, "p_value": mcnemar_exact_p(only_m, only_b)}
    return out


def run_baseline(config, workdir, mesh, rules, dataset, items: Sequence[dict],
                 kb: KnowledgeBase | None = None,
                 model_records: Sequence[dict] | None = None) -> dict:
    """Stage-1 predictions (best-on-val params) for the maps of `items`, then the template
    answers; returns summarize_baseline(...) plus the checkpoint used, and with the model's
    QA `model_records` (evaluate.qa records) their `paired` comparison."""
    from wamglm_jax.train import stage1

    idx = sorted({int(it["image_index"]) for it in items})
    if not idx:
        raise ValueError("run_baseline: no items")
    model, variables, source = load_stage1_classifier(config, workdir, mesh,
                                                      dataset.num_classes)
    sub = dataset.subset(idx)
    pred = stage1.predict(model, variables, sub, image_size=int(config.model.vit.image_size),
                          batch_size=64, mesh=mesh, rules=rules)
    predicted = {idx[int(j)]: int(p) for j, p in zip(pred["index"], pred["probs"].argmax(-1))}
    records = baseline_records(items, dataset.maps, predicted, dataset.label_space, kb)
    out = summarize_baseline(records, predicted, dataset.labels)
    out["checkpoint"] = source
    if model_records is not None:
        out["paired"] = paired_comparison(model_records, records)
    return out


def load_stage1_classifier(config, workdir, mesh, num_classes: int):
    """(Stage1Model, {'params','batch_stats'}, source) restored (replicated) from the stage-1
    `state` item (best-on-val if present, else latest) by an orbax partial restore of just
    params + batch_stats. Works inside an active mesh context."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from wamglm_jax.parallel import sharding as shd
    from wamglm_jax.train import stage1
    from wamglm_jax.train.stage2 import find_stage1_checkpoint

    model = stage1.build_model(config, num_classes)
    s = int(config.model.vit.image_size)
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, s, s, 3)), train=False),
                           jax.random.PRNGKey(0))
    rep = shd.replicated(mesh)
    plain = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, boxed,
                         is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), plain)
    target = {"params": target["params"], "batch_stats": target.get("batch_stats", {})}
    path = find_stage1_checkpoint(workdir)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    return model, out, path
