"""tools.probe_drills on a tiny stage-2 run: one answer per drill exchange, the table and the
JSON agree, the maps come from the run's own config or from --data; bad inputs named."""
import json

import numpy as np
import pytest

from tools import probe_drills
from wamglm_jax.data.generator import generate
from wamglm_jax.data.labels import WM811K_CLASSES

pytestmark = pytest.mark.slow          # the tiny stage-2 run fixture trains


def _write(path, ds, split):
    maps = ds.maps
    np.savez(path, maps_flat=np.concatenate([m.reshape(-1) for m in maps]),
             offsets=np.cumsum([0] + [m.size for m in maps[:-1]]).astype(np.int64),
             shapes=np.array([m.shape for m in maps], np.int32),
             labels=np.array([WM811K_CLASSES[i] for i in ds.labels]),
             split=np.array([split] * len(maps)))


def test_cli_on_a_tiny_run(tiny_stage2_run, tmp_path, capsys):
    out = tmp_path / "j" / "drills.json"
    assert probe_drills.main([f"--workdir={tiny_stage2_run}", "--num_maps=3", "--turns=2",
                              f"--json={out}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res == json.loads(out.read_text())
    assert res["maps"] == 3 and res["answers"] == 6 and res["split"] == "test"
    for k in ("count_within_tol", "first_share", "other_shares"):
        assert 0.0 <= res[k] <= 1.0
    # the overall rate is the answer-weighted mean of the two halves (3 answers each)
    assert np.isclose(res["count_within_tol"], (res["first_share"] + res["other_shares"]) / 2)
    assert f"{100 * res['count_within_tol']:.1f}%" in lines[-2]


def test_maps_from_a_data_file(tiny_stage2_run, tmp_path, capsys):
    path = tmp_path / "maps.npz"
    _write(path, generate(4, seed=9), "val")
    assert probe_drills.main([f"--workdir={tiny_stage2_run}", f"--data={path}", "--split=val",
                              "--num_maps=2", "--turns=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answers"] == 2


def test_bad_inputs_are_named(tiny_stage2_run, tmp_path, capsys):
    assert probe_drills.main([f"--workdir={tiny_stage2_run}", "--num_maps=0"]) == 2
    assert "--num_maps=0" in capsys.readouterr().err
    assert probe_drills.main([f"--workdir={tmp_path}"]) == 2
    assert f"{tmp_path}/stage2/config.json: no such file" in capsys.readouterr().err
    assert probe_drills.main([f"--workdir={tiny_stage2_run}", "--split=nope"]) == 2
    assert "no 'nope' split" in capsys.readouterr().err
