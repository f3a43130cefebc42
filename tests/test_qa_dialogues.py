"""WaferMapVMQA dialogues: every answer checked against an independent recomputation (plain
loops over the map, written from the definitions in qa/facts.py's docstring)."""
import math

import numpy as np
import pytest

from wamglm_jax.data.dataset import WaferDataset
from wamglm_jax.data.generator import generate
from wamglm_jax.data.labels import WM811K_CLASSES, defect_set
from wamglm_jax.qa import phrasings
from wamglm_jax.qa.answers import parse_answer
from wamglm_jax.qa.dialogues import build_dialogues, order_is_heldout, transform_item
from wamglm_jax.qa.knowledge_base import load_knowledge_base

KB = load_knowledge_base()


def loops_facts(m):
    """Independent recomputation with loops."""
    H, W = m.shape
    dies = [(r, c) for r in range(H) for c in range(W) if m[r, c] > 0]
    fails = [(r, c) for (r, c) in dies if m[r, c] == 2]
    total, failing = len(dies), len(fails)
    cy = sum(r for r, _ in dies) / total
    cx = sum(c for _, c in dies) / total
    dist = {(r, c): math.sqrt((r - cy) ** 2 + (c - cx) ** 2) for r, c in dies}
    rmax = max(dist.values()) or 1.0
    zone_dies = {"center": 0, "middle": 0, "edge": 0}
    zone_fail = {"center": 0, "middle": 0, "edge": 0}
    for d in dies:
        rho = dist[d] / rmax
        z = "center" if rho < 0.3 else ("middle" if rho < 0.8 else "edge")
        zone_dies[z] += 1
        zone_fail[z] += m[d] == 2
    if failing == 0:
        zones, side = [], None
    else:
        dens = {z: zone_fail[z] / zone_dies[z] for z in zone_dies if zone_dies[z] > 0}
        top = max(dens.values())
        if top < 1.3 * failing / total:
            zones = ["spread"]
        else:
            zones = [z for z in ("center", "middle", "edge") if z in dens
                     and dens[z] >= 0.6 * top and dens[z] >= 1.3 * failing / total
                     and zone_fail[z] >= 3] or ["spread"]
        side = loops_side(fails, cy, cx)
    edge_fails = [d for d in fails if dist[d] / rmax >= 0.8]
    return dict(total=total, failing=failing,
                yield_pct=round(100 * (total - failing) / total, 1),
                area_pct=round(100 * failing / total, 1), zone_dies=zone_dies,
                zone_fail=zone_fail, zones=zones, side=side,
                edge_side=loops_side(edge_fails, cy, cx) if edge_fails else None)


def loops_side(fails, cy, cx):
    q = {"upper-left": 0, "upper-right": 0, "lower-left": 0, "lower-right": 0}
    for r, c in fails:
        q[("upper" if r < cy else "lower") + "-" + ("left" if c < cx else "right")] += 1
    for name in ("upper-left", "upper-right", "lower-left", "lower-right"):
        if q[name] >= 0.5 * len(fails):
            return name
    halves = {"upper": q["upper-left"] + q["upper-right"],
              "lower": q["lower-left"] + q["lower-right"],
              "left": q["upper-left"] + q["lower-left"],
              "right": q["upper-right"] + q["lower-right"]}
    for name in ("upper", "lower", "left", "right"):
        if halves[name] >= 0.7 * len(fails):
            return name
    return "none"


def loops_type_location(f, pattern, types):
    if pattern not in types:
        return {"pattern": pattern, "present": False, "zones": None, "side": None}
    if pattern == "Center":
        zones, side = ["center"], None
    elif pattern == "Donut":
        zones, side = ["middle"], None
    elif pattern == "Edge-Ring":
        zones, side = ["edge"], "all around"
    elif pattern in ("Near-full", "Random"):
        zones, side = ["spread"], None
    elif pattern == "Edge-Loc":
        zones, side = ["edge"], f["edge_side"]
    elif len(types) == 1:
        zones, side = f["zones"], f["side"]
    else:
        zones, side = None, None
    return {"pattern": pattern, "present": True, "zones": zones, "side": side}


