"""QA scoring, the template baseline, and the stage-2 loss against independent computations."""
import json

import numpy as np
import pytest

from wamglm_jax.data.generator import generate
from wamglm_jax.evaluate import baseline as bl
from wamglm_jax.evaluate import qa as qa_eval
from wamglm_jax.qa.answers import parse_answer
from wamglm_jax.qa.dialogues import build_dialogues


@pytest.fixture(scope="module")
def data():
    ds = generate(60, seed=3)
    items = build_dialogues(ds, seed=1, heldout=0.5)
    return ds, items


def _records(items, answer_fn):
    recs = []
    for it in items:
        for step, (t, kind, want, _) in enumerate(qa_eval.turn_prompts(it)):
            text = answer_fn(it, t, kind)
            parsed = parse_answer(kind, text)
            recs.append(dict(id=it["id"], turn=t, kind=kind, expected=want, parsed=parsed,
                             correct=qa_eval.score(kind, parsed, want, text),
                             heldout=it["heldout"], phrasing=qa_eval.phrasing_of(it, step)))
    return recs


def test_reference_answers_all_score_correct(data):
    _, items = data
    recs = _records(items, lambda it, t, k: it["messages"][t]["content"])
    bad = [r for r in recs if not r["correct"]]
    assert not bad, bad[:3]
    s = qa_eval.summarize(recs)
    assert s["turn_accuracy"] == 1.0 and s["dialogue_accuracy"] == 1.0
    assert s["heldout"]["n_dialogues"] + s["seen"]["n_dialogues"] == len(items)
    assert len(s["by_kind"]) >= 8


def test_garbage_answers_score_wrong(data):
    _, items = data
    recs = _records(items, lambda it, t, k: ".")
    assert not any(r["correct"] for r in recs)
    s = qa_eval.summarize(recs)
    assert s["turn_accuracy"] == 0.0 and s["dialogue_accuracy"] == 0.0


def test_tolerances():
    assert qa_eval.score("count", {"failing": 109, "total": None}, {"failing": 100, "total": 500})
    assert not qa_eval.score("count", {"failing": 111, "total": None}, {"failing": 100, "total": 500})
    assert qa_eval.score("count", {"failing": 4, "total": None}, {"failing": 5, "total": 50})
    assert qa_eval.score("yield", {"yield_pct": 87.0}, {"yield_pct": 90.0})
    assert not qa_eval.score("yield", {"yield_pct": 86.9}, {"yield_pct": 90.0})
    assert not qa_eval.score("zone_extent", {"zone": "edge", "failing": 10},
                             {"zone": "center", "failing": 10, "total": 20})
    with pytest.raises(ValueError, match="unknown question kind"):
        qa_eval.score("nope", {}, {})


def test_baseline_with_true_labels_is_perfect_and_wrong_labels_are_not(data):
    ds, items = data
    true = {int(it["image_index"]): int(ds.labels[it["image_index"]]) for it in items}
    recs = bl.baseline_records(items, ds.maps, true, ds.label_space)
    assert recs and all(r["correct"] for r in recs)
    assert {r["kind"] for r in recs} <= set(bl.CLASS_KINDS)
    # predict "none" (id 8) everywhere: defect_type answers are right only on none maps
    none = {i: 8 for i in true}
    recs = bl.baseline_records(items, ds.maps, none, ds.label_space)
    dt = [r for r in recs if r["kind"] == "defect_type"]
    want = [ds.labels[int(r["id"].split("-")[0])] == 8 for r in dt]
    assert [r["correct"] for r in dt] == want
    s = bl.summarize_baseline(recs, none, ds.labels)
    np.testing.assert_allclose(s["classifier_accuracy"], np.mean([ds.labels[i] == 8 for i in none]))
    # the training / held-out phrasing splits, recounted from the items' heldout flags
    heldout_of = {it["id"]: it["heldout"] for it in items}
    for part, flag in (("seen", False), ("heldout", True)):
        ok = [w for r, w in zip(dt, want) if heldout_of[r["id"]] == flag]
        assert ok, part
        assert s[part]["by_kind"]["defect_type"]["n"] == len(ok)
        np.testing.assert_allclose(s[part]["by_kind"]["defect_type"]["accuracy"], np.mean(ok))


