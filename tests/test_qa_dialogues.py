"""WaferMapVMQA dialogues: every answer checked against an independent recomputation (plain
loops over the map, written from the definitions in qa/facts.py's docstring)."""
import math
import re

import numpy as np
import pytest

from wamglm_jax.data.dataset import WaferDataset
from wamglm_jax.data.generator import generate
from wamglm_jax.data.labels import WM811K_CLASSES, defect_set
from wamglm_jax.evaluate.qa import score
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


def loops_lot_counts(ds, i):
    """(lot, wafer index, n other labeled wafers, n with a pattern, {pattern: n}) by a loop
    over the whole dataset; None without lot metadata."""
    lot = ds.meta[i].get("lot")
    if lot is None or lot == "":
        return None
    n_other = n_pat = 0
    per = {}
    for j in range(len(ds.maps)):
        if j == i or ds.meta[j].get("lot") != lot or ds.labels[j] < 0:
            continue
        n_other += 1
        other = defect_set(ds.label_space, int(ds.labels[j]))
        n_pat += len(other) > 0
        for p in other:
            per[p] = per.get(p, 0) + 1
    return str(lot), ds.meta[i].get("wafer_index"), n_other, n_pat, per


def loops_context_line(ds, i):
    c = loops_lot_counts(ds, i)
    if c is None:
        return None
    lot, wafer, n, k, per = c
    head = f"Lot {lot}." if wafer is None else f"Lot {lot}, wafer {wafer}."
    if n == 0:
        return head + " No other wafers of this lot were measured."
    ranked = sorted(per, key=lambda p: (-per[p], WM811K_CLASSES.index(p)))
    detail = (" (" + ", ".join(f"{p} {per[p]}" for p in ranked) + ")") if ranked else ""
    return f"{head} Other wafers of this lot: {n} measured, {k} with failure patterns{detail}."


def loops_lot(ds, i):
    """The batch answer value, recomputed: per own pattern, the other wafers showing it;
    lot-wide iff some count >= 2 and >= 20% of the other wafers."""
    c = loops_lot_counts(ds, i)
    if c is None:
        return {"lot": None}
    lot, _, n, k, per = c
    if n == 0:
        return {"lot": lot, "n_other": 0}
    mine = sorted(defect_set(ds.label_space, int(ds.labels[i])), key=WM811K_CLASSES.index)
    if not mine:
        return {"lot": lot, "n_other": n, "n_patterned": k}
    shared = {p: per.get(p, 0) for p in mine}
    wide = False
    for p in mine:
        if shared[p] >= 2 and shared[p] * 5 >= n:
            wide = True
    return {"lot": lot, "n_other": n, "shared": shared, "lot_wide": wide}


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
        ctx = loops_context_line(ds, it["image_index"])
        first = msgs[0]["content"][len("<image>\n"):].split("\n")
        dies = sum(int(v > 0) for row in ds.maps[it["image_index"]] for v in row)
        die_line = f"The wafer has {dies} dies."
        if it.get("zone_form", "count_first") == "share_first":    # the dies per zone too
            zd = loops_facts(ds.maps[it["image_index"]])["zone_dies"]
            die_line = (f"The wafer has {dies} dies: {zd['center']} in the center, "
                        f"{zd['middle']} in the middle ring and {zd['edge']} at the edge.")
        assert first == ([die_line] + ([ctx] if ctx else [])
                         + [first[-1]]), (it["id"], msgs[0]["content"])
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
            if key["kind"] == "count" and it["count_form"] == "share_first":   # share, to 0.1
                assert parsed.pop("pct") == round(100 * exp["failing"] / exp["total"], 1)
            if (key["kind"] == "zone_extent" and it.get("zone_form") == "share_first"
                    and exp["total"] > 0):
                assert parsed.pop("pct") == round(100 * exp["failing"] / exp["total"], 1)
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
        assert batch[0] == {"lot": "L1", "n_other": 1, "shared": {"Center": 0},
                            "lot_wide": False}
    first = {it["image_index"]: it["messages"][0]["content"] for it in items}
    dies = f"The wafer has {int(disc(21, 21)[0].sum())} dies.\n"   # every hand map: one disc
    assert first[0].startswith(f"<image>\n{dies}Lot L1, wafer 1. Other wafers of this lot: 1 "
                               "measured, 1 with failure patterns (Edge-Loc 1).\n")
    assert first[3].startswith(f"<image>\n{dies}Lot L2, wafer 1. No other wafers of this lot "
                               "were measured.\n")
    assert first[2].startswith(f"<image>\n{dies}") and "Lot" not in first[2]
    assert first[2].count("\n") == 2                 # no lot: the die count line only


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
        first = it["messages"][0]["content"]
        assert first.count("\n") == 2 and "Lot" not in first    # the die count line only
        assert first.split("\n")[2] in phrasings.TRAIN[it["plan"][0]["kind"]] or \
            it["plan"][0]["kind"] == "type_location"
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
            if m["role"] == "user":       # the question: the last line (after a context line)
                assert m["content"].split("\n")[-1] not in held_q
    used = set()
    for it in held:
        assert it["heldout"] and order_is_heldout([s["kind"] for s in it["plan"]])
        for m in it["messages"]:
            if m["role"] == "user":
                q = m["content"].split("\n")[-1]
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
    assert new["messages"][0]["content"] == ("<image>\nThe wafer has 349 dies.\nLot L1, wafer 2. "
                                             "Other wafers of this lot: 1 measured, 1 with "
                                             "failure patterns (Center 1).\nWhere is the "
                                             "Edge-Loc pattern?")


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
    for i, text in [(0, "0 of the 1 other wafer in lot L1 show the same Center pattern, so it "
                        "looks isolated"),
                    (1, "This wafer shows no defect pattern; 1 of the 1 other wafer in lot L1 "
                        "has failure patterns."),
                    (2, "I cannot tell from this map"),
                    (3, "No other wafer of lot L2 was measured")]:
        it = build_dialogues(ds, seed=0, indices=[i])[0]
        it = dict(it, plan=[{"kind": "batch", "q": 0, "zone": None, "pattern": None}])
        new, _ = transform_item(it, ds.maps[i], 0, False)
        assert new["answer_key"][0]["value"] == loops_lot(ds, i)
        assert new["messages"][1]["content"].startswith(text)
        assert parse_answer("batch", new["messages"][1]["content"]) == loops_lot(ds, i)


