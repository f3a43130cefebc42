"""WM-811K LSWMD.pkl reader: a small DataFrame in the real layout, pickled the way Python 2
wrote it as far as Python 3 can (protocol 2, numpy buffers and text as Python-2 `str`
opcodes, legacy pandas module paths)."""
import io
import pickle
import struct

import numpy as np
import pandas as pd
import pytest

from wamglm_jax.data import labels as L
from wamglm_jax.data.dataset import DatasetFormatError, load_dataset
from wamglm_jax.data.wafer import WaferMapError
from wamglm_jax.data.wm811k import UntrustedPickleError, read_lswmd


class Py2Pickler(pickle._Pickler):
    """Writes bytes AND str as Python-2 `str` opcodes (SHORT_BINSTRING / BINSTRING), which a
    Python-3 unpickler decodes with `encoding` (ASCII by default)."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2str
    dispatch[str] = save_py2str


def make_frame(maps, ftypes, splits):
    obj = lambda s: np.array([[s]], dtype=object) if s else np.zeros((0, 0))  # noqa: E731
    df = pd.DataFrame({
        "waferMap": maps,
        "dieSize": np.array([float((m > 0).sum()) for m in maps]),
        "lotName": pd.Series([f"lot{i // 2 + 1}" for i in range(len(maps))], dtype=object),
        "waferIndex": np.arange(1, len(maps) + 1, dtype=float),
        "trianTestLabel": [obj(s) for s in splits],
        "failureType": [obj(f) for f in ftypes],
    }, index=pd.Index(np.arange(len(maps), dtype=np.int64)))
    df.columns = pd.Index(list(df.columns), dtype=object)   # old pandas: object columns
    return df


def py2_pickle(df) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(df)
    raw = buf.getvalue()
    # legacy module paths of old pandas / numpy
    for new, old in [(b"cpandas.core.indexes.base\n_new_Index\n", b"cpandas.indexes.base\n_new_Index\n"),
                     (b"cpandas\nIndex\n", b"cpandas.core.indexes.numeric\nInt64Index\n"),
                     (b"cpandas.core.internals.managers\nBlockManager\n",
                      b"cpandas.core.internals\nBlockManager\n"),
                     (b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")]:
        assert new in raw, new
        raw = raw.replace(new, old)
    return raw


MAPS = [np.array([[0, 1, 1, 0], [1, 2, 2, 1], [0, 1, 1, 0]], np.uint8),
        np.full((5, 3), 1, np.uint8), np.full((3, 3), 2, np.uint8),
        np.array([[1, 1, 1], [1, 1, 1], [2, 1, 0]], np.uint8), np.full((4, 6), 1, np.uint8)]
FTYPES = ["Center", "", "Near-full", "none", "Edge-Loc"]
SPLITS = ["Training", "", "Test", "Training", "Test"]


@pytest.fixture
def lswmd(tmp_path):
    p = tmp_path / "LSWMD.pkl"
    p.write_bytes(py2_pickle(make_frame(MAPS, FTYPES, SPLITS)))
    return p


def test_py2_style_pickle_needs_latin1_and_aliases(lswmd):
    raw = lswmd.read_bytes()
    assert b"pandas.indexes.base" in raw and b"Int64Index" in raw
    from pandas.compat.pickle_compat import Unpickler as PandasUnpickler
    from wamglm_jax.data.wm811k import _unpickler_class
    with pytest.raises(ModuleNotFoundError, match="pandas.indexes"):   # latin1, no aliases
        PandasUnpickler(io.BytesIO(raw), encoding="latin1").load()
    with pytest.raises(UnicodeDecodeError):                           # aliases, ASCII
        _unpickler_class()(io.BytesIO(raw)).load()
    df = _unpickler_class()(io.BytesIO(raw), encoding="latin1").load()
    assert list(df.columns) == ["waferMap", "dieSize", "lotName", "waferIndex",
                                "trianTestLabel", "failureType"]
    assert df["waferIndex"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_read_lswmd(lswmd):
    lab, unl = read_lswmd(lswmd, trust_pickle=True)
    assert [L.WM811K_CLASSES[i] for i in lab.labels] == ["Center", "Near-full", "none",
                                                           "Edge-Loc"]
    assert lab.split.tolist() == ["train", "test", "train", "test"]
    assert all(np.array_equal(m, MAPS[i]) for m, i in zip(lab.maps, [0, 2, 3, 4]))
    assert lab.meta[0]["lot"] == "lot1" and lab.meta[1]["wafer_index"] == 3
    assert lab.meta[3]["die_size"] == 24.0
    assert len(unl) == 1 and unl.labels.tolist() == [-1] and unl.split.tolist() == ["unlabeled"]
    assert np.array_equal(unl.maps[0], MAPS[1])
    ds = load_dataset(lswmd, trust_pickle=True, split="test")
    assert len(ds) == 2
    both = load_dataset(lswmd, trust_pickle=True, include_unlabeled=True)
    assert len(both) == 5


def test_untrusted_and_bad_pickles(lswmd, tmp_path):
    with pytest.raises(UntrustedPickleError, match="trust_pickle=True"):
        load_dataset(lswmd)
    raw = lswmd.read_bytes()
    (tmp_path / "t.pkl").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetFormatError, match="t.pkl: not a readable WM-811K pickle"):
        read_lswmd(tmp_path / "t.pkl", trust_pickle=True)
    df = make_frame(MAPS, FTYPES, SPLITS).rename(columns={"failureType": "label"})
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(df))
    with pytest.raises(DatasetFormatError, match="c.pkl: missing columns \\['failureType'\\]"):
        read_lswmd(tmp_path / "c.pkl", trust_pickle=True)
    (tmp_path / "u.pkl").write_bytes(pickle.dumps(make_frame(MAPS, ["Blob"] * 5, SPLITS)))
    with pytest.raises(L.UnknownLabelError, match="u.pkl:failureType\\[0\\]: unknown label"):
        read_lswmd(tmp_path / "u.pkl", trust_pickle=True)
    bad = list(MAPS)
    bad[3] = np.array([[1, 5, 1], [1, 1, 1], [1, 1, 1]], np.uint8)
    (tmp_path / "v.pkl").write_bytes(pickle.dumps(make_frame(bad, FTYPES, SPLITS)))
    with pytest.raises(WaferMapError, match="v.pkl:waferMap \\[map 3\\]: 1 values outside"):
        read_lswmd(tmp_path / "v.pkl", trust_pickle=True)
    (tmp_path / "l.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DatasetFormatError, match="holds a list, expected a pandas DataFrame"):
        read_lswmd(tmp_path / "l.pkl", trust_pickle=True)
