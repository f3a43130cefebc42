"""Count drills (qa/drills.py): answers checked against numbers parsed back from the text and
counted on the map with numpy; the stage-2 wiring (after the noise, in the tokenizer's text,
out of the alignment captions); bad config values."""
import re

import numpy as np
import pytest

from wamglm_jax.data.generator import generate
from wamglm_jax.qa import drills
from wamglm_jax.qa.phrasings import HELDOUT_ONLY_WORDS


@pytest.fixture(scope="module")
def data():
    return generate(60, seed=5)


def test_every_answer_is_the_stated_share_of_the_context_die_count(data):
    items = drills.build_count_drills(data, prob=1.0, turns=3, seed=0)
    assert len(items) == int(sum(np.count_nonzero(m) > 0 for m in data.maps))
    shares = [(np.asarray(m) == 2).sum() / np.count_nonzero(m) for m in data.maps
              if np.count_nonzero(m)]
    for it in items:
        m = data.maps[it["image_index"]]
        total = int(re.search(r"The wafer has (\d+) dies\.", it["messages"][0]["content"])[1])
        assert total == np.count_nonzero(m)
        users = [x["content"] for x in it["messages"] if x["role"] == "user"]
        answers = [x["content"] for x in it["messages"] if x["role"] == "assistant"]
        assert len(users) == len(answers) == 3 and it["drill"] and not it["heldout"]
        for t, (q, a) in enumerate(zip(users, answers)):
            pct = float(re.search(r"(\d+(?:\.\d+)?)% of", q.rsplit("\n", 1)[-1])[1])
            got = re.fullmatch(r"(\d+(?:\.\d+)?)% of the (\d+) dies fail, which is (\d+) dies?\.",
                               a)
            assert got, a
            assert float(got[1]) == pct and int(got[2]) == total
            failing = int(got[3])
            # the stated share is the count's share rounded to 0.1 %
            assert abs(100.0 * failing / total - pct) <= 0.05 + 1e-9
            if t == 0:                          # the first share is the map's own
                assert failing == int((np.asarray(m) == 2).sum())
            else:                               # later ones: another drill map's share
                assert any(round(s * total) == failing for s in shares)
        assert [k["turn"] for k in it["answer_key"]] == [1, 3, 5]


def test_probability_selects_a_seeded_share_of_the_maps(data):
    assert drills.build_count_drills(data, prob=0.0, turns=2, seed=0) == []
    a = drills.build_count_drills(data, prob=0.5, turns=2, seed=1)
    b = drills.build_count_drills(data, prob=0.5, turns=2, seed=1)
    c = drills.build_count_drills(data, prob=0.5, turns=2, seed=2)
    assert a == b and a != c and 10 < len(a) < 50
    only = drills.build_count_drills(data, prob=1.0, turns=1, seed=0, indices=[3, 7])
    assert [it["image_index"] for it in only] == [3, 7]


def test_drill_questions_use_no_heldout_only_word():
    words = {w.lower() for q in drills.FIRST_QUESTIONS + drills.NEXT_QUESTIONS
             for w in re.findall(r"[A-Za-z][A-Za-z\-']*", q)}
    assert not words & HELDOUT_ONLY_WORDS


@pytest.mark.parametrize("prob,turns,match", [
    (1.5, 4, r"config.stage2.count_drills.prob=1.5: expected a probability in \[0, 1\]"),
    (0.5, 0, r"config.stage2.count_drills.turns=0: expected an integer >= 1"),
    (0.5, 2.5, r"config.stage2.count_drills.turns=2.5: expected an integer >= 1")])
def test_bad_drill_config_names_the_field(data, prob, turns, match):
    with pytest.raises(ValueError, match=match):
        drills.build_count_drills(data, prob=prob, turns=turns, seed=0)


def test_evaluation_never_reads_a_drill_as_a_bank_phrasing(data):
    from wamglm_jax.evaluate.qa import phrasing_of
    item = drills.build_count_drills(data, prob=1.0, turns=2, seed=0)[0]
    assert phrasing_of(item, 0) is None and phrasing_of(item, 1) is None


def test_alignment_captions_leave_drills_out(data):
    from wamglm_jax.qa.dialogues import build_dialogues
    from wamglm_jax.train.stage2_data import describe_items
    items = build_dialogues(data, seed=0) + drills.build_count_drills(data, prob=1.0, turns=2,
                                                                      seed=0)
    described = describe_items(items)
    assert len(described) == len(data.maps) and not any(d.get("drill") for d in described)