def _lot_dataset(labels, label_space="wm811k", lot="LX0123"):
    m = disc(9, 9)[0]
    return WaferDataset(maps=[m] * len(labels), labels=np.array(labels, np.int32),
                        label_space=label_space,
                        meta=[dict(lot=lot, wafer_index=k + 1, die_size=None)
                              for k in range(len(labels))])


def test_lot_wide_vs_isolated_and_context_line():
    """A lot of 25: this wafer Edge-Ring (3), 9 others Edge-Ring, 2 Center, one unlabeled
    (left out), the rest none: lot-wide. With only 1 other Edge-Ring: isolated."""
    labels = [3] + [3] * 9 + [0] * 2 + [-1] + [8] * 12
    ds = _lot_dataset(labels)
    it = build_dialogues(ds, seed=0, indices=[0])[0]
    it = dict(it, plan=[{"kind": "batch", "q": 0, "zone": None, "pattern": None}])
    new, _ = transform_item(it, ds.maps[0], 0, False)
    dies = int((ds.maps[0] > 0).sum())
    assert new["messages"][0]["content"] == (
        f"<image>\nThe wafer has {dies} dies.\nLot LX0123, wafer 1. Other wafers of this lot: 23 measured, 11 with failure "
        "patterns (Edge-Ring 9, Center 2).\n" + phrasings.TRAIN["batch"][0])
    assert new["messages"][0]["content"].split("\n")[2] == loops_context_line(ds, 0)
    assert new["answer_key"][0]["value"] == loops_lot(ds, 0) == {
        "lot": "LX0123", "n_other": 23, "shared": {"Edge-Ring": 9}, "lot_wide": True}
    assert new["messages"][1]["content"] == (
        "9 of the 23 other wafers in lot LX0123 show the same Edge-Ring pattern, so the cause "
        "is likely lot-wide (a shared tool or process step).")
    ds2 = _lot_dataset([3, 3] + [8] * 10)
    new2, _ = transform_item(dict(it, lot_context=build_dialogues(ds2, indices=[0])[0][
        "lot_context"]), ds2.maps[0], 0, False)
    assert new2["answer_key"][0]["value"] == loops_lot(ds2, 0)
    assert new2["answer_key"][0]["value"]["lot_wide"] is False
    assert "isolated to this wafer" in new2["messages"][1]["content"]


