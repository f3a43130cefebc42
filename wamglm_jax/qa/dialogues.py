"""WaferMapVMQA dialogue builder: grounded multi-turn dialogues from a WaferDataset.

Item format (one dict per dialogue, JSON-serialisable):
  id            str    f"{prefix}{image_index}-{k}"
  images        [str]  [f"{maps_name}#{image_index}"] (the map is row image_index of maps.npz)
  image_index   int    index of the map in the dataset the dialogue was built from
  messages      [{"role": "user"|"assistant", "content": str}], the first user turn starts
                with "<image>\n", then the context lines (map_context: the die count line,
                then, for maps with lot metadata only, the lot context line), each followed
                by "\n" (first_user_turn), then the question; 2..6 user/assistant exchanges
  class         int    label id in `label_space`;  class_name str; label_space str
  heldout       bool   True: held-out phrasings and a held-out question order
  answer_key    [{"turn": i (index into messages of the assistant turn), "kind": str,
                  "value": ...}] one per assistant turn (kinds/values: see qa/answers.py)
  plan          [{"kind": str, "q": int, "zone": str|None, "pattern": str|None}] the question
                plan (zone: of zone_extent, pattern: of type_location), so the same
                dialogue can be re-rendered on a transformed map (transform_item)
  lot_context   facts.lot_context of the map ({"lot": None} without lot metadata); the
                context line and the batch answers are rendered from it
  count_form, zone_form  the answer forms it was rendered with (answers.COUNT_FORMS,
                ZONE_FORMS)

Context lines: what a fab tool puts next to the map for the engineer, machine-rendered.
* Die count line ("The wafer has 2046 dies."): the product's gross die count, known for every
  map (it is the number of dies of the native-resolution map). The image is area-resized to
  S x S, so the die count cannot be read from it; failing-die and zone counts scale with it.
  With zone_form='share_first' it also gives the dies per radial zone ("... 2046 dies: 120 in
  the center, 806 in the middle ring and 1120 at the edge."), the totals of the zone answers.
* Lot context line (context_line): the dataset's other wafers of the lot.
map_context renders both, and the same function serves the chat (tools/chat.py through
dataset_context_line, inference.chat.ChatSession(context=...)), so count and batch questions are
answerable from the model's input: context lines + its own reading of the map.

Augmentation choice: maps rotated/flipped for stage 2 must use `transform_item`, which rebuilds
every answer (location sides, zone counts) from the transformed map with the same questions.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from wamglm_jax.data.labels import WM811K_CLASSES, class_names, defect_set
from wamglm_jax.qa import facts as F
from wamglm_jax.qa.answers import PATTERNS, ZONE_TEXT, check_forms, render_answer
from wamglm_jax.qa.knowledge_base import KnowledgeBase, load_knowledge_base
from wamglm_jax.qa.phrasings import HELDOUT, TRAIN, ZONE_WORDS

IMAGE_TOKEN = "<image>"
FIRST_KINDS = (("defect_type", 0.5), ("location", 0.1), ("count", 0.08), ("yield", 0.08),
               ("severity", 0.08), ("cause", 0.08), ("area", 0.08))
MAIN_KINDS = ("defect_type", "location", "type_location", "count", "yield", "area", "cause",
              "adjustment", "severity", "batch")
PRESENT_PATTERN_PROB = 0.7   # type_location asks about a pattern of the map this often
FOLLOWUPS = {"defect_type": "why_type", "severity": "why_severity", "location": "zone_extent",
             "count": "zone_extent"}
FOLLOWUP_PROB = 0.4
HELDOUT_ORDER_MOD = 5     # an order (kind sequence) is held out iff sha256 % 5 == 0


def order_is_heldout(kinds: Sequence[str]) -> bool:
    """Deterministic split of question orders: about 1 in 5 kind sequences is held out."""
    h = hashlib.sha256("|".join(kinds).encode()).hexdigest()
    return int(h, 16) % HELDOUT_ORDER_MOD == 0


def _sample_kinds(rng: np.random.Generator) -> list[str]:
    n = int(rng.integers(2, 7))
    names, w = zip(*FIRST_KINDS)
    kinds = [str(rng.choice(names, p=np.array(w) / sum(w)))]
    while len(kinds) < n:
        fu = FOLLOWUPS.get(kinds[-1])
        if fu and fu not in kinds and rng.random() < FOLLOWUP_PROB:
            kinds.append(fu)
            continue
        left = [k for k in MAIN_KINDS if k not in kinds]
        if not left:
            break
        kinds.append(str(rng.choice(left)))
    return kinds


def sample_plan(rng: np.random.Generator, heldout: bool, types: Sequence[str] = ()
                ) -> list[dict]:
    """A question plan whose order is held out iff `heldout` (rejection sampling); `types`:
    the map's patterns (type_location asks about one of them, or sometimes an absent one)."""
    while True:
        kinds = _sample_kinds(rng)
        if order_is_heldout(kinds) == heldout:
            break
    bank = HELDOUT if heldout else TRAIN
    plan = []
    for k in kinds:
        zone = str(rng.choice(list(ZONE_WORDS))) if k == "zone_extent" else None
        pattern = None
        if k == "type_location":
            pool = (list(types) if types and rng.random() < PRESENT_PATTERN_PROB
                    else [p for p in PATTERNS if p not in types])
            pattern = str(rng.choice(pool))
        plan.append({"kind": k, "q": int(rng.integers(len(bank[k]))), "zone": zone,
                     "pattern": pattern})
    return plan


