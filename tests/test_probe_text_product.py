"""tools.probe_text_product on a tiny stage-2 run: its score equals a brute-force greedy (a
full forward of the Decoder per token) read with the QA tolerance; bad inputs named."""
import json

import numpy as np
import pytest

from tools import probe_text_product

pytestmark = pytest.mark.slow          # the tiny stage-2 run fixture trains


def test_cli_matches_a_brute_force_greedy(tiny_stage2_run, tmp_path, capsys):
    from tools.probe_drills import load_maps
    from wamglm_jax.inference.load import load_for_inference
    from wamglm_jax.models.decoder import Decoder
    from wamglm_jax.qa.facts import compute_facts

    out = tmp_path / "p.json"
    assert probe_text_product.main([f"--workdir={tiny_stage2_run}", "--num_maps=3",
                                    f"--json={out}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res == json.loads(out.read_text()) and res["sentences"] == 3

    cfg, params, tok = load_for_inference(tiny_stage2_run)
    maps = load_maps(str(tiny_stage2_run), None, "test").maps
    within = exact = 0
    for m in maps[:3]:
        f = compute_facts(np.asarray(m))
        prompt = (f"{100 * f['failing'] / f['total']:.1f}% of the {f['total']} dies fail, "
                  "which is")
        ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        for _ in range(7):
            x = np.asarray([ids])
            logits = Decoder(cfg).apply({"params": params["lm"]}, x,
                                        attention_mask=np.ones_like(x))
            ids.append(int(np.argmax(logits[0, -1])))
        words = tok.decode(ids[len(ids) - 7:], skip_special_tokens=True).split()
        guess = int(words[0]) if words and words[0].isdigit() else None
        true = f["failing"]
        within += guess is not None and (abs(guess - true) <= 1 if true < 10
                                         else abs(guess - true) <= 0.1 * true)
        exact += guess == true
    assert res["count_within_tol"] == pytest.approx(within / 3)
    assert res["count_exact"] == pytest.approx(exact / 3)
    assert f"{100 * res['count_within_tol']:.1f}%" in lines[-2]


def test_bad_inputs_are_named(tiny_stage2_run, tmp_path, capsys):
    assert probe_text_product.main([f"--workdir={tiny_stage2_run}", "--num_maps=0"]) == 2
    assert "--num_maps=0" in capsys.readouterr().err
    assert probe_text_product.main([f"--workdir={tmp_path}"]) == 2
    assert f"{tmp_path}/stage2/config.json: no such file" in capsys.readouterr().err
    assert probe_text_product.main([f"--workdir={tiny_stage2_run}", "--max_len=9"]) == 2
    assert "tokens > --max_len=9" in capsys.readouterr().err
