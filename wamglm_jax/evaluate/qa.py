"""QA evaluation of generated answers against the dialogue answer keys.

Teacher-forced history: every assistant turn is generated with the *reference* earlier turns
as context (so one wrong answer does not spoil the rest), parsed with `qa.answers.parse_answer`
and compared with the answer key by `score`:

  defect_type                   exact label set
  location                      same concentration zones and same side
  type_location                 same presence; when present, same zones and side
  count / zone_extent           failing-die count within +-10% relative (+-1 die when it is
                                below 10; zone_extent also the same zone)
  yield / area                  within +-3 percentage points
  cause / adjustment / why_type / why_severity
                                KB agreement: the set of KB entries whose text is given equals
                                the expected entries
  severity                      same severity level
  batch                         same lot (or both "cannot tell"), same counts and the same
                                lot-wide / isolated verdict (answerable: the first user turn
                                carries the lot context line, qa.dialogues.context_line)

`summarize(records)` gives accuracy per kind, whole-dialogue accuracy (all turns right), and
the same split by `heldout` (held-out phrasings/orders vs training ones), plus
`count_diagnostics`: where failing-die count answers go wrong (see its docstring).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from wamglm_jax.qa.answers import parse_answer
from wamglm_jax.qa.encode import encode_prompt
from wamglm_jax.qa.dialogues import question_template

COUNT_REL_TOL = 0.10
PCT_TOL = 3.0
KB_KINDS = ("why_type", "cause", "adjustment", "why_severity")
NOT_FROM_INPUTS: tuple[str, ...] = ()   # kinds the model's input (map + text) cannot answer


def _count_ok(pred, want) -> bool:
    if pred is None or want is None:
        return False
    return abs(pred - want) <= max(COUNT_REL_TOL * abs(want), 1.0 if want < 10 else 0.0)


def _says(text: str | None, pattern: str) -> bool:
    return text is None or re.search(pattern, text, re.IGNORECASE) is not None


def score(kind: str, pred: Any, want: Any, text: str | None = None) -> bool:
    """True when the parsed answer `pred` agrees with the answer-key value `want`.

    With `text` (the raw answer), "empty" expected values must be stated explicitly, so an
    answer the parser finds nothing in does not pass as "no pattern" / "no failing die" /
    "cannot tell"."""
    if kind == "defect_type":
        if not want and not _says(text, r"\bnone\b|no defect|normal"):
            return False
        return sorted(pred) == sorted(want)
    if kind in KB_KINDS:
        return sorted(pred["kb_keys"]) == sorted(want["kb_keys"])
    if kind == "location":
        if not want["zones"] and not _says(text, r"no failing"):
            return False
        return sorted(pred["zones"] or []) == sorted(want["zones"] or []) and \
            pred["side"] == want["side"]
    if kind == "type_location":
        if bool(pred["present"]) != bool(want["present"]) or pred["pattern"] != want["pattern"]:
            return False
        if not want["present"]:
            return True
        return sorted(pred["zones"] or []) == sorted(want["zones"] or []) and \
            pred["side"] == want["side"]
    if kind == "count":
        return _count_ok(pred["failing"], want["failing"])
    if kind == "zone_extent":
        return pred["zone"] == want["zone"] and _count_ok(pred["failing"], want["failing"])
    if kind in ("yield", "area"):
        k = f"{kind}_pct"
        return pred[k] is not None and abs(pred[k] - want[k]) <= PCT_TOL
    if kind == "severity":
        return pred["severity"] == want["severity"]
    if kind == "batch":
        if want.get("lot") is None:
            return pred.get("lot") is None and _says(text, r"cannot tell")
        return all(pred.get(k) == v for k, v in want.items())
    raise ValueError(f"score: unknown question kind {kind!r}")


def phrasing_of(item: dict, step: int) -> str | None:
    """The question template asked at plan step `step` (the bank the item drew from: held-out
    or training phrasings), or None for items without a plan and for count drills (their
    questions are not in the banks; qa/drills.py)."""
    plan = item.get("plan")
    if not plan or step >= len(plan) or item.get("drill"):
        return None
    return question_template(plan[step], bool(item.get("heldout")))


def turn_prompts(item: dict) -> list[tuple[int, str, Any, list[dict]]]:
    """[(turn index, kind, expected value, messages before that turn)] for one item."""
    out = []
    for key in item["answer_key"]:
        t = key["turn"]
        out.append((t, key["kind"], key["value"], item["messages"][:t]))
    return out


def generate_answers(generator, tok, items: Sequence[dict], images: Callable[[int], np.ndarray],
                     *, num_image_tokens: int, gen, batch_size: int,
                     progress: Callable[[str], None] | None = None) -> list[dict]:
    """One record per assistant turn: {id, turn, kind, expected, answer, parsed, correct,
    heldout, phrasing (the question template asked; phrasing_of), image_index}.
    images(image_index) -> float[S,S,3]. Batches hold prompts of similar length (sorted) and
    always `batch_size` rows (padded by repetition) so the jitted generator sees a few static
    shapes only."""
    jobs = []
    for it in items:
        for step, (t, kind, want, msgs) in enumerate(turn_prompts(it)):
            ids = encode_prompt(tok, msgs, num_image_tokens=num_image_tokens)
            jobs.append(dict(item=it, turn=t, kind=kind, expected=want, ids=ids.tolist(),
                             phrasing=phrasing_of(it, step)))
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j]["ids"]))
    answers: dict[int, list[int]] = {}
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
        imgs = np.stack([images(jobs[j]["item"]["image_index"]) for j in rows])
        outs = generator.generate(imgs, [jobs[j]["ids"] for j in rows], gen)
        for j, o in zip(chunk, outs):
            answers[j] = o
        if progress is not None:
            progress(f"qa eval: {min(s + batch_size, len(order))}/{len(order)} answers")
    records = []
    for j, job in enumerate(jobs):
        text = tok.decode(answers[j], skip_special_tokens=True).strip()
        try:
            parsed = parse_answer(job["kind"], text)
            ok = score(job["kind"], parsed, job["expected"], text)
        except (TypeError, KeyError, AttributeError):
            parsed, ok = None, False
        it = job["item"]
        records.append(dict(id=it["id"], turn=job["turn"], kind=job["kind"],
                            expected=job["expected"], answer=text, parsed=parsed,
                            correct=bool(ok), heldout=bool(it.get("heldout", False)),
                            phrasing=job["phrasing"], image_index=int(it["image_index"])))
    return records


def summarize(records: Sequence[dict]) -> dict:
    """{'by_kind': {kind: {accuracy, n}}, 'dialogue_accuracy', 'turn_accuracy', 'n_dialogues',
    'count_diagnostics', 'zone_diagnostics', 'heldout': {...same for held-out items}, 'seen':
    {...training phrasings}, 'heldout_phrasings': [{kind, phrasing, accuracy, n}] per held-out
    question template}. With only a few held-out phrasings per kind, one phrasing the model misreads
    moves the held-out figure by a third; the per-phrasing list shows which."""
    def part(recs):
        by = defaultdict(list)
        dlg = defaultdict(list)
        for r in recs:
            by[r["kind"]].append(r["correct"])
            dlg[r["id"]].append(r["correct"])
        return {"by_kind": {k: {"accuracy": float(np.mean(v)), "n": len(v)}
                            for k, v in sorted(by.items())},
                "turn_accuracy": float(np.mean([r["correct"] for r in recs])) if recs else None,
                "dialogue_accuracy": float(np.mean([all(v) for v in dlg.values()])) if dlg
                else None,
                "n_dialogues": len(dlg), "n_turns": len(recs)}

    out = part(records)
    out["count_diagnostics"] = count_diagnostics(records)
    out["zone_diagnostics"] = count_diagnostics(records, kind="zone_extent")
    out["heldout"] = part([r for r in records if r["heldout"]])
    out["seen"] = part([r for r in records if not r["heldout"]])
    by_phrasing = defaultdict(list)
    for r in records:
        if r["heldout"] and r.get("phrasing") is not None:
            by_phrasing[(r["kind"], r["phrasing"])].append(r["correct"])
    out["heldout_phrasings"] = [{"kind": k, "phrasing": q, "accuracy": float(np.mean(v)),
                                 "n": len(v)} for (k, q), v in sorted(by_phrasing.items())]
    # kinds listed in NOT_FROM_INPUTS (none now: `batch` gets the lot context line) are left
    # out of this second dialogue accuracy.
    ans = part([r for r in records if r["kind"] not in NOT_FROM_INPUTS])
    out["answerable"] = {"excluded_kinds": list(NOT_FROM_INPUTS),
                         "turn_accuracy": ans["turn_accuracy"],
                         "dialogue_accuracy": ans["dialogue_accuracy"]}
    return out


COUNT_SIZE_BINS = ((0, 20), (20, 100), (100, None))   # failing dies in the answer key


def count_diagnostics(records: Sequence[dict], kind: str = "count") -> dict:
    """Where failing-die count answers ("P% of the N dies fail, which is F dies.") go wrong.
    A count is the failing share (in the image) times the die count (in the context line), so:

      die_count_copied      share of count answers whose N equals the context line's
      share_within_tol      share whose implied failing share F/N is within COUNT_REL_TOL
                            (relative) of the true one: the image reading, apart from the
                            copy (answers with both numbers and a nonzero true count)
      share_stated_within_tol  share whose stated P is within COUNT_REL_TOL (relative) of the
                            true share (share-first answers with a nonzero true count)
      product_within_tol    share of share-first answers whose F is within the count
                            tolerance of P% of their own N: the product, apart from reading
      exact_product_accuracy  share of share-first answers whose count would be within
                            tolerance had F been exactly P% of their own N: what the reading
                            and the copy allow, apart from the product
      median_rel_error      median |F - F_true| / F_true over answers with a number
      by_failing            count accuracy by the true failing-die count (COUNT_SIZE_BINS:
                            at 10%, a count under 20 must be exact to a die or two)
      yield_median_abs_error  median |yield - yield_true| in points over the yield answers
                            (kind 'count' only)

    kind='zone_extent' gives the same for zone counts ("At the edge, P% of the N dies fail,
    which is F dies."), N then the zone's dies: copied from the die count line when the run's
    zone_form is 'share_first', estimated from the image with 'count_first'.
    Fractions are over the answers each needs (n_* give the denominators); None when empty.
    Records without `expected` (the template baseline's) are skipped."""
    if kind not in ("count", "zone_extent"):
        raise ValueError(f"count_diagnostics: kind {kind!r}; expected 'count' or 'zone_extent'")
    records = [r for r in records if "expected" in r]
    counts = [r for r in records if r["kind"] == kind]
    parsed = [(r.get("parsed") or {}, r["expected"]) for r in counts]
    with_n = [(p, e) for p, e in parsed if p.get("total") is not None]
    both = [(p, e) for p, e in with_n if p.get("failing") is not None and p["total"] > 0
            and e["failing"] > 0]
    stated = [(p, e) for p, e in both if p.get("pct") is not None]
    with_f = [(p, e) for p, e in parsed if p.get("failing") is not None and e["failing"] > 0]
    yields = [abs(r["parsed"]["yield_pct"] - r["expected"]["yield_pct"]) for r in records
              if r["kind"] == "yield" and (r.get("parsed") or {}).get("yield_pct") is not None]

    def frac(xs):
        return float(np.mean(xs)) if len(xs) else None

    bins = {}
    for lo, hi in COUNT_SIZE_BINS:
        sel = [r["correct"] for r in counts
               if r["expected"]["failing"] >= lo and (hi is None or r["expected"]["failing"] < hi)]
        bins[f"{lo}-{hi - 1}" if hi else f">={lo}"] = {"accuracy": frac(sel), "n": len(sel)}
    out = {
        "n_count_answers": len(counts),
        "die_count_copied": frac([p.get("total") == e["total"] for p, e in parsed]),
        "share_within_tol": frac([abs(p["failing"] / p["total"] - e["failing"] / e["total"])
                                  <= COUNT_REL_TOL * e["failing"] / e["total"] for p, e in both]),
        "n_share": len(both),
        "share_stated_within_tol": frac([abs(p["pct"] - 100.0 * e["failing"] / e["total"])
                                         <= COUNT_REL_TOL * 100.0 * e["failing"] / e["total"]
                                         for p, e in stated]),
        "product_within_tol": frac([_count_ok(p["failing"], p["pct"] * p["total"] / 100.0)
                                    for p, e in stated]),
        "exact_product_accuracy": frac([_count_ok(round(p["pct"] * p["total"] / 100.0),
                                                  e["failing"]) for p, e in stated]),
        "n_stated": len(stated),
        "median_rel_error": float(np.median([abs(p["failing"] - e["failing"]) / e["failing"]
                                             for p, e in with_f])) if with_f else None,
        "by_failing": bins,
    }
    if kind == "count":
        out.update(yield_median_abs_error=float(np.median(yields)) if yields else None,
                   n_yield=len(yields))
    return out


def example_dialogues(records: Sequence[dict], items: Sequence[dict], n: int = 3) -> list[dict]:
    """The first n items with each reference turn and the generated answer beside it."""
    by_id = defaultdict(dict)
    for r in records:
        by_id[r["id"]][r["turn"]] = r
    out = []
    for it in items[:n]:
        turns = []
        for t, m in enumerate(it["messages"]):
            if m["role"] == "user":
                turns.append({"user": m["content"].replace("<image>\n", "")})
            else:
                r = by_id[it["id"]].get(t)
                turns.append({"reference": m["content"],
                              "model": None if r is None else r["answer"],
                              "kind": None if r is None else r["kind"],
                              "correct": None if r is None else r["correct"]})
        out.append({"id": it["id"], "class": it.get("class_name"), "heldout": it.get("heldout"),
                    "turns": turns})
    return out


def evaluate_model(model_cfg, params, tok, items: Sequence[dict], maps, *, max_new_tokens: int,
                   batch_size: int, progress: Callable[[str], None] | None = None):
    """Greedy answers of the model (plain params) for every answer-key turn of `items`
    (maps[image_index] are their maps). Returns (summary, records)."""
    from wamglm_jax.data.preprocess import area_resize_onehot
    from wamglm_jax.inference.generate import GenerationConfig, Generator
    from wamglm_jax.models.wamglm import num_image_tokens

    gen = Generator(model_cfg, params)
    cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), stop_tokens=(tok.eos_token_id,),
                           pad_id=int(tok.pad_token_id or 0))
    cache: dict[int, np.ndarray] = {}
    s = int(model_cfg.vit.image_size)

    def image(i):
        if i not in cache:
            cache[i] = area_resize_onehot(maps[i], s)
        return cache[i]

    records = generate_answers(gen, tok, items, image, num_image_tokens=num_image_tokens(model_cfg),
                               gen=cfg, batch_size=batch_size, progress=progress)
    return summarize(records), records


