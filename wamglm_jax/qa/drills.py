"""Count drills: training-only dialogues that practise the last step of the count answer.

The share-first count answer reads "8.4% of the 2046 dies fail, which is 171 dies.": the model
reads the failing share from the image, copies the die count from the context line, then writes
that share of that count. Inside the dialogues a stage-2 run writes a count within tolerance of
its own two numbers about half the time (`count_diagnostics.product_within_tol`), while the same
language model trained on the count sentences as text alone gets most of them right after a
similar number of sentences (tools/probe_count_arithmetic.py). A drill gives the model that step
on its own, many times per sample: the user states a failing share, the assistant answers with
the count sentence, whose share is the one stated and whose count is that share of the die
count. Several exchanges per drill, each with a share drawn from the drill maps' own shares (the
first one is the map's true share), so the arithmetic is practised over the range the real
answers need.

Measured once (README "Count drills"): drills on a quarter of the `:cpu` training maps did not
lift the product inside the dialogues, and the run's count in the drills themselves was within
tolerance only 22.5% of the time; the count's tokens are a small share of stage 2's loss. Off by
default (config.stage2.count_drills.prob=0).

Item format: as qa.dialogues.build_dialogues (the map's image and context lines; answer_key
entries of kind `count`), plus "drill": True; plan steps have kind "count_drill" and the share
as a percentage in "pct". Drills are training data only: never evaluated, never noised or framed,
and left out of the projector-alignment captions.
A drawn share s gives the count round(s * N) and the stated share is that count's, rounded to
0.1%, exactly as a real count answer states its share: so a stated share may fit two or three
counts (8.4% of 2046 dies is 171 or 172 to 0.1%), as in the dialogues, far inside the 10%
tolerance. With config.stage2.count_form='count_first' the answer does not repeat the share
("171 of the 2046 dies fail."); the drill then asks for the count of a stated share all the same.
zone_form: the dialogues' zone form, which sets the context's die count line (with the dies per
zone for 'share_first'), so a drill's first turn reads like a dialogue's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from wamglm_jax.data.labels import class_names
from wamglm_jax.qa import facts as F
from wamglm_jax.qa.answers import check_forms, render_answer, stated_share
from wamglm_jax.qa.augment import check_probability
from wamglm_jax.qa.dialogues import first_user_turn, map_context

# {pct}: the stated failing share, as the count answer writes it ("8.4").
FIRST_QUESTIONS = (
    "{pct}% of its dies fail. How many dies is that?",
    "If {pct}% of the dies on this wafer fail, how many dies fail?",
    "Suppose {pct}% of its dies fail. How many dies would that be?",
)
NEXT_QUESTIONS = (
    "And if {pct}% of them fail?",
    "What if {pct}% of its dies fail?",
    "How many dies is {pct}% of them?",
)


def check_drill_config(prob, turns) -> None:
    """ValueError naming the config field unless prob is in [0, 1] and turns is an int >= 1."""
    check_probability("config.stage2.count_drills.prob", prob)
    if isinstance(turns, bool) or not isinstance(turns, (int, np.integer)) or turns < 1:
        raise ValueError(f"config.stage2.count_drills.turns={turns!r}: expected an integer >= 1")


def build_count_drills(dataset, *, prob: float, turns: int, seed: int,
                       indices: Sequence[int] | None = None, count_form: str = "share_first",
                       zone_form: str = "count_first", maps_name: str = "maps.npz",
                       id_prefix: str = "drill-") -> list[dict]:
    """One drill of `turns` exchanges for each labelled map of `dataset` (or of `indices`)
    chosen with probability `prob`, maps without dies skipped. Deterministic given `seed`."""
    check_drill_config(prob, turns)
    check_forms("build_count_drills", count_form, zone_form)
    rng = np.random.default_rng([int(seed), 0xD8111])
    pool = range(len(dataset.maps)) if indices is None else indices
    chosen = [int(i) for i in pool if int(dataset.labels[i]) >= 0 and rng.random() < prob]
    facts = {i: F.compute_facts(dataset.maps[i]) for i in chosen}
    chosen = [i for i in chosen if facts[i]["total"] > 0]
    shares = np.array([facts[i]["failing"] / facts[i]["total"] for i in chosen])
    meta = getattr(dataset, "meta", None)
    lots = F.lot_index(meta)
    names = class_names(dataset.label_space)
    items = []
    for i in chosen:
        total, label = facts[i]["total"], int(dataset.labels[i])
        failing = [facts[i]["failing"]] + [
            int(round(float(s) * total)) for s in rng.choice(shares, size=turns - 1)]
        ctx = F.lot_context(i, dataset.labels, dataset.label_space, meta, lots)
        messages, key, plan = [], [], []
        for t, f in enumerate(failing):
            bank = FIRST_QUESTIONS if t == 0 else NEXT_QUESTIONS
            q_id = int(rng.integers(len(bank)))
            q = bank[q_id].format(pct=stated_share(f, total))
            if t == 0:
                q = first_user_turn(q, map_context(dataset.maps[i], ctx,
                                                   zone_dies=zone_form == "share_first"))
            value = {"failing": f, "total": total}
            messages += [{"role": "user", "content": q},
                         {"role": "assistant",
                          "content": render_answer("count", value, count_form=count_form)}]
            key.append({"turn": len(messages) - 1, "kind": "count", "value": value})
            plan.append({"kind": "count_drill", "q": q_id, "pct": stated_share(f, total)})
        items.append({"id": f"{id_prefix}{i}", "images": [f"{maps_name}#{i}"],
                      "image_index": i, "messages": messages, "class": label,
                      "class_name": names[label], "label_space": dataset.label_space,
                      "heldout": False, "answer_key": key, "plan": plan, "lot_context": ctx,
                      "count_form": count_form, "zone_form": zone_form, "drill": True})
    return items
