"""Stage-2 evaluation and report: the model's QA answers and the stage-1 + knowledge-base
baseline on config.stage2.eval.split, written as qa_records.jsonl, qa.png, report.json and
report.md (tables per question kind, count diagnostics, the answer-for-answer comparison with
the baseline, example dialogues)."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from wamglm_jax.evaluate import baseline as bl
from wamglm_jax.evaluate import qa as qa_eval
from wamglm_jax.evaluate.classification import atomic_write_text
from wamglm_jax.parallel import sharding as shd
from wamglm_jax.qa.io import write_jsonl


def evaluate_and_report(*, stage, config, s2, workdir, stage_dir, mesh, rules, model_cfg, params,
                        tok, splits, items, kb, result, wall_seconds, t_eval, extra) -> dict:
    """QA evaluation of the model and of the baseline on config.stage2.eval.split; writes
    qa_records.jsonl, qa.png, report.json and report.md (process 0)."""
    ev = s2.eval
    split = ev.split if ev.split in items else "val"
    pool = [it for it in items[split] if not it.get("drill")]   # drills: training data only
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
            stage=stage, steps=int(result.step), final_train_loss=result.final_train_loss,
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
    lines = ["# Stage 2 report", "",
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
    lines.append(f"- vision tower: {r.get('vision_source')}; language model: "
                 f"{r.get('lm_source', 'random init')}")
    w = r.get("lm_warmup")
    if w:
        lines.append(f"- LM warm-up: {w['steps']} steps on {w['sentences']} product sentences; "
                     + (f"then the count is within tolerance on {_pct(w['count_within_tol'])} "
                        f"of {w['eval_sentences']} `{w['eval_split']}` sentences (exact "
                        f"{_pct(w['count_exact'])})"
                        if "count_within_tol" in w else "not scored (num_eval=0 or no held-out "
                        "split)"))
    pr = r.get("product_rehearsal")
    if pr:
        last = (r.get("history") or [{}])[-1]
        lines.append(f"- product rehearsal: weight {pr['weight']} x the LM's loss on "
                     f"{pr['batch_size'] * pr.get('pack', 1)} of {pr['sentences']} product "
                     f"sentences per step (rows of {pr.get('pack', 1)}"
                     + (", each after its die count line" if pr.get("die_line") else "") + ") "
                     f"(the final train loss includes it; last logged dialogue CE "
                     f"{last.get('ce')}, sentence CE {last.get('product_ce')})"
                     + (f"; afterwards the LM alone writes the count within tolerance on "
                        f"{_pct(pr['count_within_tol'])} of {pr['eval_sentences']} "
                        f"`{pr['eval_split']}` sentences (exact {_pct(pr['count_exact'])})"
                        if pr.get("count_within_tol") is not None else ""))
    lines += ["",
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
    for key, label, total in (
            ("count_diagnostics", "Failing-die counts", "die count copied from the context line"),
            ("zone_diagnostics", "Zone counts", "the zone's die total right (copied from the "
                                                "die count line with zone_form 'share_first', "
                                                "else estimated from the image)")):
        line = _count_line(r["qa_summary"].get(key) or {}, label, total)
        if line:
            lines += ["", line]
    hp = r["qa_summary"].get("heldout_phrasings") or []
    if hp:
        lines += ["", "Held-out phrasings one by one (a phrasing the model misreads shows here "
                      "as one low row rather than as a lower held-out column):", "",
                  "| kind | held-out phrasing | accuracy | n |", "|---|---|---|---|"]
        lines += [f"| {h['kind']} | {h['phrasing']} | {_pct(h['accuracy'])} | {h['n']} |"
                  for h in hp]
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


def _count_line(cd: dict, label: str, total: str) -> str | None:
    """One report sentence from a `count_diagnostics` dict (None when it has no answers)."""
    if not cd.get("n_count_answers"):
        return None
    bins = ", ".join(f"{k} failing: {_pct(v['accuracy'])} (n={v['n']})"
                     for k, v in cd["by_failing"].items() if v["n"])
    med = cd["median_rel_error"]
    line = (f"{label} ({cd['n_count_answers']} answers): {total} "
            f"{_pct(cd['die_count_copied'])}; implied failing share within 10% "
            f"{_pct(cd['share_within_tol'])}; median relative error "
            f"{'n/a' if med is None else f'{100 * med:.1f}%'}; within tolerance by true count: "
            f"{bins}.")
    if cd.get("n_stated"):
        line += (f" Share-first answers ({cd['n_stated']}): stated share within 10% "
                 f"{_pct(cd['share_stated_within_tol'])}; count within 10% of the stated share "
                 f"of the stated die count {_pct(cd['product_within_tol'])}; counts within "
                 f"tolerance had they been that product exactly "
                 f"{_pct(cd['exact_product_accuracy'])}.")
    return line
