"""tools.probe_share: ridge against numpy's least squares, the scores by hand, the probe on
features that do / do not carry the share, and the CLI on a tiny stage-2 run (bad inputs
named)."""
import json

import numpy as np
import pytest

from tools import probe_share
from wamglm_jax.data.generator import generate
from wamglm_jax.data.labels import WM811K_CLASSES
from wamglm_jax.data.preprocess import area_resize_onehot
from wamglm_jax.data.wafer import fail_fraction


def test_ridge_matches_least_squares_and_shrinks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)) * [1, 3, 0.5, 2, 1] + [4, -1, 0, 2, 7]
    y = x @ [0.3, -0.2, 1.0, 0.0, 0.5] + 0.1 + 0.01 * rng.standard_normal(200)
    a = np.c_[x, np.ones(len(x))]                      # independent: plain lstsq with intercept
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    x2 = rng.standard_normal((30, 5))
    got = probe_share.fit_ridge(x, y, 1e-9)(x2)
    np.testing.assert_allclose(got, np.c_[x2, np.ones(30)] @ coef, rtol=1e-6, atol=1e-8)
    flat = probe_share.fit_ridge(x, y, 1e9)(x2)        # huge penalty: the mean of y
    np.testing.assert_allclose(flat, y.mean(), atol=1e-5)
    exact = x @ [0.3, -0.2, 1.0, 0.0, 0.5]           # noiseless: any penalty only hurts
    assert probe_share.select_ridge(x, exact)[0] == min(probe_share.LAMBDAS)
    unrelated = rng.standard_normal(200)               # no signal: the strongest penalty
    assert probe_share.select_ridge(x, unrelated)[0] >= 10.0


def test_score_share_by_hand():
    true = np.array([0.10, 0.20, 0.0, 0.50])
    pred = np.array([0.109, 0.23, 0.02, 0.50])
    s = probe_share.score_share(pred, true)
    # relative errors on the three maps with failing dies: 0.09, 0.15, 0.0
    assert s["within_10pct_rel"] == pytest.approx(2 / 3)
    assert s["within_3pt"] == 1.0 and s["n"] == 4
    assert s["median_rel_error"] == pytest.approx(0.09)
    s = probe_share.score_share(np.array([0.0, 0.06]), np.array([0.0, 0.02]))
    assert s["within_3pt"] == 0.5


def test_probe_finds_the_share_only_where_it_is():
    ds = generate(160, seed=5)
    fit, ev = ds.maps[:120], ds.maps[120:]
    images_of = lambda maps: np.stack([area_resize_onehot(m, 16) for m in maps])  # noqa: E731
    # features that carry the share (failing and good mass) vs features that do not
    carry = probe_share.probe(lambda im: np.c_[im[..., 2].sum((1, 2)), im[..., 1].sum((1, 2))],
                              images_of, fit, ev, batch_size=50)
    noise = probe_share.probe(lambda im: np.random.default_rng(len(im)).standard_normal(
        (len(im), 3)), images_of, fit, ev, batch_size=50)
    exact = carry["rows"]["exact share from the image"]
    assert exact["within_10pct_rel"] == 1.0 and exact["median_rel_error"] < 1e-6
    assert carry["rows"]["ridge: mean features and squares"]["within_10pct_rel"] > 0.5
    assert noise["rows"]["ridge: mean features"]["within_10pct_rel"] < 0.5
    assert noise["rows"]["exact share from the image"] == exact       # same maps, same truth
    # the truth is the share of dies that fail, counted on the maps themselves
    assert exact["n"] == 40 and fail_fraction(ev[0]) == pytest.approx(
        probe_share.image_share(images_of(ev[:1]))[0], abs=1e-6)


def _write(path, ds, splits):
    maps = ds.maps
    np.savez(path, maps_flat=np.concatenate([m.reshape(-1) for m in maps]),
             offsets=np.cumsum([0] + [m.size for m in maps[:-1]]).astype(np.int64),
             shapes=np.array([m.shape for m in maps], np.int32),
             labels=np.array([WM811K_CLASSES[i] for i in ds.labels]), split=np.array(splits))


@pytest.mark.slow
def test_cli_on_a_tiny_run(tiny_stage2_run, tmp_path, capsys):
    ds = generate(40, seed=2)
    data = tmp_path / "maps.npz"
    _write(data, ds, ["train"] * 30 + ["val"] * 10)
    out = tmp_path / "out" / "probe.json"
    assert probe_share.main([f"--workdir={tiny_stage2_run}", f"--data={data}", f"--json={out}",
                             "--num_fit=30"]) == 0
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {"exact share from the image", "ridge: mean features",
                                "ridge: mean features and squares"}
    assert res["rows"]["exact share from the image"]["within_10pct_rel"] == 1.0
    assert res["num_fit"] == 30 and res["rows"]["ridge: mean features"]["n"] == 10
    printed = capsys.readouterr().out
    assert "| exact share from the image" in printed and printed.strip().endswith("}")
    # bad inputs: named, exit 2, nothing written
    assert probe_share.main([f"--workdir={tmp_path}", f"--data={data}"]) == 2
    assert "model_config.json: not found" in capsys.readouterr().err
    assert probe_share.main([f"--workdir={tiny_stage2_run}", f"--data={data}",
                             "--eval_split=test"]) == 2
    assert "no maps in split 'test' (splits: ['train', 'val'])" in capsys.readouterr().err
    assert probe_share.main([f"--workdir={tiny_stage2_run}", f"--data={tmp_path / 'no.npz'}"]) == 2
    assert "no.npz" in capsys.readouterr().err
    assert probe_share.main([f"--workdir={tiny_stage2_run}", f"--data={data}",
                             "--num_fit=3"]) == 2
    assert "--num_fit=3" in capsys.readouterr().err
