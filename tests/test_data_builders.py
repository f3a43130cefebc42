"""TFDS ArrayRecord builders, tools.make_dataset and reading back through grain."""
import json
import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from wamglm_jax.data import builders  # noqa: E402
from wamglm_jax.data.dataset import DatasetFormatError, load_dataset  # noqa: E402
from wamglm_jax.data.generator import generate  # noqa: E402
from wamglm_jax.data.pipeline import image_loader  # noqa: E402
from wamglm_jax.data.preprocess import area_resize_onehot  # noqa: E402
from wamglm_jax.data.splits import synthetic_lot_numbers  # noqa: E402
from wamglm_jax.data.wm811k import UntrustedPickleError  # noqa: E402
from tools import make_dataset  # noqa: E402


def test_synthetic_builder_roundtrip_and_grain(tmp_path):
    b = builders.prepare("synthetic_wafers", str(tmp_path), num_train=27, num_val=9,
                         num_test=0, seed=3)
    assert b.name == "synthetic_wafers" and builders.Wm811k.name == "wm811k"
    assert builders.Mixedwm38.name == "mixedwm38"
    assert b.info.splits["train"].num_examples == 27 and "test" not in b.info.splits
    assert any(f.endswith("array_record-00000-of-00001") for f in os.listdir(b.data_dir))
    want = generate(27, seed=3, lot_prefix="L",
                    lot_numbers=synthetic_lot_numbers(3, "train", 27))
    src = builders.data_source(str(tmp_path), "train")
    assert len(src) == 27
    got = sorted((src[i]["index"], src[i]) for i in range(27))
    for i, rec in got:
        assert np.array_equal(rec["map"], want.maps[i]) and rec["label"] == want.labels[i]
        assert rec["wafer_index"] == want.meta[i]["wafer_index"]
    ds = load_dataset(str(tmp_path), split="val")
    assert len(ds) == 9 and ds.label_space == "wm811k"
    batch = next(iter(image_loader(src, image_size=8, batch_size=5, train=False)))
    for j in range(5):
        rec = src[int(batch["index"][j])]
        np.testing.assert_allclose(batch["image"][j], area_resize_onehot(rec["map"], 8),
                                   atol=1e-6)
    with pytest.raises(DatasetFormatError, match="no split 'test'"):
        builders.data_source(str(tmp_path), "test")


def test_wm811k_and_mixedwm38_builders(tmp_path):
    from test_data_wm811k import FTYPES, MAPS, SPLITS, make_frame, py2_pickle
    man = tmp_path / "manual"
    man.mkdir()
    (man / "LSWMD.pkl").write_bytes(py2_pickle(make_frame(MAPS, FTYPES, SPLITS)))
    with pytest.raises(UntrustedPickleError):
        builders.prepare("wm811k", str(tmp_path / "a"), manual_dir=str(man))
    builders.prepare("wm811k", str(tmp_path / "b"), manual_dir=str(man), trust_pickle=True,
                     include_unlabeled=True)
    ds = load_dataset(str(tmp_path / "b"))
    assert sorted(ds.splits()) == ["test", "train", "unlabeled"]
    assert sorted(ds.select("train").labels.tolist()) == [0, 8]          # Center, none
    assert ds.select("unlabeled").labels.tolist() == [-1]
    m = np.stack([np.ones((52, 52), np.uint8)] * 2)
    m[1, 5, 5:9] = 3
    lab = np.zeros((2, 8), np.uint8)
    lab[1, 5] = 1
    np.savez(man / "Wafer_Map_Datasets.npz", arr_0=m, arr_1=lab)
    with pytest.warns(UserWarning, match="1 maps held value 3"):
        builders.prepare("mixedwm38", str(tmp_path / "c"),
                         path=str(man / "Wafer_Map_Datasets.npz"))
    mx = load_dataset(str(tmp_path / "c"))
    assert mx.label_space == "mixedwm38" and sorted(mx.labels.tolist()) == [0, 6]
    assert (mx.maps[mx.labels.tolist().index(6)] == 3).sum() == 0


