"""Every file reader on small files in the real layouts, and every bad input."""

import numpy as np
import pytest

from wamglm_jax.data import labels as L
from wamglm_jax.data.dataset import DatasetFormatError, load_dataset
from wamglm_jax.data.wafer import WaferMapError

RNG = np.random.default_rng(0)


def rand_map(h, w, k=0):
    m = np.random.default_rng(k).integers(1, 3, (h, w)).astype(np.uint8)
    m[0, 0] = 0
    return m


def write_ragged(path, maps, labels, split=None):
    d = dict(maps_flat=np.concatenate([m.reshape(-1) for m in maps]),
             offsets=np.cumsum([0] + [m.size for m in maps[:-1]]).astype(np.int64),
             shapes=np.array([m.shape for m in maps], np.int32), labels=np.array(labels))
    if split is not None:
        d["split"] = np.array(split)
    np.savez(path, **d)


def test_ragged_layout(tmp_path):
    maps = [rand_map(5, 4, 1), rand_map(7, 9, 2), rand_map(3, 3, 3)]
    p = tmp_path / "r.npz"
    write_ragged(p, maps, ["Edge_Loc", "none", "Near-full"], ["train", "val", "train"])
    ds = load_dataset(p)
    assert ds.label_space == "wm811k" and len(ds) == 3
    assert [L.WM811K_CLASSES[i] for i in ds.labels] == ["Edge-Loc", "none", "Near-full"]
    assert all(np.array_equal(a, b) for a, b in zip(ds.maps, maps))
    tr = load_dataset(p, split="train")
    assert len(tr) == 2 and np.array_equal(tr.maps[1], maps[2])
    with pytest.raises(DatasetFormatError, match="no split \\['test'\\]"):
        load_dataset(p, split="test")


def test_dense_and_raw_mixedwm38_layouts_with_value3_policy(tmp_path):
    maps = np.stack([rand_map(52, 52, k) for k in range(4)])
    names = ["Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch", "Random"]
    lab = np.zeros((4, 8), np.uint8)
    lab[1, [0, 2]] = 1          # Center + Edge-Loc -> C10 (id 9)
    lab[2, 5] = 1               # Near-full (id 6)
    lab[3, [1, 4, 6, 3]] = 1    # D+L+ER+S (id 37)
    np.savez(tmp_path / "d.npz", maps=maps, labels=lab, label_names=np.array(names),
             split=np.array(["train", "train", "val", "val"]))
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.label_space == "mixedwm38" and ds.labels.tolist() == [0, 9, 6, 37]
    # raw file: column order is MIXED_TYPES (Scratch before Random); value 3 in a map
    raw = maps.copy()
    raw[2, 10, 10:15] = 3
    np.savez(tmp_path / "Wafer_Map_Datasets.npz", arr_0=raw, arr_1=lab)
    with pytest.warns(UserWarning, match="1 maps held value 3 \\(5 dies\\)"):
        r = load_dataset(tmp_path / "Wafer_Map_Datasets.npz")
    assert r.labels.tolist() == [0, 9, 6, 37] and r.split is None
    assert (r.maps[2][10, 10:15] == 2).all() and r.meta[2]["value3_dies"] == 5
    with pytest.raises(WaferMapError, match="1 maps hold value 3"):
        load_dataset(tmp_path / "Wafer_Map_Datasets.npz", value3="error")
    # label_names spelled differently and permuted
    perm = [7, 6, 5, 4, 3, 2, 1, 0]
    np.savez(tmp_path / "p.npz", maps=maps, labels=lab[:, perm],
             label_names=np.array(["random", "Scratch", "Near_Full", "Loc", "Edge_Ring",
                                   "Edge_Loc", "Donut", "Center"]))
    assert load_dataset(tmp_path / "p.npz").labels.tolist() == [0, 9, 6, 37]


