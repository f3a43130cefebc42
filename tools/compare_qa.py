"""Compare stage-2 QA reports across runs (seeds), optionally against a second group of runs.

    python -m tools.compare_qa --runs=W0,W1,W2 [--against=V0,V1,V2] [--json=PATH]

Each run is a workdir holding stage2/report.json (or the path of a report.json itself). Prints
three tables, in markdown:
  1. per run: defect type against the stage-1 classifier on the same answers (answers only the
     model got right / only the classifier, exact McNemar p), all answers (training / held-out
     phrasings), whole dialogues, numeric answers (yield, area, failing-die and zone counts,
     pooled over answers);
  2. per question kind, the mean over runs of all / training / held-out accuracy, and the
     template baseline's;
  3. every held-out phrasing's accuracy in each run and its mean, lowest mean first (one
     misread phrasing moves its kind's held-out figure by a third; README "Held-out phrasings
     one by one").
With --against, tables 1 and 2 are printed for both groups and table 2 gains the difference of
the means (runs minus against). Means over runs are unweighted: each run (seed) counts once.
The last stdout line is one JSON object with everything printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

KINDS = ("defect_type", "severity", "cause", "adjustment", "why_type", "why_severity",
         "type_location", "location", "yield", "area", "count", "zone_extent", "batch")
NUMERIC_KINDS = ("yield", "area", "count", "zone_extent")


class ReportError(ValueError):
    """A report file that is missing or lacks a field this tool reads."""


def report_path(run: str) -> str:
    return run if run.endswith(".json") else os.path.join(run, "stage2", "report.json")


def load_report(run: str) -> dict:
    path = report_path(run)
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no stage-2 report (expected a workdir with "
                          f"stage2/report.json, or a report.json path)")
    try:
        with open(path) as f:
            report = json.load(f)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from e
    report["_path"] = path
    return report


def field(report: dict, dotted: str):
    """report['a']['b'] for 'a.b'; a missing key raises ReportError naming the file and field."""
    value = report
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ReportError(f"{report.get('_path', '<report>')}: field {dotted!r} missing "
                              f"(expected a stage-2 report.json written by wamglm_jax.main)")
        value = value[key]
    return value


def _kind_accuracy(report: dict, section: str, kind: str) -> float | None:
    entry = field(report, section).get(kind)
    return None if entry is None else entry["accuracy"]


def run_summary(report: dict) -> dict:
    qa = field(report, "qa")
    numeric_n = sum(qa[k]["n"] for k in NUMERIC_KINDS if k in qa)
    numeric_right = sum(qa[k]["accuracy"] * qa[k]["n"] for k in NUMERIC_KINDS if k in qa)
    out = {"path": report["_path"],
           "all": field(report, "qa_summary.turn_accuracy"),
           "training": field(report, "qa_summary.seen.turn_accuracy"),
           "heldout": field(report, "qa_summary.heldout.turn_accuracy"),
           "dialogues": field(report, "qa_summary.dialogue_accuracy"),
           "numeric": numeric_right / numeric_n if numeric_n else None}
    paired = (report.get("baseline") or {}).get("paired", {}).get("defect_type")
    if paired:
        out["defect_type"] = {k: paired[k] for k in ("model_accuracy", "baseline_accuracy",
                                                     "model_only", "baseline_only", "p_value")}
    elif "defect_type" in qa:
        out["defect_type"] = {"model_accuracy": qa["defect_type"]["accuracy"]}
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def kind_means(reports: Sequence[dict]) -> dict:
    out = {}
    for kind in KINDS:
        if not any(kind in field(r, "qa") for r in reports):
            continue
        out[kind] = {
            "all": _mean([_kind_accuracy(r, "qa", kind) for r in reports]),
            "training": _mean([_kind_accuracy(r, "qa_summary.seen.by_kind", kind)
                               for r in reports]),
            "heldout": _mean([_kind_accuracy(r, "qa_summary.heldout.by_kind", kind)
                              for r in reports]),
            "baseline": _mean([((r.get("baseline") or {}).get("by_kind") or {})
                               .get(kind, {}).get("accuracy") for r in reports])}
    return out


def phrasing_table(reports: Sequence[dict]) -> list[dict]:
    rows: dict[tuple[str, str], list] = {}
    for i, r in enumerate(reports):
        for h in field(r, "qa_summary.heldout_phrasings"):
            rows.setdefault((h["kind"], h["phrasing"]), [None] * len(reports))[i] = h["accuracy"]
    table = [{"kind": k, "phrasing": p, "per_run": accs, "mean": _mean(accs)}
             for (k, p), accs in rows.items()]
    return sorted(table, key=lambda row: (row["mean"], row["kind"], row["phrasing"]))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _run_lines(summaries: Sequence[dict]) -> list[str]:
    lines = ["| run | defect type (classifier) | only model / only classifier, p | all answers "
             "(training / held-out) | whole dialogues | numeric |", "|---|---|---|---|---|---|"]
    for s in summaries:
        d = s.get("defect_type", {})
        pair = (f"{d['model_only']} / {d['baseline_only']}, {d['p_value']:.2g}"
                if "p_value" in d else "n/a")
        lines.append(f"| {s['path']} | {_pct(d.get('model_accuracy'))} "
                     f"({_pct(d.get('baseline_accuracy'))}) | {pair} | {_pct(s['all'])} "
                     f"({_pct(s['training'])} / {_pct(s['heldout'])}) | {_pct(s['dialogues'])} "
                     f"| {_pct(s['numeric'])} |")
    return lines


def _kind_lines(means: dict, against: dict | None) -> list[str]:
    head = "| kind | all | training | held-out | baseline |"
    rule = "|---|---|---|---|---|"
    if against is not None:
        head += " all, against | difference |"
        rule += "---|---|"
    lines = [head, rule]
    for kind, m in means.items():
        line = (f"| {kind} | {_pct(m['all'])} | {_pct(m['training'])} | {_pct(m['heldout'])} "
                f"| {_pct(m['baseline'])} |")
        if against is not None:
            a = against.get(kind, {}).get("all")
            diff = None if a is None or m["all"] is None else m["all"] - a
            line += f" {_pct(a)} | {'n/a' if diff is None else f'{100 * diff:+.1f}'} |"
        lines.append(line)
    return lines


def compare(runs: Sequence[str], against: Sequence[str] = ()) -> tuple[dict, list[str]]:
    reports = [load_report(r) for r in runs]
    result = {"runs": [run_summary(r) for r in reports], "kinds": kind_means(reports),
              "heldout_phrasings": phrasing_table(reports)}
    result["mean"] = {k: _mean([s[k] for s in result["runs"]])
                      for k in ("all", "training", "heldout", "dialogues", "numeric")}
    lines = ["## Runs", ""] + _run_lines(result["runs"])
    lines += ["", f"Mean over {len(reports)} runs: all answers {_pct(result['mean']['all'])} "
              f"(training {_pct(result['mean']['training'])}, held-out "
              f"{_pct(result['mean']['heldout'])}), whole dialogues "
              f"{_pct(result['mean']['dialogues'])}, numeric {_pct(result['mean']['numeric'])}."]
    against_means = None
    if against:
        other = [load_report(r) for r in against]
        against_means = kind_means(other)
        result["against"] = {"runs": [run_summary(r) for r in other], "kinds": against_means}
        result["against"]["mean"] = {k: _mean([s[k] for s in result["against"]["runs"]])
                                     for k in ("all", "training", "heldout", "dialogues",
                                               "numeric")}
        lines += ["", "## Against", ""] + _run_lines(result["against"]["runs"])
    lines += ["", "## Per kind, mean over runs", ""] + _kind_lines(result["kinds"], against_means)
    lines += ["", "## Held-out phrasings, lowest mean first", "",
              "| kind | phrasing | per run | mean |", "|---|---|---|---|"]
    lines += [f"| {row['kind']} | {row['phrasing']} | "
              f"{' / '.join(_pct(a) for a in row['per_run'])} | {_pct(row['mean'])} |"
              for row in result["heldout_phrasings"]]
    return result, lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="comma-separated workdirs or report.json paths")
    ap.add_argument("--against", default="", help="a second group, compared by kind")
    ap.add_argument("--json", default=None, help="also write the JSON object here")
    args = ap.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    against = [r for r in args.against.split(",") if r]
    if not runs:
        print("compare_qa: --runs: expected one or more comma-separated workdirs or "
              "report.json paths, got none", file=sys.stderr)
        return 2
    try:
        result, lines = compare(runs, against)
    except ReportError as e:
        print(f"compare_qa: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