def context_line(context: dict | None) -> str | None:
    """The lot context line for facts.lot_context(...) `context`, e.g. "Lot L7, wafer 3. Other
    wafers of this lot: 24 measured, 11 with failure patterns (Edge-Ring 9, Center 2)."
    (patterns by count, then class order); None without lot metadata."""
    if not context or context.get("lot") is None:
        return None
    wafer = context.get("wafer")
    head = f"Lot {context['lot']}" + (f", wafer {wafer}." if wafer is not None else ".")
    n, k = context["n_other"], context["n_patterned"]
    if n == 0:
        return f"{head} No other wafers of this lot were measured."
    counts = sorted(context["pattern_counts"].items(),
                    key=lambda pc: (-pc[1], WM811K_CLASSES.index(pc[0])))
    detail = f" ({', '.join(f'{p} {c}' for p, c in counts)})" if counts else ""
    return f"{head} Other wafers of this lot: {n} measured, {k} with failure patterns{detail}."


def die_total_line(n: int) -> str:
    """The die count line without zones, "The wafer has N dies."."""
    return f"The wafer has {n} dies."


def die_count_line(m: np.ndarray, zone_dies: bool = False) -> str:
    """"The wafer has N dies." for map uint8[H,W] (N = cells > 0, as facts.compute_facts).
    zone_dies (zone_form='share_first'): also the dies per radial zone, "The wafer has 2046
    dies: 120 in the center, 806 in the middle ring and 1120 at the edge." (facts' zones), so
    a zone answer's share has a die total to apply to, as the count answer has N."""
    n = int(np.count_nonzero(np.asarray(m)))
    if not zone_dies:
        return die_total_line(n)
    zones = F.compute_facts(m)["zones"]
    parts = [f"{zones[z]['dies']} {'at' if z == 'edge' else 'in'} {ZONE_TEXT[z]}"
             for z in ("center", "middle", "edge")]
    return f"The wafer has {n} dies: {parts[0]}, {parts[1]} and {parts[2]}."


def map_context(m: np.ndarray, lot_context: dict | None, zone_dies: bool = False) -> str:
    """The context lines of the first user turn: the die count line (with the dies per zone
    if zone_dies), then the lot context line when the map has lot metadata, joined by "\n"."""
    lot = context_line(lot_context)
    return die_count_line(m, zone_dies) + (f"\n{lot}" if lot else "")


def dataset_context_line(dataset, index: int, zone_dies: bool = False) -> str:
    """map_context of map `index` of a dataset (attributes maps, labels, label_space, meta);
    zone_dies as the model was trained (config.stage2.zone_form == 'share_first')."""
    return map_context(dataset.maps[int(index)],
                       F.lot_context(int(index), dataset.labels, dataset.label_space,
                                     getattr(dataset, "meta", None)), zone_dies)


def first_user_turn(question: str, context: str | None = None) -> str:
    """The first user message: `<image>`, the context lines if any, the question."""
    return (f"{IMAGE_TOKEN}\n{context}\n{question}" if context
            else f"{IMAGE_TOKEN}\n{question}")


def answer_value(kind: str, step: dict, m: np.ndarray, types: list[str], facts: dict,
                 lot_context: dict, kb: KnowledgeBase) -> Any:
    """The expected value of a `kind` answer (the answer_key value)."""
    keys = types or ["none"]
    zone, pattern = step.get("zone"), step.get("pattern")
    if kind == "defect_type":
        return list(types)
    if kind in ("why_type", "cause", "adjustment"):
        return {"kb_keys": keys}
    if kind == "location":
        return dict(facts["location"])
    if kind == "type_location":
        return F.type_location(m, pattern, types, facts)
    if kind == "zone_extent":
        return {"zone": zone, "failing": facts["zones"][zone]["failing"],
                "total": facts["zones"][zone]["dies"]}
    if kind == "count":
        return {"failing": facts["failing"], "total": facts["total"]}
    if kind == "yield":
        return {"yield_pct": facts["yield_pct"]}
    if kind == "area":
        return {"area_pct": facts["area_pct"]}
    if kind == "severity":
        e = kb.worst(types)
        return {"severity": e.severity, "kb_key": e.pattern}
    if kind == "why_severity":
        return {"kb_keys": [kb.worst(types).pattern]}
    if kind == "batch":
        return F.batch_answer(lot_context, types)
    raise ValueError(f"unknown question kind {kind!r}")


