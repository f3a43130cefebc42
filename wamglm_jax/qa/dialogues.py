"""WaferMapVMQA dialogue builder: grounded multi-turn dialogues from a WaferDataset.

Item format (one dict per dialogue, JSON-serialisable):
  id            str    f"{prefix}{image_index}-{k}"
  images        [str]  [f"{maps_name}#{image_index}"] (the map is row image_index of maps.npz)
  image_index   int    index of the map in the dataset the dialogue was built from
  messages      [{"role": "user"|"assistant", "content": str}], the first user turn starts
                with "<image>\n"; 2..6 user/assistant exchanges
  class         int    label id in `label_space`;  class_name str; label_space str
  heldout       bool   True: held-out phrasings and a held-out question order
  answer_key    [{"turn": i (index into messages of the assistant turn), "kind": str,
                  "value": ...}] one per assistant turn (kinds/values: see qa/answers.py)
  plan          [{"kind": str, "q": int, "zone": str|None, "pattern": str|None}] the question
                plan (zone: of zone_extent, pattern: of type_location), so the same
                dialogue can be re-rendered on a transformed map (transform_item)

Augmentation choice: maps rotated/flipped for stage 2 must use `transform_item`, which rebuilds
every answer (location sides, zone counts) from the transformed map with the same questions.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from wamglm_jax.data.labels import WM811K_CLASSES, class_names, defect_set
from wamglm_jax.qa import facts as F
from wamglm_jax.qa.answers import PATTERNS, render_answer
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


def answer_value(kind: str, step: dict, m: np.ndarray, types: list[str], facts: dict,
                 batch: dict, kb: KnowledgeBase) -> Any:
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
        return dict(batch)
    raise ValueError(f"unknown question kind {kind!r}")


def render_dialogue(m: np.ndarray, label_space: str, label: int, batch: dict, plan: list[dict],
                    heldout: bool, kb: KnowledgeBase) -> tuple[list[dict], list[dict]]:
    """Messages and answer key for `plan` on map `m` (facts recomputed from `m`)."""
    facts = F.compute_facts(m)
    types = sorted(defect_set(label_space, label), key=WM811K_CLASSES.index)
    bank = HELDOUT if heldout else TRAIN
    messages, key = [], []
    for t, step in enumerate(plan):
        q = bank[step["kind"]][step["q"]]
        if step.get("zone") or step.get("pattern"):
            q = q.format(zone=ZONE_WORDS.get(step.get("zone"), ""),
                         pattern=step.get("pattern"))
        if t == 0:
            q = f"{IMAGE_TOKEN}\n{q}"
        value = answer_value(step["kind"], step, m, types, facts, batch, kb)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": render_answer(step["kind"], value, kb)})
        key.append({"turn": len(messages) - 1, "kind": step["kind"], "value": value})
    return messages, key


def build_dialogues(dataset, *, seed: int = 0, per_map: int = 1,
                    heldout: bool | float = False, kb: KnowledgeBase | None = None,
                    maps_name: str = "maps.npz", id_prefix: str = "",
                    indices: Sequence[int] | None = None) -> list[dict]:
    """Dialogues for every map of `dataset` (attributes maps, labels, label_space, meta).
    heldout: False (train phrasings/orders), True (held-out ones), or a float in (0, 1): that
    fraction of dialogues, chosen at random, is held out. Deterministic given `seed`.
    Unlabeled maps (label -1) are skipped."""
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
        batch = F.batch_facts(i, dataset.labels, dataset.label_space, meta, lots)
        for k in range(per_map):
            ho = bool(heldout) if isinstance(heldout, bool) else bool(rng.random() < heldout)
            plan = sample_plan(rng, ho, sorted(defect_set(dataset.label_space, label)))
            try:
                messages, key = render_dialogue(dataset.maps[i], dataset.label_space, label,
                                                batch, plan, ho, kb)
            except ValueError as e:
                raise ValueError(f"{getattr(dataset, 'source', '') or 'dataset'}: map {i}: {e}"
                                 ) from None
            items.append({"id": f"{id_prefix}{i}-{k}", "images": [f"{maps_name}#{i}"],
                          "image_index": int(i), "messages": messages, "class": label,
                          "class_name": names[label], "label_space": dataset.label_space,
                          "heldout": ho, "answer_key": key, "plan": plan, "batch": batch})
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
    messages, key = render_dialogue(tm, item["label_space"], item["class"], item["batch"],
                                    item["plan"], item["heldout"], kb)
    new = dict(item, messages=messages, answer_key=key, id=f"{item['id']}-r{int(k_rot) % 4}"
               f"{'f' if flip else ''}")
    return new, tm
