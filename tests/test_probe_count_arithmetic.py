"""tools/probe_count_arithmetic end to end and its argument errors (its sentence helpers and
scorer live in wamglm_jax/train/lm_warmup.py: tests/test_lm_warmup.py)."""
import json

import numpy as np
import pytest

from tools import probe_count_arithmetic as probe


def test_main_trains_and_writes_json(tmp_path):
    out = tmp_path / "probe.json"
    result = probe.main(["--steps=4", "--eval_every=2", "--num_maps=200", "--num_eval=16",
                         "--batch_size=8", f"--json={out}"])
    assert [r["step"] for r in result["rows"]] == [2, 4]
    assert [r["seen"] for r in result["rows"]] == [16, 32]
    assert json.loads(out.read_text()) == result
    for row in result["rows"]:
        assert 0.0 <= row["exact"] <= row["within_tol"] <= 1.0 and np.isfinite(row["loss"])
        assert row["by_context"] == {"0": {"within_tol": row["within_tol"],
                                           "exact": row["exact"]}}


@pytest.mark.parametrize("die_line", [False, True])
def test_packed_training_and_scores_after_context(tmp_path, die_line):
    """--pack=2 trains on rows of two sentences (batch_size sentences a step); --context=2,0
    scores each sentence after two others and alone, the first listed in within_tol/exact;
    --die_line puts each sentence after its die count line (the rows still fit)."""
    result = probe.main(["--steps=2", "--eval_every=2", "--num_maps=100", "--num_eval=8",
                         "--batch_size=8", "--pack=2", "--context=2,0"]
                        + ["--die_line"] * die_line)
    row = result["rows"][0]
    assert result["pack"] == 2 and result["contexts"] == [2, 0] and row["seen"] == 16
    assert result["die_line"] is die_line
    assert set(row["by_context"]) == {"2", "0"}
    assert row["within_tol"] == row["by_context"]["2"]["within_tol"]


def test_context_rows_put_other_maps_before_the_scored_one():
    pairs = np.arange(10).reshape(5, 2)             # five maps' (failing, total)
    rows = probe.context_rows(pairs, 2)
    assert rows.shape == (5, 3, 2)
    for i in range(5):
        assert rows[i, -1].tolist() == pairs[i].tolist()
        assert [r.tolist() for r in rows[i, :-1]] == [pairs[(i + 1) % 5].tolist(),
                                                      pairs[(i + 2) % 5].tolist()]
    assert (probe.context_rows(pairs, 0)[:, 0] == pairs).all()


@pytest.mark.parametrize("flag, message", [("--steps=0", "--steps=0"),
                                           ("--config=configs/nope.py", "no such file"),
                                           ("--config=configs/stage1.py",
                                            "lacks config.stage2.vocab_size"),
                                           ("--json=/nonexistent/dir/p.json",
                                            "its directory does not exist"),
                                           ("--pack=3", "not a multiple of --pack=3"),
                                           ("--context=a", "--context=a: expected distinct"),
                                           ("--context=0,0", "--context=0,0: expected"),
                                           ("--context=600", "needs more than 600 evaluation")])
def test_bad_arguments_are_named(flag, message, capsys):
    with pytest.raises((SystemExit, FileNotFoundError)) as err:
        probe.main([flag])
    text = str(err.value) + capsys.readouterr().err
    assert message in text


def test_pack_larger_than_the_sentences_is_named(capsys):
    with pytest.raises(SystemExit):
        probe.main(["--num_maps=3", "--pack=4", "--batch_size=4", "--steps=1"])
    assert "--pack=4: the 3 maps give 3 sentences, fewer than one row" in capsys.readouterr().err