def plot_qa(summary: dict, baseline: dict | None, history: Sequence[dict], path: str) -> str:
    """Two panels: train loss per logged step, and accuracy per question kind (model vs
    baseline where the baseline applies). Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    steps = [h["step"] for h in history]
    # ce: the plain mean over assistant tokens (the objective `loss` may weight digits or add
    # the product rehearsal's sentences; those runs plot their sentence CE beside it)
    if history:
        a1.plot(steps, [h.get("ce", h.get("loss")) for h in history], marker=".",
                label="dialogues")
    if any("product_ce" in h for h in history):
        a1.plot(steps, [h.get("product_ce") for h in history], marker=".",
                label="product sentences (rehearsal)")
        a1.legend()
    a1.set_xlabel("step")
    a1.set_ylabel("train cross-entropy (assistant tokens)")
    a1.set_title("stage 2 training")
    kinds = list(summary["by_kind"])
    x = np.arange(len(kinds))
    a2.bar(x - 0.2, [summary["by_kind"][k]["accuracy"] for k in kinds], 0.4, label="WamGLM")
    if baseline:
        a2.bar(x + 0.2, [baseline["by_kind"].get(k, {}).get("accuracy", np.nan) for k in kinds],
               0.4, label="stage-1 + KB templates")
    a2.set_xticks(x, kinds, rotation=45, ha="right")
    a2.set_ylim(0, 1.05)
    a2.set_ylabel("accuracy")
    a2.set_title("QA accuracy by question kind")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