def expected_value(kind, step, m, label_space, label, lot_info):
    f = loops_facts(m)
    types = sorted(defect_set(label_space, label), key=WM811K_CLASSES.index)
    keys = types or ["none"]
    sev_rank = {s: i for i, s in enumerate(KB.severity_levels)}
    worst = max(keys, key=lambda p: (sev_rank[KB[p].severity], -WM811K_CLASSES.index(p)))
    return {
        "defect_type": lambda: types,
        "why_type": lambda: {"kb_keys": keys},
        "cause": lambda: {"kb_keys": keys},
        "adjustment": lambda: {"kb_keys": keys},
        "location": lambda: {"zones": f["zones"], "side": f["side"]},
        "type_location": lambda: loops_type_location(f, step["pattern"], types),
        "zone_extent": lambda: {"zone": step["zone"], "failing": f["zone_fail"][step["zone"]],
                                "total": f["zone_dies"][step["zone"]]},
        "count": lambda: {"failing": f["failing"], "total": f["total"]},
        "yield": lambda: {"yield_pct": f["yield_pct"]},
        "area": lambda: {"area_pct": f["area_pct"]},
        "severity": lambda: {"severity": KB[worst].severity, "kb_key": worst},
        "why_severity": lambda: {"kb_keys": [worst]},
        "batch": lambda: lot_info,
    }[kind]()


def loops_lot(ds, i):
    lot = ds.meta[i].get("lot")
    if lot is None or lot == "":
        return {"lot": None}
    mine = defect_set(ds.label_space, int(ds.labels[i]))
    members = [j for j in range(len(ds)) if ds.meta[j].get("lot") == lot]
    share = 0
    for j in members:
        if j != i:
            other = defect_set(ds.label_space, int(ds.labels[j]))
            share += (len(mine & other) > 0) if mine else (len(other) == 0)
    return {"lot": str(lot), "n_wafers": len(members), "n_sharing": share,
            "patterned": (len(mine) > 0) if len(members) > 1 else None}


def disc(H, W):
    yy, xx = np.mgrid[:H, :W]
    m = np.zeros((H, W), np.uint8)
    m[(yy - (H - 1) / 2) ** 2 + (xx - (W - 1) / 2) ** 2 <= (min(H, W) / 2) ** 2] = 1
    return m, yy, xx


def hand_dataset():
    maps = []
    m, yy, xx = disc(21, 21)
    c = m.copy(); c[(m > 0) & ((yy - 10) ** 2 + (xx - 10) ** 2 <= 6)] = 2; maps.append(c)
    e = m.copy(); e[(m > 0) & (yy < 5) & (xx > 14)] = 2; maps.append(e)    # upper-right edge
    maps.append(m.copy())                                                   # clean
    r = m.copy(); r[(m > 0) & ((yy * 7 + xx * 3) % 11 == 0)] = 2; maps.append(r)
    meta = [dict(lot="L1", wafer_index=1, die_size=None), dict(lot="L1", wafer_index=2,
            die_size=None), dict(lot=None, wafer_index=None, die_size=None),
            dict(lot="L2", wafer_index=1, die_size=None)]
    return WaferDataset(maps=maps, labels=np.array([0, 2, 8, 6]), label_space="wm811k",
                        meta=meta)


def check_items(ds, items):
    assert items
    for it in items:
        msgs = it["messages"]
        assert 2 <= len(msgs) // 2 <= 6 and len(msgs) % 2 == 0
        assert msgs[0]["role"] == "user" and msgs[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in msgs) == 1
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert len(it["answer_key"]) == len(msgs) // 2
        i = it["image_index"]
        assert it["class"] == int(ds.labels[i])
        lot = loops_lot(ds, i)
        for step, key in zip(it["plan"], it["answer_key"]):
            exp = expected_value(key["kind"], step, ds.maps[i], ds.label_space, it["class"], lot)
            assert key["value"] == exp, (it["id"], key)
            parsed = parse_answer(key["kind"], msgs[key["turn"]]["content"], KB)
            if key["kind"] == "severity":
                exp = {"severity": exp["severity"]}
            assert parsed == exp, (it["id"], key["kind"], msgs[key["turn"]]["content"])