def test_npy_png_csv_user_files(tmp_path):
    m = rand_map(6, 5)
    np.save(tmp_path / "one.npy", m)
    np.save(tmp_path / "many.npy", np.stack([m, m]))
    one, many = load_dataset(tmp_path / "one.npy"), load_dataset(tmp_path / "many.npy")
    assert len(one) == 1 and np.array_equal(one.maps[0], m) and one.labels.tolist() == [-1]
    assert len(many) == 2
    from PIL import Image
    pal = np.array([[255, 255, 255], [143, 188, 143], [178, 34, 34]], np.uint8)
    Image.fromarray(pal[m]).save(tmp_path / "m.png")
    assert np.array_equal(load_dataset(tmp_path / "m.png").maps[0], m)
    Image.fromarray(m, mode="L").save(tmp_path / "g.png")         # raw states 0/1/2
    assert np.array_equal(load_dataset(tmp_path / "g.png").maps[0], m)
    Image.fromarray(pal[m]).convert("P", palette=Image.Palette.ADAPTIVE, colors=3).save(
        tmp_path / "p.png")                                      # palette indices in any order
    assert np.array_equal(load_dataset(tmp_path / "p.png").maps[0], m)
    img = pal[m].copy()
    img[2, 3] = (20, 40, 250)                                     # blue: not a die colour
    Image.fromarray(img).save(tmp_path / "bad.png")
    with pytest.raises(WaferMapError, match="bad.png: pixel \\(row 2, col 3\\)"):
        load_dataset(tmp_path / "bad.png")
    rows = ["x,y,pass,wafer,label"]
    for y in range(m.shape[0]):
        for x in range(m.shape[1]):
            if m[y, x]:
                rows.append(f"{x + 10},{y - 3},{'P' if m[y, x] == 1 else 'F'},w1,Edge_Ring")
    rows.append("0,0,pass,w2,")
    rows += [f"{x},{y},fail,w2," for x, y in [(1, 0), (2, 0), (0, 1), (1, 1), (2, 1),
                                              (0, 2), (1, 2), (2, 2)]]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    c = load_dataset(tmp_path / "t.csv")
    want = m.copy()
    assert np.array_equal(c.maps[0], want) and c.labels.tolist() == [3, -1]
    assert c.maps[1].tolist() == [[1, 2, 2], [2, 2, 2], [2, 2, 2]]


