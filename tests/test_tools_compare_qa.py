"""tools/compare_qa.py: means over runs, pooled numeric answers, held-out phrasing table, the
difference against a second group, and clear errors on missing or incomplete reports."""
import json
import os

import pytest

from tools import compare_qa


def _report(qa, seen, heldout, phrasings, turn=(0.5, 0.6, 0.4), dialogues=0.25, paired=None,
            baseline_by_kind=None):
    """A stage-2 report.json with just the fields the tool reads."""
    return {"qa": {k: {"accuracy": a, "n": n} for k, (a, n) in qa.items()},
            "qa_summary": {"turn_accuracy": turn[0], "dialogue_accuracy": dialogues,
                           "seen": {"turn_accuracy": turn[1],
                                    "by_kind": {k: {"accuracy": a, "n": 1}
                                                for k, a in seen.items()}},
                           "heldout": {"turn_accuracy": turn[2],
                                       "by_kind": {k: {"accuracy": a, "n": 1}
                                                   for k, a in heldout.items()}},
                           "heldout_phrasings": [{"kind": k, "phrasing": p, "accuracy": a,
                                                  "n": 10} for k, p, a in phrasings]},
            "baseline": {"by_kind": {k: {"accuracy": a, "n": 1}
                                     for k, a in (baseline_by_kind or {}).items()},
                         "paired": paired or {}}}


def _write(tmp_path, name, report):
    d = tmp_path / name / "stage2"
    d.mkdir(parents=True)
    (d / "report.json").write_text(json.dumps(report))
    return str(tmp_path / name)


@pytest.fixture
def two_runs(tmp_path):
    a = _report({"defect_type": (0.9, 100), "yield": (0.8, 50), "count": (0.2, 150)},
                {"defect_type": 1.0}, {"defect_type": 0.8},
                [("location", "Where?", 0.1), ("cause", "Why?", 0.9)],
                turn=(0.7, 0.8, 0.6), dialogues=0.3,
                paired={"defect_type": {"n": 100, "model_accuracy": 0.9,
                                        "baseline_accuracy": 0.92, "model_only": 3,
                                        "baseline_only": 5, "p_value": 0.73}},
                baseline_by_kind={"defect_type": 0.92})
    b = _report({"defect_type": (0.7, 100), "yield": (1.0, 10), "count": (0.5, 30)},
                {"defect_type": 0.6}, {"defect_type": 0.8},
                [("location", "Where?", 0.3)],
                turn=(0.5, 0.6, 0.4), dialogues=0.1,
                baseline_by_kind={"defect_type": 0.88})
    return _write(tmp_path, "a", a), _write(tmp_path, "b", b)


def test_means_pooling_and_phrasings_match_hand_computation(two_runs):
    result, lines = compare_qa.compare(list(two_runs))
    dt = result["kinds"]["defect_type"]
    assert dt["all"] == pytest.approx((0.9 + 0.7) / 2)
    assert dt["training"] == pytest.approx((1.0 + 0.6) / 2)
    assert dt["heldout"] == pytest.approx(0.8)
    assert dt["baseline"] == pytest.approx((0.92 + 0.88) / 2)
    assert "cause" not in result["kinds"]              # no run answered it
    # numeric answers pooled over answers within a run: (0.8*50 + 0.2*150) / 200 = 0.35
    assert result["runs"][0]["numeric"] == pytest.approx(70 / 200)
    assert result["runs"][1]["numeric"] == pytest.approx((10 + 15) / 40)
    assert result["mean"]["all"] == pytest.approx(0.6)
    assert result["mean"]["dialogues"] == pytest.approx(0.2)
    assert result["runs"][0]["defect_type"]["baseline_only"] == 5
    # phrasings: the mean is over the runs that asked it, lowest first
    rows = result["heldout_phrasings"]
    assert [(r["phrasing"], r["per_run"]) for r in rows] == [("Where?", [0.1, 0.3]),
                                                           ("Why?", [0.9, None])]
    assert rows[0]["mean"] == pytest.approx(0.2) and rows[1]["mean"] == pytest.approx(0.9)
    text = "\n".join(lines)
    assert "| 90.0% (92.0%) | 3 / 5, 0.73 |" in text
    assert "| Why? | 90.0% / n/a | 90.0% |" in text


def test_against_gives_the_difference_of_means(two_runs, tmp_path):
    base = _write(tmp_path, "c", _report({"defect_type": (0.5, 100)}, {}, {}, []))
    result, lines = compare_qa.compare([two_runs[0]], [base])
    assert result["against"]["kinds"]["defect_type"]["all"] == pytest.approx(0.5)
    assert "| defect_type | 90.0% | 100.0% | 80.0% | 92.0% | 50.0% | +40.0 |" in lines


def test_main_prints_json_last_and_writes_it(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert compare_qa.main([f"--runs={','.join(two_runs)}", f"--json={out}"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(out.read_text())


def test_no_runs_is_an_error(capsys):
    assert compare_qa.main(["--runs=,"]) == 2
    assert "--runs: expected one or more" in capsys.readouterr().err


def test_missing_report_names_the_path(tmp_path, capsys):
    assert compare_qa.main([f"--runs={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert os.path.join("nowhere", "stage2", "report.json") in err and "no stage-2 report" in err


def test_incomplete_or_broken_report_names_file_and_field(tmp_path, capsys):
    report = _report({"defect_type": (0.9, 10)}, {}, {}, [])
    del report["qa_summary"]["heldout"]
    run = _write(tmp_path, "x", report)
    assert compare_qa.main([f"--runs={run}"]) == 2
    err = capsys.readouterr().err
    assert "x/stage2/report.json" in err and "'qa_summary.heldout.turn_accuracy'" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(compare_qa.ReportError, match="broken.json: not valid JSON"):
        compare_qa.load_report(str(broken))