def question_template(step: dict, heldout: bool) -> str:
    """The phrasing a plan step asks, slots ({zone}, {pattern}) unfilled: from the held-out
    bank for held-out dialogues, else from the training one."""
    return (HELDOUT if heldout else TRAIN)[step["kind"]][int(step["q"])]


def render_dialogue(m: np.ndarray, label_space: str, label: int, lot_context: dict,
                    plan: list[dict], heldout: bool, kb: KnowledgeBase,
                    count_form: str = "share_first", zone_form: str = "count_first"
                    ) -> tuple[list[dict], list[dict]]:
    """Messages and answer key for `plan` on map `m` (facts recomputed from `m`)."""
    facts = F.compute_facts(m)
    types = sorted(defect_set(label_space, label), key=WM811K_CLASSES.index)
    messages, key = [], []
    for t, step in enumerate(plan):
        q = question_template(step, heldout)
        if step.get("zone") or step.get("pattern"):
            q = q.format(zone=ZONE_WORDS.get(step.get("zone"), ""),
                         pattern=step.get("pattern"))
        if t == 0:
            q = first_user_turn(q, map_context(m, lot_context,
                                               zone_dies=zone_form == "share_first"))
        value = answer_value(step["kind"], step, m, types, facts, lot_context, kb)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": render_answer(
            step["kind"], value, kb, count_form=count_form, zone_form=zone_form)})
        key.append({"turn": len(messages) - 1, "kind": step["kind"], "value": value})
    return messages, key


def build_dialogues(dataset, *, seed: int = 0, per_map: int = 1,
                    heldout: bool | float = False, kb: KnowledgeBase | None = None,
                    maps_name: str = "maps.npz", id_prefix: str = "",
                    indices: Sequence[int] | None = None,
                    count_form: str = "share_first", zone_form: str = "count_first"
                    ) -> list[dict]:
    """Dialogues for every map of `dataset` (attributes maps, labels, label_space, meta).
    heldout: False (train phrasings/orders), True (held-out ones), or a float in (0, 1): that
    fraction of dialogues, chosen at random, is held out. Deterministic given `seed`.
    Unlabeled maps (label -1) are skipped. count_form / zone_form: one of answers.COUNT_FORMS
    / ZONE_FORMS (kept in each item, so transform_item renders the same forms; zone_form
    'share_first' also lists the dies per zone in the die count line)."""
    check_forms("build_dialogues", count_form, zone_form)
    kb = kb or load_knowledge_base()
    rng = np.random.default_rng(seed)
    meta = getattr(dataset, "meta", None)
    lots = F.lot_index(meta)
    names = class_names(dataset.label_space)
    items = []
    for i in (range(len(dataset.maps)) if indices is None else indices):
        label = int(dataset.labels[i])
        if label < 0:       # unlabeled map: no ground truth to ground the answers on
            continue
        ctx = F.lot_context(i, dataset.labels, dataset.label_space, meta, lots)
        for k in range(per_map):
            ho = bool(heldout) if isinstance(heldout, bool) else bool(rng.random() < heldout)
            plan = sample_plan(rng, ho, sorted(defect_set(dataset.label_space, label)))
            try:
                messages, key = render_dialogue(dataset.maps[i], dataset.label_space, label,
                                                ctx, plan, ho, kb, count_form, zone_form)
            except ValueError as e:
                raise ValueError(f"{getattr(dataset, 'source', '') or 'dataset'}: map {i}: {e}"
                                 ) from None
            items.append({"id": f"{id_prefix}{i}-{k}", "images": [f"{maps_name}#{i}"],
                          "image_index": int(i), "messages": messages, "class": label,
                          "class_name": names[label], "label_space": dataset.label_space,
                          "heldout": ho, "answer_key": key, "plan": plan,
                          "lot_context": ctx, "count_form": count_form,
                          "zone_form": zone_form})
    return items


def transform_map(m: np.ndarray, k_rot: int, flip: bool) -> np.ndarray:
    """np.rot90 by k_rot (counter-clockwise), then a left-right flip if `flip`."""
    out = np.rot90(np.asarray(m), int(k_rot))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def transform_item(item: dict, m: np.ndarray, k_rot: int, flip: bool,
                   kb: KnowledgeBase | None = None) -> tuple[dict, np.ndarray]:
    """The item re-rendered for the rotated/flipped map (same questions; every answer, the
    location side in particular, recomputed on the transformed map). Returns (item, map)."""
    kb = kb or load_knowledge_base()
    tm = transform_map(m, k_rot, flip)
    messages, key = render_dialogue(tm, item["label_space"], item["class"],
                                    item["lot_context"], item["plan"], item["heldout"], kb,
                                    item.get("count_form", "count_first"),   # items without
                                    # the fields were built before the share-first forms
                                    item.get("zone_form", "count_first"))
    new = dict(item, messages=messages, answer_key=key, id=f"{item['id']}-r{int(k_rot) % 4}"
               f"{'f' if flip else ''}")
    return new, tm