@pytest.mark.parametrize("label_space", ["wm811k", "mixedwm38"])
def test_answers_match_independent_recomputation(label_space):
    ds = generate(40, seed=5, label_space=label_space)
    check_items(ds, build_dialogues(ds, seed=1, per_map=2, heldout=0.3))


def test_hand_maps_known_answers():
    ds = hand_dataset()
    items = build_dialogues(ds, seed=0, per_map=6)
    check_items(ds, items)
    f = loops_facts(ds.maps[0])
    assert f["zones"] == ["center"] and f["failing"] == 21
    f = loops_facts(ds.maps[1])
    assert f["zones"] == ["edge"] and f["side"] == "upper-right"
    assert loops_facts(ds.maps[2])["zones"] == [] and loops_facts(ds.maps[3])["zones"] == ["spread"]
    batch = {it["image_index"]: k["value"] for it in items for k in it["answer_key"]
             if k["kind"] == "batch"}
    texts = [it["messages"][k["turn"]]["content"] for it in items for k in it["answer_key"]
             if k["kind"] == "batch" and it["image_index"] == 2]
    if 2 in batch:   # the wafer without a lot: explicit cannot-tell, no invented lot
        assert batch[2] == {"lot": None} and all("cannot tell" in t for t in texts)
    if 0 in batch:
        assert batch[0] == {"lot": "L1", "n_wafers": 2, "n_sharing": 0, "patterned": True}


def test_no_lot_gives_cannot_tell():
    ds = hand_dataset()
    ds.meta = [dict(lot=None, wafer_index=None, die_size=None) for _ in ds.maps]
    items = build_dialogues(ds, seed=3, per_map=20)
    seen = 0
    for it in items:
        for k in it["answer_key"]:
            if k["kind"] == "batch":
                seen += 1
                assert k["value"] == {"lot": None}
                assert "cannot tell" in it["messages"][k["turn"]]["content"]
                assert "Lot " not in it["messages"][k["turn"]]["content"]
    assert seen > 0


def test_heldout_phrasings_and_orders_never_in_training():
    ds = generate(30, seed=2, label_space="mixedwm38")
    train = build_dialogues(ds, seed=0, per_map=10, heldout=False)
    held = build_dialogues(ds, seed=1, per_map=3, heldout=True)
    zones = phrasings.ZONE_WORDS.values()
    pats = [p for p in WM811K_CLASSES if p != "none"]
    held_q = {q.format(zone=z, pattern=p) for v in phrasings.HELDOUT.values() for q in v
              for z in zones for p in pats}
    train_q = {q.format(zone=z, pattern=p) for v in phrasings.TRAIN.values() for q in v
               for z in zones for p in pats}
    assert not held_q & train_q
    for it in train:
        assert not it["heldout"] and not order_is_heldout([s["kind"] for s in it["plan"]])
        for m in it["messages"]:
            if m["role"] == "user":
                assert m["content"].replace("<image>\n", "") not in held_q
    used = set()
    for it in held:
        assert it["heldout"] and order_is_heldout([s["kind"] for s in it["plan"]])
        for m in it["messages"]:
            if m["role"] == "user":
                q = m["content"].replace("<image>\n", "")
                assert q in held_q
                used.add(q)
    assert len(used) > 10
    kinds = {k["kind"] for it in train for k in it["answer_key"]}
    assert kinds == {"defect_type", "why_type", "location", "type_location", "zone_extent",
                     "count", "yield",
                     "area", "cause", "adjustment", "severity", "why_severity", "batch"}


def test_transform_recomputes_location():
    ds = hand_dataset()
    items = build_dialogues(ds, seed=0, per_map=1, indices=[1])
    it = dict(items[0], plan=[{"kind": "location", "q": 0, "zone": None},
                              {"kind": "zone_extent", "q": 0, "zone": "edge"}])
    for k_rot, flip, side in [(0, False, "upper-right"), (1, False, "upper-left"),
                              (2, False, "lower-left"), (0, True, "upper-left")]:
        new, tm = transform_item(it, ds.maps[1], k_rot, flip)
        f = loops_facts(tm)
        assert f["side"] == side
        assert new["answer_key"][0]["value"] == {"zones": f["zones"], "side": side}
        assert new["answer_key"][1]["value"]["failing"] == f["zone_fail"]["edge"]
        assert side in new["messages"][1]["content"]


