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