def test_stage2_trains_on_unnoised_drills_and_the_tokenizer_sees_them(tmp_path, monkeypatch):
    """Stopped at the encoding: drills follow the (always-on) noise untouched, and the
    tokenizer was trained on them too."""
    from configs import quickstart
    from wamglm_jax.train import stage2
    seen = {}

    class Stop(Exception):
        pass

    real_tokenizer = stage2.get_tokenizer

    def spy_tokenizer(s2, workdir, train_items):
        seen["tok_items"] = list(train_items)
        return real_tokenizer(s2, workdir, train_items)

    def stop_encode(tok, items, **kw):
        seen["items"] = list(items)
        raise Stop

    monkeypatch.setattr(stage2, "get_tokenizer", spy_tokenizer)
    monkeypatch.setattr(stage2.qenc, "encode_items", stop_encode)
    config = quickstart.get_config("ci")
    config.stage2.count_drills.prob = 0.5
    config.stage2.count_drills.turns = 3
    config.stage2.question_noise.dialogue_prob = 1.0
    with pytest.raises(Stop):
        stage2.run(config, str(tmp_path / "run"))
    trained = [it for it in seen["items"] if it.get("drill")]
    dialogues = [it for it in seen["items"] if not it.get("drill")]
    maps = len(dialogues) // int(config.stage2.per_map)
    assert 0.35 * maps < len(trained) < 0.65 * maps       # prob 0.5 of the training maps
    assert trained and dialogues and all(it.get("question_noise") for it in dialogues)
    assert not any(it.get("question_noise") for it in trained)
    assert {it["id"] for it in trained} <= {it["id"] for it in seen["tok_items"]}
    first = trained[0]["messages"][0]["content"].rsplit("\n", 1)[-1]
    assert any(re.fullmatch(re.escape(q).replace(re.escape("{pct}"), r"\d+(?:\.\d+)?"), first)
               for q in drills.FIRST_QUESTIONS)
    written = (tmp_path / "run" / "stage2" / "vmqa" / "train.jsonl").read_text()
    assert '"drill": true' in written


def test_qa_stats_counts_drills_apart(data, tmp_path):
    from tools.qa_stats import stats
    from wamglm_jax.qa.dialogues import build_dialogues
    from wamglm_jax.qa.tokenizer import build_tokenizer
    dialogues = build_dialogues(data, seed=0)
    drill_items = drills.build_count_drills(data, prob=1.0, turns=2, seed=0)
    tok = build_tokenizer(dialogues + drill_items, str(tmp_path / "tok"), vocab_size=400)
    s = stats(dialogues + drill_items, tok, num_image_tokens=4)
    assert s["tokens"]["samples"] == len(dialogues) + len(drill_items)   # all that trains
    assert s["dialogues"] == len(dialogues) and s["drills"] == len(drill_items)
    assert s["drill_turns"] == 2 * len(drill_items)
    assert s["kinds"].get("count", 0) == sum(k["kind"] == "count" for it in dialogues
                                             for k in it["answer_key"])


def test_zone_form_share_first_gives_drills_the_dialogues_context(data):
    """With zone_form='share_first' the dialogues' die count line lists the dies per zone; a
    drill's first turn carries the same line for the same map (the answers are unchanged)."""
    from wamglm_jax.qa.dialogues import build_dialogues
    plain = drills.build_count_drills(data, prob=1.0, turns=2, seed=0)
    zoned = drills.build_count_drills(data, prob=1.0, turns=2, seed=0, zone_form="share_first")
    dialogue_line = {it["image_index"]: it["messages"][0]["content"].split("\n")[1]
                     for it in build_dialogues(data, seed=0, zone_form="share_first")}
    for p, z in zip(plain, zoned):
        line = z["messages"][0]["content"].split("\n")[1]
        assert line == dialogue_line[z["image_index"]]
        assert re.fullmatch(r"The wafer has (\d+) dies: (\d+) in the center, (\d+) in the middle "
                            r"ring and (\d+) at the edge\.", line)
        assert p["messages"][1:] == z["messages"][1:] and z["zone_form"] == "share_first"
    with pytest.raises(ValueError, match="zone_form 'zones'; expected one of"):
        drills.build_count_drills(data, prob=1.0, turns=2, seed=0, zone_form="zones")
