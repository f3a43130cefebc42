"""tools/probe_count_arithmetic: the prompt/target split, the loss mask and the scoring."""
import json

import numpy as np
import pytest

from tools import probe_count_arithmetic as probe
from wamglm_jax.qa.tokenizer import train_tokenizer

PAIRS = [(171, 2046), (0, 518), (1, 44), (9, 95), (3849, 4922)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([a + b for a, b in (probe.split_sentence(f, n) for f, n in PAIRS)],
                           vocab_size=300)


def test_split_sentence_is_the_share_first_answer():
    assert probe.split_sentence(171, 2046) == ("8.4% of the 2046 dies fail, which is",
                                               " 171 dies.")
    assert probe.split_sentence(1, 44) == ("2.3% of the 44 dies fail, which is", " 1 die.")


def test_encode_weights_cover_exactly_the_target(tok):
    toks, weights, plen = probe.encode(tok, PAIRS, max_len=32)
    for row, w, p, (f, n) in zip(toks, weights, plen, PAIRS):
        # weight i means "predict token i + 1": the target's tokens and the closing </s>
        predicted = row[1:][w[:-1] > 0]
        text = tok.decode(predicted[:-1])
        assert text == probe.split_sentence(f, n)[1]
        assert predicted[-1] == tok.eos_token_id
        assert tok.decode(row[1:p]) == probe.split_sentence(f, n)[0]


def test_encode_rejects_a_too_short_buffer(tok):
    with pytest.raises(ValueError, match="max_len=8"):
        probe.encode(tok, PAIRS, max_len=8)


def _fake_greedy(tok, answers):
    """A stand-in for the model: row i's prompt, then `answers[i]`, then padding."""
    def greedy(params, toks, plen):
        out = np.array(toks)
        for i, text in enumerate(answers):
            ids = tok.encode(text, add_special_tokens=False)
            out[i, int(plen[i]):] = 0
            out[i, int(plen[i]):int(plen[i]) + len(ids)] = ids
        return out
    return greedy


def test_evaluate_scores_with_the_qa_tolerance(tok):
    toks, _, plen = probe.encode(tok, PAIRS, max_len=32)
    # within 10% (or 1 die below 10): 171 -> 185 ok (8.2%), 0 -> 1 ok, 1 -> 3 no (2 dies),
    # 9 -> 10 ok, 3849 -> 4300 no (11.7%)
    answers = [" 185 dies.", " 1 die.", " 3 dies.", " 10 dies.", " 4300 dies."]
    got = probe.evaluate(_fake_greedy(tok, answers), None, tok, toks, plen, PAIRS, new_tokens=7)
    assert got == {"within_tol": 3 / 5, "exact": 0.0}
    exact = [probe.split_sentence(f, n)[1] for f, n in PAIRS]
    got = probe.evaluate(_fake_greedy(tok, exact), None, tok, toks, plen, PAIRS, new_tokens=7)
    assert got == {"within_tol": 1.0, "exact": 1.0}
    garbled = [" dies.", " x", "", " 9", " 4000"]   # no number, nothing, then 9 vs 9 and 4000
    got = probe.evaluate(_fake_greedy(tok, garbled), None, tok, toks, plen, PAIRS, new_tokens=7)
    assert got == {"within_tol": 2 / 5, "exact": 1 / 5}


def test_main_trains_and_writes_json(tmp_path):
    out = tmp_path / "probe.json"
    result = probe.main(["--steps=4", "--eval_every=2", "--num_maps=200", "--num_eval=16",
                         "--batch_size=8", f"--json={out}"])
    assert [r["step"] for r in result["rows"]] == [2, 4]
    assert [r["seen"] for r in result["rows"]] == [16, 32]
    assert json.loads(out.read_text()) == result
    for row in result["rows"]:
        assert 0.0 <= row["exact"] <= row["within_tol"] <= 1.0 and np.isfinite(row["loss"])


@pytest.mark.parametrize("flag, message", [("--steps=0", "--steps=0"),
                                           ("--config=configs/nope.py", "no such file"),
                                           ("--config=configs/stage1.py",
                                            "lacks config.stage2.vocab_size"),
                                           ("--json=/nonexistent/dir/p.json",
                                            "its directory does not exist")])
def test_bad_arguments_are_named(flag, message, capsys):
    with pytest.raises((SystemExit, FileNotFoundError)) as err:
        probe.main([flag])
    text = str(err.value) + capsys.readouterr().err
    assert message in text