def test_mixed_lot_context_counts_each_pattern():
    from wamglm_jax.data.labels import MIXEDWM38_CLASSES
    ids = {frozenset(v): k for k, v in enumerate(MIXEDWM38_CLASSES)}
    cs, c, s, none = (ids[frozenset({"Center", "Scratch"})], ids[frozenset({"Center"})],
                      ids[frozenset({"Scratch"})], ids[frozenset()])
    ds = _lot_dataset([cs, cs, c, c, s, none, none], label_space="mixedwm38")
    items = build_dialogues(ds, seed=2, per_map=3)
    check_items(ds, items)
    assert loops_context_line(ds, 0) == ("Lot LX0123, wafer 1. Other wafers of this lot: 6 "
                                         "measured, 4 with failure patterns (Center 3, "
                                         "Scratch 2).")
    assert loops_lot(ds, 0)["shared"] == {"Center": 3, "Scratch": 2}
    assert loops_lot(ds, 5) == {"lot": "LX0123", "n_other": 6, "n_patterned": 5}


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


def test_batch_answer_derivable_from_context_line_and_map():
    """The batch answer follows from what the model is given: the context line (parsed here
    with a regex) and the map's own patterns (the label the map shows)."""
    import re
    ds = generate(60, seed=11, label_space="mixedwm38")
    items = build_dialogues(ds, seed=5, per_map=2)
    seen = 0
    for it in items:
        lines = it["messages"][0]["content"].split("\n")
        key = [k for k in it["answer_key"] if k["kind"] == "batch"]
        if not key:
            continue
        seen += 1
        if len(lines) == 3:                       # die count line only, no lot: cannot tell
            assert key[0]["value"] == {"lot": None}
            continue
        ctx = lines[2]
        lot = re.match(r"Lot (\S+?)[,.]", ctx).group(1)
        m = re.search(r"(\d+) measured, (\d+) with failure patterns", ctx)
        n, k = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        per = {p: int(c) for p, c in re.findall(r"([A-Z][\w-]+) (\d+)", ctx.split("(")[-1])} \
            if "(" in ctx else {}
        mine = sorted(defect_set(ds.label_space, it["class"]), key=WM811K_CLASSES.index)
        if n == 0:
            want = {"lot": lot, "n_other": 0}
        elif not mine:
            want = {"lot": lot, "n_other": n, "n_patterned": k}
        else:
            shared = {p: per.get(p, 0) for p in mine}
            want = {"lot": lot, "n_other": n, "shared": shared,
                    "lot_wide": any(c >= 2 and 5 * c >= n for c in shared.values())}
        assert key[0]["value"] == want, (it["id"], ctx)
    assert seen > 5


def test_count_answer_share_first_and_older_form_parse():
    """The count sentence states the share, the die total and then the count; the parser reads
    it, and still reads the older "F of the N dies fail." (answers of earlier checkpoints)."""
    from wamglm_jax.qa.answers import render_answer
    text = render_answer("count", {"failing": 171, "total": 2046})
    assert text == "8.4% of the 2046 dies fail, which is 171 dies."      # 171/2046 = 8.36%
    assert parse_answer("count", text) == {"failing": 171, "total": 2046, "pct": 8.4}
    assert render_answer("count", {"failing": 1, "total": 300}).endswith("which is 1 die.")
    assert parse_answer("count", "171 of the 2046 dies fail.") == {"failing": 171,
                                                                   "total": 2046}
    assert parse_answer("count", "About 40 dies.") == {"failing": 40, "total": None}
    # a model's answer that states a share but a count inconsistent with it: the count is read
    assert parse_answer("count", "12.5% of the 800 dies fail, which is 90 dies.") == \
        {"failing": 90, "total": 800, "pct": 12.5}