def test_lm_loss_matches_numpy():
    from wamglm_jax.losses.lm import lm_loss
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], np.int32)
    weights = np.array([1, 1, 1, 0.5, 1, 4, 1], np.float32)          # per token id
    out = lm_loss(logits, tokens, mask)
    weighted = lm_loss(logits, tokens, mask, weights)
    nll, hits, w = [], [], []
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                z = logits[b, t - 1].astype(np.float64)
                lp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
                nll.append(-lp[tokens[b, t]])
                hits.append(np.argmax(z) == tokens[b, t])
                w.append(weights[tokens[b, t]])
    assert len(set(w)) > 1                      # the weights matter on this draw
    np.testing.assert_allclose(float(out["loss"]), np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(float(out["ce"]), np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(float(weighted["loss"]), np.average(nll, weights=w), rtol=1e-5)
    np.testing.assert_allclose(float(weighted["ce"]), np.mean(nll), rtol=1e-5)
    for o in (out, weighted):
        np.testing.assert_allclose(float(o["token_accuracy"]), np.mean(hits))
        assert int(o["loss_tokens"]) == 4


def test_count_diagnostics_by_hand():
    def rec(kind, parsed, expected, correct=False):
        return dict(id="d", turn=1, kind=kind, parsed=parsed, expected=expected,
                    correct=correct, heldout=False)
    recs = [
        # N copied, share 50/500 = 0.1 vs 0.1: within; |50-50|/50 = 0
        rec("count", {"failing": 50, "total": 500}, {"failing": 50, "total": 500}, True),
        # N wrong (400), share 50/400 = 0.125 vs 0.1: 25% off; |50-50| = 0 though
        rec("count", {"failing": 50, "total": 400}, {"failing": 50, "total": 500}, True),
        # N copied, share 12/1000 vs 10/1000: 20% off; rel error 0.2
        rec("count", {"failing": 12, "total": 1000}, {"failing": 10, "total": 1000}),
        # failing only (no N): not in the share, rel error |300-200|/200 = 0.5
        rec("count", {"failing": 300, "total": None}, {"failing": 200, "total": 900}),
        # unparseable
        rec("count", None, {"failing": 150, "total": 900}),
        rec("yield", {"yield_pct": 90.0}, {"yield_pct": 92.5}),
        rec("yield", {"yield_pct": 80.0}, {"yield_pct": 79.0}),
        rec("yield", {"yield_pct": None}, {"yield_pct": 79.0}),
    ]
    d = qa_eval.count_diagnostics(recs)
    assert d["n_count_answers"] == 5
    assert d["die_count_copied"] == pytest.approx(2 / 5)        # a missing N is not a copy
    assert d["n_share"] == 3 and d["share_within_tol"] == pytest.approx(1 / 3)
    assert d["median_rel_error"] == pytest.approx(0.1)          # median of 0, 0, 0.2, 0.5
    assert d["n_stated"] == 0 and d["share_stated_within_tol"] is None
    assert d["by_failing"] == {"0-19": {"accuracy": 0.0, "n": 1},
                               "20-99": {"accuracy": 1.0, "n": 2},
                               ">=100": {"accuracy": 0.0, "n": 2}}
    assert d["n_yield"] == 2 and d["yield_median_abs_error"] == pytest.approx(1.75)
    assert qa_eval.summarize(recs)["count_diagnostics"] == d
    empty = qa_eval.count_diagnostics([])
    assert empty["die_count_copied"] is None and empty["median_rel_error"] is None


def test_count_diagnostics_share_first_answers_by_hand():
    """Share-first answers ("P% of the N dies fail, which is F dies."): the stated share, the
    product F = P% of N, and the count that exact product would give, each scored by hand."""
    def rec(parsed, expected):
        return dict(id="d", turn=1, kind="count", parsed=parsed, expected=expected,
                    correct=False, heldout=False)
    recs = [
        # share 10% right; 10% of 500 = 50 = F; exact product 50 = truth
        rec({"failing": 50, "total": 500, "pct": 10.0}, {"failing": 50, "total": 500}),
        # share 12% vs 20%: 40% off; F 150 vs 120 (tol 12): off; product 120 vs 200: off
        rec({"failing": 150, "total": 1000, "pct": 12.0}, {"failing": 200, "total": 1000}),
        # share right, N mis-copied (700): F 70 = 10% of 700; product 70 vs 100: off
        rec({"failing": 70, "total": 700, "pct": 10.0}, {"failing": 100, "total": 1000}),
        # share right, F 150 vs 100: off; exact product 100 = truth
        rec({"failing": 150, "total": 1000, "pct": 10.0}, {"failing": 100, "total": 1000}),
        # share 8.0 vs 8.36% (4.3% off); 8% of 2046 = 163.7 ~ 164; 164 vs 171 (tol 17.1)
        rec({"failing": 164, "total": 2046, "pct": 8.0}, {"failing": 171, "total": 2046}),
        # share 10.0 vs 10.5% (4.8% off); F 300 vs 100: off; product 100 vs 105 (tol 10.5)
        rec({"failing": 300, "total": 1000, "pct": 10.0}, {"failing": 105, "total": 1000}),
        # older form (no stated share): in none of the three
        rec({"failing": 30, "total": 300}, {"failing": 30, "total": 300}),
    ]
    d = qa_eval.count_diagnostics(recs)
    assert d["n_stated"] == 6
    assert d["share_stated_within_tol"] == pytest.approx(5 / 6)
    assert d["product_within_tol"] == pytest.approx(3 / 6)
    assert d["exact_product_accuracy"] == pytest.approx(4 / 6)


def test_zone_diagnostics_by_hand():
    """kind='zone_extent': the same figures over zone answers only, N the zone's dies; count
    answers and the yield do not enter; a wrong zone total is not a copy."""
    def rec(kind, parsed, expected):
        return dict(id="d", turn=1, kind=kind, parsed=parsed, expected=expected,
                    correct=False, heldout=False)
    recs = [
        # edge total copied (1120); 27% of 1120 = 302.4 ~ F; share 302/1120 = truth
        rec("zone_extent", {"zone": "edge", "failing": 302, "total": 1120, "pct": 27.0},
            {"zone": "edge", "failing": 302, "total": 1120}),
        # total copied; stated 20% vs 25% true (20% off); F 100 vs 20% of 400 = 80: off
        rec("zone_extent", {"zone": "center", "failing": 100, "total": 400, "pct": 20.0},
            {"zone": "center", "failing": 100, "total": 400}),
        # count-first zone answer with a wrong total (estimated 900 against 1000)
        rec("zone_extent", {"zone": "middle", "failing": 90, "total": 900},
            {"zone": "middle", "failing": 100, "total": 1000}),
        rec("count", {"failing": 5, "total": 7, "pct": 1.0}, {"failing": 50, "total": 500}),
        rec("yield", {"yield_pct": 90.0}, {"yield_pct": 92.5}),
    ]
    d = qa_eval.count_diagnostics(recs, kind="zone_extent")
    assert d["n_count_answers"] == 3
    assert d["die_count_copied"] == pytest.approx(2 / 3)
    assert d["n_share"] == 3 and d["share_within_tol"] == pytest.approx(3 / 3)  # 90/900 = 0.1
    assert d["n_stated"] == 2
    assert d["share_stated_within_tol"] == pytest.approx(1 / 2)
    assert d["product_within_tol"] == pytest.approx(1 / 2)
    assert d["median_rel_error"] == pytest.approx(0.0)             # 0, 0, 0.1
    assert "n_yield" not in d
    assert qa_eval.summarize(recs)["zone_diagnostics"] == d
    with pytest.raises(ValueError, match="kind 'yield'"):
        qa_eval.count_diagnostics(recs, kind="yield")


def test_report_markdown_lists_every_kind(data):
    from wamglm_jax.evaluate.stage2_report import report_markdown
    _, items = data
    recs = _records(items, lambda it, t, k: it["messages"][t]["content"] if t % 4 else "?")
    s = qa_eval.summarize(recs)
    assert s["answerable"]["excluded_kinds"] == []      # batch: the lot context line
    assert s["answerable"]["turn_accuracy"] == s["turn_accuracy"]
    report = dict(steps=3, final_train_loss=1.0, wall_seconds=2.0, eval_split="val",
                  qa=s["by_kind"], qa_summary={k: v for k, v in s.items() if k != "by_kind"},
                  baseline=None, plot="/x/qa.png", examples=[])
    md = report_markdown(report)
    cd = s["count_diagnostics"]
    assert f"Failing-die counts ({cd['n_count_answers']} answers): die count copied from the " \
        f"context line {100 * cd['die_count_copied']:.1f}%" in md
    # the reference answers are share-first: their share and product are exact
    assert cd["n_stated"] > 0 and cd["share_stated_within_tol"] == 1.0
    assert cd["product_within_tol"] == 1.0 and cd["exact_product_accuracy"] == 1.0
    assert f"Share-first answers ({cd['n_stated']}): stated share within 10% 100.0%" in md
    zd = s["zone_diagnostics"]
    assert zd["n_count_answers"] == s["by_kind"]["zone_extent"]["n"] > 0
    assert f"Zone counts ({zd['n_count_answers']} answers): the zone's die total right" in md
    assert f"{100 * zd['die_count_copied']:.1f}%" in md.split("Zone counts (")[1]
    for kind, v in s["by_kind"].items():
        assert f"| {kind} | {100 * v['accuracy']:.1f}% | {v['n']} |" in md
        # training / held-out phrasing columns, recounted from the records
        cols = []
        for heldout in (False, True):
            ok = [r["correct"] for r in recs if r["kind"] == kind and r["heldout"] == heldout]
            cols.append(f"{100 * np.mean(ok):.1f}%" if ok else "n/a")
        assert f"| {kind} | {100 * v['accuracy']:.1f}% | {v['n']} | {cols[0]} | {cols[1]} |" \
            in md
    assert "language model: random init" in md and "LM warm-up" not in md
    report.update(lm_source="/lm", lm_warmup=dict(steps=30, sentences=400, eval_sentences=50,
                                                  eval_split="val", count_within_tol=0.62,
                                                  count_exact=0.1))
    md = report_markdown(report)
    assert "language model: /lm" in md
    assert ("LM warm-up: 30 steps on 400 product sentences; then the count is within tolerance "
            "on 62.0% of 50 `val` sentences (exact 10.0%)") in md
    report["lm_warmup"] = dict(steps=30, sentences=400)
    assert "LM warm-up: 30 steps on 400 product sentences; not scored" in report_markdown(report)


def test_phrasing_of_names_the_question_asked(data):
    """The template phrasing_of gives matches the question line of the user turn (with the
    {zone} / {pattern} slots as wildcards), for held-out and training items alike."""
    import re
    _, items = data
    n = 0
    for it in items:
        for step, (t, kind, _, msgs) in enumerate(qa_eval.turn_prompts(it)):
            q = msgs[-1]["content"].rsplit("\n", 1)[-1]
            tpl = qa_eval.phrasing_of(it, step)
            pat = re.escape(tpl).replace(r"\{zone\}", ".+").replace(r"\{pattern\}", ".+")
            assert re.fullmatch(pat, q), (tpl, q)
            n += 1
    assert n > 200 and qa_eval.phrasing_of({"messages": []}, 0) is None


def test_heldout_phrasings_recounted(data):
    """summarize's per-phrasing list against a count over the question texts themselves; a
    model that misreads one held-out phrasing shows as that row only."""
    from wamglm_jax.evaluate.stage2_report import report_markdown
    from wamglm_jax.qa.phrasings import HELDOUT
    _, items = data
    bad = HELDOUT["defect_type"][0]
    def answer(it, t, kind):              # the yield for every question of that phrasing
        if it["heldout"] and it["messages"][t - 1]["content"].endswith(bad):
            return "The yield is 90%."
        return it["messages"][t]["content"]

    recs = _records(items, answer)
    s = qa_eval.summarize(recs)
    rows = {(h["kind"], h["phrasing"]): h for h in s["heldout_phrasings"]}
    want = {}
    for it in items:
        if not it["heldout"]:
            continue
        for t, kind, _, msgs in qa_eval.turn_prompts(it):
            q = msgs[-1]["content"].rsplit("\n", 1)[-1]
            hits = [p for p in HELDOUT[kind] if "{" not in p and p == q]
            if hits:
                want.setdefault((kind, hits[0]), []).append(q != bad)
    assert want and all(rows[k]["n"] == len(v) and rows[k]["accuracy"] == np.mean(v)
                        for k, v in want.items())
    assert rows[("defect_type", bad)]["accuracy"] == 0.0
    assert all(h["accuracy"] == 1.0 for h in s["heldout_phrasings"] if h["phrasing"] != bad)
    report = dict(steps=3, final_train_loss=1.0, wall_seconds=2.0, eval_split="val",
                  qa=s["by_kind"], qa_summary={k: v for k, v in s.items() if k != "by_kind"},
                  baseline=None, plot="/x/qa.png", examples=[])
    assert f"| defect_type | {bad} | 0.0% | {rows[('defect_type', bad)]['n']} |" in \
        report_markdown(report)


def test_mcnemar_p_matches_scipy_binomtest():
    from scipy.stats import binomtest
    for a, b in [(0, 0), (3, 0), (0, 7), (5, 5), (12, 4), (30, 41), (1, 60), (1480, 1620)]:
        want = 1.0 if a + b == 0 else binomtest(min(a, b), a + b, 0.5).pvalue
        np.testing.assert_allclose(bl.mcnemar_exact_p(a, b), want, rtol=1e-12)


def test_paired_comparison_counts_answer_for_answer(data):
    ds, items = data
    # the baseline predicts "none" everywhere; the model's answers are right on every third
    # turn, so the two disagree on a known set of (id, turn) pairs
    none = {int(it["image_index"]): 8 for it in items}
    base = bl.baseline_records(items, ds.maps, none, ds.label_space)
    model = _records(items, lambda it, t, k: it["messages"][t]["content"] if t % 3 == 1 else ".")
    model.append(dict(model[0], id="not-in-baseline"))        # unpaired: ignored
    got = bl.paired_comparison(model, base)
    base_ok = {(r["id"], r["turn"]): r["correct"] for r in base}
    for kind in bl.CLASS_KINDS:
        pairs = [(r["correct"], base_ok[(r["id"], r["turn"])]) for r in model
                 if r["kind"] == kind and (r["id"], r["turn"]) in base_ok]
        if not pairs:
            assert kind not in got
            continue
        v = got[kind]
        assert v["n"] == len(pairs)
        assert v["model_only"] == sum(m and not b for m, b in pairs)
        assert v["baseline_only"] == sum(b and not m for m, b in pairs)
        np.testing.assert_allclose(v["model_accuracy"], np.mean([m for m, _ in pairs]))
        np.testing.assert_allclose(v["baseline_accuracy"], np.mean([b for _, b in pairs]))
    assert got["defect_type"]["model_only"] + got["defect_type"]["baseline_only"] > 0
    # the report renders one row per paired kind
    from wamglm_jax.evaluate.stage2_report import report_markdown
    s = qa_eval.summarize(model)
    md = report_markdown(dict(steps=3, final_train_loss=1.0, wall_seconds=2.0, eval_split="val",
                              qa=s["by_kind"], qa_summary={k: v for k, v in s.items()
                                                           if k != "by_kind"},
                              baseline={"paired": got}, plot="/x/qa.png", examples=[]))
    v = got["defect_type"]
    assert (f"| defect_type | {v['n']} | {100 * v['model_accuracy']:.1f}% | "
            f"{100 * v['baseline_accuracy']:.1f}% | {v['model_only']} | {v['baseline_only']} | "
            in md)


def test_bad_count_form_names_the_config_field(tmp_path):
    from configs import quickstart
    from wamglm_jax.train import stage2
    config = quickstart.get_config("ci")
    config.stage2.count_form = "share"
    with pytest.raises(ValueError, match=r"config.stage2.count_form='share': expected one of "
                                         r"\('share_first', 'count_first'\)"):
        stage2.run(config, str(tmp_path))
    assert not (tmp_path / "stage2" / "report.json").exists()


def test_question_frames_reach_the_training_dialogues(tmp_path, monkeypatch):
    """config.stage2.question_frames.prob frames the training questions before the tokenizer
    is trained on them (stopped there: no training). Bad values: the test below."""
    from configs import quickstart
    from wamglm_jax.qa import phrasings
    from wamglm_jax.train import stage2
    seen = {}

    class Stop(Exception):
        pass

    def fake_tokenizer(s2, workdir, train_items):
        seen["items"] = train_items
        raise Stop

    monkeypatch.setattr(stage2, "get_tokenizer", fake_tokenizer)
    config = quickstart.get_config("ci")
    config.stage2.question_frames.prob = 1.0
    with pytest.raises(Stop):
        stage2.run(config, str(tmp_path / "ok"))
    questions = [m["content"].rsplit("\n", 1)[-1] for it in seen["items"]
                 for m in it["messages"] if m["role"] == "user"]
    prefixes = [f.split("{")[0] for f in phrasings.FRAMES if not f.startswith("{")]
    suffixes = [f.split("}")[-1] for f in phrasings.FRAMES if f.startswith("{q}")]
    assert questions and all(any(q.startswith(p) for p in prefixes) or
                             any(q.endswith(s) for s in suffixes) for q in questions)


@pytest.mark.parametrize("field,value", [("question_frames.prob", 1.5),
                                         ("question_noise.dialogue_prob", -0.1),
                                         ("question_noise.word_prob", 2.0),
                                         ("question_noise.pseudo_share", -0.5),
                                         ("count_drills.prob", 1.5),
                                         ("count_drills.turns", 0)])
def test_bad_question_augmentation_fails_before_anything_is_built(tmp_path, monkeypatch, field,
                                                                  value):
    """A probability outside [0, 1] (or a drill of no exchanges) names its field before any
    data is read or written."""
    from configs import quickstart
    from wamglm_jax.train import stage2

    def no_data(*a, **k):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(stage2, "load_splits", no_data)
    config = quickstart.get_config("ci")
    group, name = field.split(".")
    config.stage2[group][name] = value
    expected = ("an integer >= 1" if field.endswith("turns")
                else r"a probability in \[0, 1\]")
    with pytest.raises(ValueError, match=rf"config.stage2.{field}={value}: expected {expected}"):
        stage2.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("field,value", [("zone_form", "zones"), ("count_form", "shares")])
def test_bad_answer_form_fails_before_anything_is_built(tmp_path, monkeypatch, field, value):
    from configs import quickstart
    from wamglm_jax.train import stage2

    def no_data(*a, **k):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(stage2, "load_splits", no_data)
    config = quickstart.get_config("ci")
    config.stage2[field] = value
    with pytest.raises(ValueError, match=rf"config.stage2.{field}='{value}': expected one of"):
        stage2.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_numeric_loss_weight_fails_before_anything_is_built(tmp_path, monkeypatch, value):
    from configs import quickstart
    from wamglm_jax.train import stage2

    def no_data(*a, **k):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(stage2, "load_splits", no_data)
    config = quickstart.get_config("ci")
    config.stage2.numeric_loss_weight = value
    with pytest.raises(ValueError, match=r"config.stage2.numeric_loss_weight=.*: expected a "
                                         r"finite number > 0"):
        stage2.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_numeric_loss_weight_and_zone_form_reach_the_run(tmp_path, monkeypatch):
    """With numeric_loss_weight=3 the step gets weight 3 on exactly the digit tokens (checked
    against the tokenizer's own spelling of the digits) and 1 elsewhere; the encode stats
    count the digit targets. zone_form='share_first' reaches the train and eval dialogues."""
    from configs import quickstart
    from wamglm_jax.train import stage2

    class Stop(Exception):
        pass

    seen = {}

    def spy_step(model, alpha, token_weights=None):
        seen["weights"] = token_weights
        raise Stop

    real_encode = stage2.qenc.encode_items

    def spy_encode(tok, items, **kw):
        enc, stats = real_encode(tok, items, **kw)
        seen.setdefault("tok", tok)
        seen.setdefault("enc", enc)
        seen.setdefault("stats", stats)
        seen.setdefault("items", list(items))
        return enc, stats

    monkeypatch.setattr(stage2, "make_train_step", spy_step)
    monkeypatch.setattr(stage2.qenc, "encode_items", spy_encode)
    config = quickstart.get_config("ci")
    config.stage2.numeric_loss_weight = 3.0
    config.stage2.zone_form = "share_first"
    config.stage2.init_vision_from_stage1 = False
    del config.stage2["count_drills"]           # a config that leaves a section to the defaults
    with pytest.raises(Stop):
        stage2.run(config, str(tmp_path / "run"))
    tok, w = seen["tok"], seen["weights"]
    digit_ids = {tok.convert_tokens_to_ids(tok.tokenize(str(d))[0]) for d in range(10)}
    assert len(digit_ids) == 10 and w.dtype == np.float32 and len(w) >= len(tok)
    assert set(np.flatnonzero(w == 3.0)) == digit_ids
    assert set(np.unique(w)) == {1.0, 3.0}
    brute = sum(1 for e in seen["enc"] for t, m in zip(e["tokens"], e["loss_mask"])
                if m and tok.decode([int(t)]).strip().isdigit())
    assert seen["stats"]["numeric_loss_tokens"] == brute > 0
    written = [json.loads(line) for name in ("train", "val") for line in
               (tmp_path / "run" / "stage2" / "vmqa" / f"{name}.jsonl").read_text().splitlines()]
    assert seen["items"] and written
    saved = json.loads((tmp_path / "run" / "stage2" / "config.json").read_text())["stage2"]
    assert saved["zone_form"] == "share_first" and saved["numeric_loss_weight"] == 3.0
    assert saved["count_drills"] == {"prob": 0.0, "turns": 4}       # the defaults, filled in
    for it in seen["items"] + written:
        assert it["zone_form"] == "share_first"
        assert " in the middle ring and " in it["messages"][0]["content"].split("\n")[1]



def test_weighted_train_step_reports_plain_ce_beside_the_objective():
    """One tiny stage-2 step from the same state and batch, with and without token weights:
    the weighted step's `ce` is the plain step's loss, its objective differs, and both update
    the gradient."""
    import jax
    from configs import presets
    from tools.profile_step import build_stage2
    from wamglm_jax.parallel import sharding as shd
    from wamglm_jax.parallel.mesh import make_mesh
    from wamglm_jax.train import stage2

    config = presets.get_config("tiny")
    rules, mesh = shd.rules_from_config(config), make_mesh(config.mesh)
    plain_step, state, host_batch, _ = build_stage2(config, 8, 96, mesh, rules)
    v = int(config.model.lm.vocab_size)
    weights = np.ones(v, np.float32)
    weights[np.unique(host_batch["tokens"][:, 70:])[:20]] = 5.0     # some of the targets
    model = stage2.WamGLM(config.model)
    weighted_step = stage2.make_train_step(model, float(stage2.stage_cfg(config).lora.alpha),
                                           weights)
    batch = shd.global_batch(host_batch, mesh)
    with shd.activate(mesh, rules):
        _, m_plain = jax.jit(plain_step)(state, batch)
        _, m_weighted = jax.jit(weighted_step)(state, batch)
    np.testing.assert_allclose(float(m_plain["ce"]), float(m_plain["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_weighted["ce"]), float(m_plain["loss"]), rtol=1e-5)
    assert abs(float(m_weighted["loss"]) - float(m_weighted["ce"])) > 1e-3
    assert float(m_weighted["token_accuracy"]) == float(m_plain["token_accuracy"])
    # the weights change the gradient (the first step's update is 0: learning-rate warmup)
    assert abs(float(m_weighted["grad_norm"]) - float(m_plain["grad_norm"])) > 1e-4