def test_unlabeled_maps_skipped():
    ds = hand_dataset()
    ds.labels = np.array([0, -1, 8, -1], np.int32)
    items = build_dialogues(ds, seed=0)
    assert sorted(it["image_index"] for it in items) == [0, 2]


def test_type_location_cases():
    ds = generate(40, seed=9, label_space="mixedwm38")
    items = build_dialogues(ds, seed=4, per_map=4)
    vals = [k["value"] for it in items for k in it["answer_key"] if k["kind"] == "type_location"]
    assert any(not v["present"] for v in vals)                        # absent pattern asked
    assert any(v["present"] and v["zones"] is None for v in vals)     # cannot tell (overlap)
    assert any(v["pattern"] == "Edge-Loc" and v["present"] and v["side"] for v in vals)
    hd = hand_dataset()
    it = dict(build_dialogues(hd, seed=0, indices=[1])[0],
              plan=[{"kind": "type_location", "q": 0, "zone": None, "pattern": "Edge-Loc"}])
    new, _ = transform_item(it, hd.maps[1], 0, False)
    assert new["answer_key"][0]["value"] == {"pattern": "Edge-Loc", "present": True,
                                             "zones": ["edge"], "side": "upper-right"}
    assert new["messages"][0]["content"] == "<image>\nWhere is the Edge-Loc pattern?"


def test_map_without_dies_names_index():
    from types import SimpleNamespace
    m = np.zeros((5, 5), np.uint8)
    ds = SimpleNamespace(maps=[disc(9, 9)[0], m], labels=np.array([8, 8]), label_space="wm811k",
                         meta=None, source="mem")
    with pytest.raises(ValueError, match="mem: map 1: .*at least one die"):
        build_dialogues(ds)


def test_batch_answers_all_cases():
    ds = hand_dataset()
    ds.labels = np.array([0, 8, 8, 6], np.int32)   # wafer 1 of lot L1 is normal now
    for i, text in [(0, "Lot L1 has 2 wafers in the data; 0 of the other 1 share a defect type"),
                    (1, "Lot L1 has 2 wafers in the data; 0 of the other 1 are also free"),
                    (2, "I cannot tell from this map"), (3, "Lot L2 has only this wafer")]:
        it = build_dialogues(ds, seed=0, indices=[i])[0]
        it = dict(it, plan=[{"kind": "batch", "q": 0, "zone": None, "pattern": None}])
        new, _ = transform_item(it, ds.maps[i], 0, False)
        assert new["answer_key"][0]["value"] == loops_lot(ds, i)
        assert new["messages"][1]["content"].startswith(text)
        assert parse_answer("batch", new["messages"][1]["content"]) == loops_lot(ds, i)


def test_single_pattern_map_without_failing_dies():
    """A map labelled Edge-Loc / Loc / Scratch whose dies are all good: every kind renders
    (no invented location) and matches the loop recomputation."""
    m, _, _ = disc(15, 15)
    plans = [("location", "type_location", "zone_extent", "count", "yield", "area"),
             ("defect_type", "severity", "batch")]
    for label in (2, 4, 7):                       # Edge-Loc, Loc, Scratch
        ds = WaferDataset(maps=[m], labels=np.array([label]), label_space="wm811k",
                          meta=[dict(lot=None, wafer_index=None, die_size=None)])
        it = build_dialogues(ds, seed=0)[0]
        for kinds in plans:
            plan = [{"kind": k, "q": 0, "zone": "edge", "pattern": WM811K_CLASSES[label]}
                    for k in kinds]
            new, _ = transform_item(dict(it, plan=plan), m, 0, False)
            check_items(ds, [dict(new, plan=plan)])
        ask = [{"kind": "type_location", "q": 0, "zone": None, "pattern": WM811K_CLASSES[label]}]
        tl, _ = transform_item(dict(it, plan=ask), m, 0, False)
        if label != 2:
            assert tl["answer_key"][0]["value"] == {"pattern": WM811K_CLASSES[label],
                                                    "present": True, "zones": [], "side": None}
            assert "no failing dies" in tl["messages"][1]["content"]