def test_count_form_option_renders_each_form_and_survives_transform():
    ds = generate(12, seed=3, label_space="wm811k")
    for form, pattern in [("count_first", r"^\d+ of the \d+ dies fail\.$"),
                          ("share_first", r"^\d+\.\d% of the \d+ dies fail, which is \d+ dies?\.$")]:
        items = build_dialogues(ds, seed=0, per_map=6, count_form=form)
        counts = [(it, it["messages"][k["turn"]]["content"]) for it in items
                  for k in it["answer_key"] if k["kind"] == "count"]
        assert counts, "the plans drew no count question"
        for it, text in counts:
            assert re.match(pattern, text), (form, text)
        it = counts[0][0]
        new, _ = transform_item(it, ds.maps[it["image_index"]], 1, True)
        k = next(k for k in new["answer_key"] if k["kind"] == "count")
        assert re.match(pattern, new["messages"][k["turn"]]["content"])
    check_items(ds, build_dialogues(ds, seed=0, per_map=3, count_form="count_first"))
    with pytest.raises(ValueError, match="count_form 'share'; expected one of"):
        build_dialogues(ds, seed=0, count_form="share")


def test_zone_form_option_renders_each_form_and_survives_transform():
    """zone_form='share_first': "At the edge, 27.0% of the 1126 dies fail, which is 304
    dies.", the zone's dies listed in the die count line (check_items compares both with the
    loop recomputation); 'count_first' keeps the older answer and the plain die count line."""
    from wamglm_jax.qa.answers import render_answer
    ds = generate(16, seed=4, label_space="wm811k")
    zone = r"(the center|the middle ring|the edge)"
    for form, pattern in [("count_first", rf"^At {zone}, \d+ of \d+ dies fail \(\d+\.\d%\)\.$"),
                          ("share_first", rf"^At {zone}, \d+\.\d% of the \d+ dies fail, "
                                          r"which is \d+ dies?\.$")]:
        items = build_dialogues(ds, seed=0, per_map=8, zone_form=form)
        check_items(ds, items)
        zones = [(it, it["messages"][k["turn"]]["content"]) for it in items
                 for k in it["answer_key"] if k["kind"] == "zone_extent" and k["value"]["total"]]
        assert zones, "the plans drew no zone question"
        for it, text in zones:
            assert re.match(pattern, text), (form, text)
            assert it["zone_form"] == form
        it = zones[0][0]
        new, tm = transform_item(it, ds.maps[it["image_index"]], 1, True)
        k = next(k for k in new["answer_key"] if k["kind"] == "zone_extent")
        assert re.match(pattern, new["messages"][k["turn"]]["content"])
        assert (": " in new["messages"][0]["content"].split("\n")[1]) == (form == "share_first")
    text = render_answer("zone_extent", {"zone": "edge", "failing": 304, "total": 1126},
                         zone_form="share_first")
    assert text == "At the edge, 27.0% of the 1126 dies fail, which is 304 dies."
    assert parse_answer("zone_extent", text) == {"zone": "edge", "failing": 304, "total": 1126,
                                                 "pct": 27.0}
    assert parse_answer("zone_extent", "At the middle ring, 3 of 80 dies fail (3.8%).") == \
        {"zone": "middle", "failing": 3, "total": 80}
    with pytest.raises(ValueError, match="zone_form 'share'; expected one of"):
        build_dialogues(ds, seed=0, zone_form="share")
    with pytest.raises(ValueError, match="zone_form 'share'; expected one of"):
        render_answer("zone_extent", {"zone": "edge", "failing": 1, "total": 9},
                      zone_form="share")


@pytest.mark.parametrize("label_space", ["wm811k", "mixedwm38"])
def test_defect_type_answers_share_one_opening(label_space):
    """Every defect-type answer opens with the same words whatever the map shows (none maps
    included), and no answer of another kind opens with them: the first tokens name the
    question read, not the map (README "One opening for every defect-type answer")."""
    ds = generate(60, seed=7, label_space=label_space)
    items = build_dialogues(ds, seed=2, per_map=6, heldout=0.3)
    opening = "This wafer shows a "
    seen = {"none": 0, "pattern": 0}
    for it in items:
        for key in it["answer_key"]:
            text = it["messages"][key["turn"]]["content"]
            if key["kind"] == "defect_type":
                assert text.startswith(opening), text
                seen["pattern" if key["value"] else "none"] += 1
                if not key["value"]:
                    assert score("defect_type", parse_answer("defect_type", text, KB), [], text)
                    assert not score("defect_type", ["Center"], [], text)
            else:
                assert not text.startswith(opening), (key["kind"], text)
    assert seen["none"] and seen["pattern"], seen