@pytest.mark.parametrize("content,msg", [
    ("x,y\n1,2\n", "lacks columns x, y and a status"),
    ("x,y,pass\n1,2,maybe\n", "line 2: column 'pass' is 'maybe'"),
    ("x,y,pass\n1,2,P\n1,2,F\n", "line 3: die \\(x=1, y=2\\)"),
    ("x,y,pass\na,2,P\n", "not integer die coordinates"),
    ("x,y,pass,label\n0,0,P,Blob\n1,1,P,Blob\n2,2,P,Blob\n", "unknown label 'Blob'"),
    ("", "empty CSV"),
])
def test_bad_csv(tmp_path, content, msg):
    (tmp_path / "b.csv").write_text(content)
    with pytest.raises(ValueError, match=msg) as e:
        load_dataset(tmp_path / "b.csv")
    assert "b.csv" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz: no such file"):
        load_dataset(tmp_path / "nope.npz")
    maps = [rand_map(5, 4, 1), rand_map(6, 6, 2)]
    write_ragged(tmp_path / "ok.npz", maps, ["Center", "Loc"])
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFormatError, match="trunc.npz: not a readable .npz"):
        load_dataset(tmp_path / "trunc.npz")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DatasetFormatError, match="junk.npy: not a readable .npy"):
        load_dataset(tmp_path / "junk.npy")
    write_ragged(tmp_path / "lab.npz", maps, ["Center", "Blob"])
    with pytest.raises(L.UnknownLabelError, match="lab.npz:labels\\[1\\]: unknown label 'Blob'"):
        load_dataset(tmp_path / "lab.npz")
    bad = [maps[0], np.where(maps[1] == 2, 7, maps[1]).astype(np.uint8)]
    write_ragged(tmp_path / "v.npz", bad, ["Center", "Loc"])
    with pytest.raises(WaferMapError, match="v.npz:maps_flat \\[map 1\\]: .* outside"):
        load_dataset(tmp_path / "v.npz")
    write_ragged(tmp_path / "off.npz", [maps[0], np.zeros((4, 4), np.uint8)], ["Center", "Loc"])
    with pytest.raises(WaferMapError, match="\\[map 1\\]: every die is off-wafer"):
        load_dataset(tmp_path / "off.npz")
    np.savez(tmp_path / "cols.npz", maps_flat=np.ones(9, np.uint8), offsets=np.zeros(1))
    with pytest.raises(DatasetFormatError, match="ragged layout needs keys.*missing \\['shapes', "
                       "'labels'\\]"):
        load_dataset(tmp_path / "cols.npz")
    np.savez(tmp_path / "short.npz", maps_flat=np.ones(9, np.uint8), offsets=np.array([0, 5]),
             shapes=np.array([[3, 3], [3, 3]]), labels=np.array(["none", "none"]))
    with pytest.raises(DatasetFormatError, match="map 1 .* runs past the end of 'maps_flat'"):
        load_dataset(tmp_path / "short.npz")
    np.savez(tmp_path / "nan.npz", maps=np.full((1, 4, 4), np.nan), labels=np.zeros((1, 8)))
    with pytest.raises(WaferMapError, match="nan.npz:maps \\[map 0\\]: 16 NaN"):
        load_dataset(tmp_path / "nan.npz")
    np.savez(tmp_path / "dim.npz", maps=np.ones((4, 4, 4, 4)), labels=np.zeros((4, 8)))
    with pytest.raises(DatasetFormatError, match="expected \\[N, H, W\\]"):
        load_dataset(tmp_path / "dim.npz")
    np.savez(tmp_path / "combo.npz", maps=np.ones((1, 4, 4)),
             labels=np.array([[0, 0, 0, 0, 0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="combo.npz:labels\\[0\\]: the type combination"):
        load_dataset(tmp_path / "combo.npz")
    np.savez(tmp_path / "nokeys.npz", foo=np.ones(3))
    with pytest.raises(DatasetFormatError, match="no map arrays; expected one of the layouts"):
        load_dataset(tmp_path / "nokeys.npz")
    (tmp_path / "adir").mkdir()
    with pytest.raises(DatasetFormatError, match="adir: not a dataset directory"):
        load_dataset(tmp_path / "adir")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DatasetFormatError, match="unknown file type"):
        load_dataset(tmp_path / "x.txt")


def test_ragged_with_ids_label_space_and_meta(tmp_path):
    maps = [rand_map(5, 4, 1), rand_map(6, 6, 2)]
    p = tmp_path / "q.npz"
    np.savez(p, maps_flat=np.concatenate([m.reshape(-1) for m in maps]),
             offsets=np.array([0, 20]), shapes=np.array([[5, 4], [6, 6]]),
             labels=np.array([9, 37], np.int32), label_space=np.array("mixedwm38"),
             lot=np.array(["lotA", ""]), wafer_index=np.array([3, -1], np.int32))
    ds = load_dataset(p)
    assert ds.label_space == "mixedwm38" and ds.labels.tolist() == [9, 37]
    assert ds.meta[0]["lot"] == "lotA" and ds.meta[0]["wafer_index"] == 3
    assert ds.meta[1]["lot"] is None and ds.meta[1]["wafer_index"] is None
    np.savez(p, maps_flat=np.concatenate([m.reshape(-1) for m in maps]),
             offsets=np.array([0, 20]), shapes=np.array([[5, 4], [6, 6]]),
             labels=np.array(["C+EL", "Normal"]), label_space=np.array("mixedwm38"))
    assert load_dataset(p).labels.tolist() == [9, 0]
