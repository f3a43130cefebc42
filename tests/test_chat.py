"""The chat: a tiny stage-2 run, `python -m tools.chat --question ...` end to end, and the
ChatSession context-overflow policy."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_chat_script_answers_each_question(tiny_stage2_run, tmp_path):
    m = np.ones((12, 12), np.uint8)
    m[0, 0] = m[0, -1] = m[-1, 0] = m[-1, -1] = 0
    m[5:7, 5:7] = 2
    path = tmp_path / "map.npy"
    np.save(path, m)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-m", "tools.chat", f"--workdir={tiny_stage2_run}", f"--map={path}",
         "--question=What defect pattern is on this wafer?", "--question=Why?",
         "--max_new_tokens=6"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answers = [ln for ln in out.stdout.splitlines() if ln.startswith("A: ")]
    assert len(answers) == 2, out.stdout
    assert "XX" in out.stdout            # the map was printed (failing block)
    assert "Context: The wafer has 140 dies.\n" in out.stdout       # 144 cells - 4 corners
    # a run trained with zone_form='share_first' is asked with the dies per zone
    import json
    import shutil
    from wamglm_jax.qa.facts import compute_facts
    zoned_run = tmp_path / "zoned_run"
    shutil.copytree(tiny_stage2_run, zoned_run)
    cfg_path = zoned_run / "stage2" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["stage2"]["zone_form"] == "count_first"     # written with the defaults filled in
    cfg["stage2"]["zone_form"] = "share_first"
    cfg_path.write_text(json.dumps(cfg))
    zoned = subprocess.run(
        [sys.executable, "-m", "tools.chat", f"--workdir={zoned_run}", f"--map={path}",
         "--question=How many dies fail at the edge?", "--max_new_tokens=4"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300)
    assert zoned.returncode == 0, zoned.stderr[-3000:]
    z = compute_facts(m)["zones"]
    assert (f"Context: The wafer has 140 dies: {z['center']['dies']} in the center, "
            f"{z['middle']['dies']} in the middle ring and {z['edge']['dies']} at the edge.\n"
            ) in zoned.stdout, zoned.stdout
    bad = subprocess.run([sys.executable, "-m", "tools.chat", f"--workdir={tiny_stage2_run}",
                          f"--map={tmp_path / 'missing.npy'}", "--question=hi"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "missing.npy" in (bad.stderr + bad.stdout)


def test_chat_session_drops_oldest_pairs_keeps_image(tiny_stage2_run):
    from wamglm_jax.inference.chat import ChatSession, ContextLengthError
    from wamglm_jax.inference.generate import GenerationConfig, Generator
    from wamglm_jax.qa.encode import encode_prompt
    from wamglm_jax.inference.load import load_for_inference

    cfg, params, tok = load_for_inference(tiny_stage2_run)
    gen = Generator(cfg, params)
    n = (cfg.vit.image_size // cfg.vit.patch_size) ** 2
    img = np.zeros((cfg.vit.image_size,) * 2 + (3,), np.float32)
    pairs = [("<image>\nWhat defect pattern is this?", "It is a Center pattern."),
             ("Where are the failures concentrated on this wafer map today?",
              "The failing dies are concentrated at the center, with no preferred side."),
             ("How many dies fail?", "12 of 300 dies fail.")]
    hist = [m for q, a in pairs for m in ({"role": "user", "content": q},
                                          {"role": "assistant", "content": a})]
    q = "Why?"
    keep = hist[:2] + hist[4:] + [{"role": "user", "content": q}]
    budget = len(encode_prompt(tok, keep, num_image_tokens=n))
    g = GenerationConfig(max_new_tokens=4, stop_tokens=(tok.eos_token_id,))
    logs = []
    s = ChatSession(gen, tok, img, gen=g, max_context=budget + 4, log=logs.append)
    s.history = [dict(m) for m in hist]
    s.ask(q)
    assert [m["content"] for m in s.history[:4]] == [m["content"] for m in keep[:4]]
    assert s.history[4]["content"] == q and s.history[0]["content"].startswith("<image>")
    assert len(logs) == 1 and "dropped the 1 oldest" in logs[0]
    # only the current question (with the image) fits: the image moves to it
    only = [{"role": "user", "content": f"<image>\n{q}"}]
    tight = len(encode_prompt(tok, only, num_image_tokens=n)) + 4
    s2 = ChatSession(gen, tok, img, gen=g, max_context=tight, log=logs.append)
    s2.history = [dict(m) for m in hist]
    s2.ask(q)
    assert s2.history[0]["content"] == f"<image>\n{q}" and len(s2.history) == 2
    with pytest.raises(ContextLengthError, match="image"):
        ChatSession(gen, tok, img, gen=g, max_context=n + 4).ask(q)


def test_chat_first_turn_carries_the_context_lines(tiny_stage2_run, tmp_path):
    """tools.chat: a dataset map with lot metadata gets the same context lines as the training
    dialogues (die count and lot line, recomputed here by hand); a bare .npy map gets the die
    count line only. ChatSession puts them after <image> in the first turn, and moves them with
    the image when the history is trimmed."""
    from tools.chat import load_map
    from wamglm_jax.data.generator import generate
    from wamglm_jax.inference.chat import ChatSession
    from wamglm_jax.inference.generate import GenerationConfig, Generator
    from wamglm_jax.qa.encode import encode_prompt
    from wamglm_jax.inference.load import load_for_inference

    ds = generate(1, seed=4)
    _, _, ctx = load_map(None, None, 4)
    md = ds.meta[0]
    dies = sum(int(v in (1, 2)) for row in ds.maps[0].tolist() for v in row)
    assert ctx == (f"The wafer has {dies} dies.\nLot {md['lot']}, wafer {md['wafer_index']}. "
                   "No other wafers of this lot were measured.")
    np.save(tmp_path / "m.npy", ds.maps[0])
    assert load_map(str(tmp_path / "m.npy"), None, 0)[2] == f"The wafer has {dies} dies."
    zoned = load_map(str(tmp_path / "m.npy"), None, 0, zone_dies=True)[2]   # zone_form run
    got = re.fullmatch(r"The wafer has (\d+) dies: (\d+) in the center, (\d+) in the middle "
                       r"ring and (\d+) at the edge\.", zoned)
    assert got and int(got[1]) == dies == sum(int(got[k]) for k in (2, 3, 4))

    cfg, params, tok = load_for_inference(tiny_stage2_run)
    gen = Generator(cfg, params)
    n = (cfg.vit.image_size // cfg.vit.patch_size) ** 2
    img = np.zeros((cfg.vit.image_size,) * 2 + (3,), np.float32)
    g = GenerationConfig(max_new_tokens=2, stop_tokens=(tok.eos_token_id,))
    s = ChatSession(gen, tok, img, gen=g, context=ctx, log=lambda _: None)
    s.ask("Is this a lot-wide problem?")
    assert s.history[0]["content"] == f"<image>\n{ctx}\nIs this a lot-wide problem?"
    only = [{"role": "user", "content": f"<image>\n{ctx}\nWhy?"}]
    tight = len(encode_prompt(tok, only, num_image_tokens=n)) + 2
    s2 = ChatSession(gen, tok, img, gen=g, context=ctx, max_context=tight, log=lambda _: None)
    s2.history = [{"role": "user", "content": f"<image>\n{ctx}\nWhat defect pattern is this?"},
                  {"role": "assistant", "content": "It is a Center pattern, clearly visible."}]
    s2.ask("Why?")
    assert s2.history[0]["content"] == f"<image>\n{ctx}\nWhy?" and len(s2.history) == 2


def test_answer_forms_of_a_run_and_bad_configs(tmp_path):
    """inference.load.answer_forms reads the run's stage2/config.json: both forms when given,
    the older defaults for a run written before zone_form existed, a clear error for a missing
    file, bad JSON or an unknown form (naming the file and the field)."""
    import json
    from wamglm_jax.inference.load import answer_forms

    def run_with(text):
        d = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        (d / "stage2").mkdir(parents=True)
        if text is not None:
            (d / "stage2" / "config.json").write_text(text)
        return d

    d = run_with(json.dumps({"stage2": {"count_form": "count_first", "zone_form": "share_first"}}))
    assert answer_forms(d) == {"count_form": "count_first", "zone_form": "share_first"}
    assert answer_forms(run_with(json.dumps({"stage2": {"count_form": "share_first"}}))) == \
        {"count_form": "share_first", "zone_form": "count_first"}
    with pytest.raises(FileNotFoundError, match=r"stage2/config.json: not found"):
        answer_forms(run_with(None))
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        answer_forms(run_with("{stage2: "))
    with pytest.raises(ValueError, match=r"config.json: stage2.zone_form='zones'; expected one"):
        answer_forms(run_with(json.dumps({"stage2": {"zone_form": "zones"}})))