def run_cli(capsys, *args):
    res = make_dataset.main(list(args))
    out = capsys.readouterr()
    last = json.loads(out.out.strip().splitlines()[-1])
    assert last == res
    return res, out.err


def test_make_dataset_cli(tmp_path, capsys):
    out = tmp_path / "syn"
    res, _ = run_cli(capsys, "--source=synthetic", "--num=18", "--num_val=9", "--num_test=9",
                     f"--output={out}", "--seed=1")
    assert res["counts"]["Center"] == 4 and res["splits"]["train"]["none"] == 2
    assert res["duplicates_across_splits"] == 0
    before = sorted(os.listdir(out))
    with pytest.raises(SystemExit):
        make_dataset.main(["--source=synthetic", "--num=9", f"--output={out}"])
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before and len(load_dataset(str(out))) == 36
    # user files: class sub-directories of PNGs and a leaked duplicate across splits
    from PIL import Image
    pal = np.array([[255, 255, 255], [143, 188, 143], [178, 34, 34]], np.uint8)
    maps = [np.random.default_rng(k).integers(1, 3, (6, 7)).astype(np.uint8) for k in range(6)]
    for k, m in enumerate(maps):
        d = tmp_path / "png" / ("Center" if k < 3 else "Scratch")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pal[m]).save(d / f"{k}.png")
    res, _ = run_cli(capsys, "--source=png", f"--input={tmp_path / 'png'}",
                     f"--output={tmp_path / 'o1'}")
    assert res["counts"]["Center"] == 3 and res["counts"]["Scratch"] == 3
    np.savez(tmp_path / "u.npz", maps=np.stack(maps + [maps[0]]),
             labels=np.array(["Loc"] * 7), split=np.array(["train"] * 6 + ["val"]))
    res, err = run_cli(capsys, "--source=npz", f"--input={tmp_path / 'u.npz'}",
                       f"--output={tmp_path / 'o2'}", "--overwrite")
    assert res["duplicates_across_splits"] == 2 and "WARNING: 2 maps are byte-identical" in err
    m3 = np.ones((2, 52, 52), np.uint8)
    m3[0, 3, 3:6] = 3
    np.savez(tmp_path / "Wafer_Map_Datasets.npz", arr_0=m3, arr_1=np.zeros((2, 8), np.uint8))
    res, err = run_cli(capsys, "--source=mixedwm38", f"--input={tmp_path}/Wafer_Map_Datasets.npz",
                       f"--output={tmp_path / 'o5'}")
    assert res["counts"]["Normal"] == 2 and "1 maps held value 3 (3 dies)" in res["warnings"][0]
    assert "WARNING:" in err and "value 3" in err
    res, _ = run_cli(capsys, "--source=npz", f"--input={tmp_path / 'u.npz'}",
                     f"--output={tmp_path / 'o2'}", "--overwrite")        # replaced, complete
    assert res["splits"]["val"]["Loc"] == 1
    with pytest.raises(SystemExit):
        make_dataset.main(["--source=csv", f"--input={tmp_path / 'missing.csv'}",
                           f"--output={tmp_path / 'o3'}"])
    assert "missing.csv: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()
    pkl = tmp_path / "LSWMD.pkl"
    pkl.write_bytes(pickle.dumps([1]))
    with pytest.raises(SystemExit):
        make_dataset.main(["--source=wm811k", f"--input={pkl}", f"--output={tmp_path / 'o4'}"])
    assert "trust_pickle=True" in capsys.readouterr().err


def test_benchmark_tool_smoke(tmp_path, capsys):
    from tools import benchmark_data
    rows = benchmark_data.main(["--num=45", "--batches=2", "--batch_size=4", "--tfds_num=20",
                                "--image_size=8", "--workers=1", f"--json={tmp_path / 'b.json'}"])
    saved = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert saved == rows and rows[0]["n"] == 45 and all(r["rate"] > 0 for r in rows)
    assert rows[-1]["what"].endswith("views=3 workers=1") and rows[-1]["n"] == 8
    assert "maps/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark_data.main(["--num=45", "--batches=2", "--workers=-1"])
    assert "--workers: -1 is negative" in capsys.readouterr().err
