"""wafer.check_map, preprocess (area resize vs brute force, views), generator, splits."""
import re

import numpy as np
import pytest

from wamglm_jax.data import labels as L
from wamglm_jax.data.generator import generate
from wamglm_jax.data.preprocess import DIHEDRAL, area_resize_onehot, dihedral, make_views
from wamglm_jax.data.splits import default_data_config, load_splits
from wamglm_jax.data.wafer import WaferMapError, check_map


def test_check_map_accepts_and_converts():
    m = check_map(np.array([[0, 1, 2], [1, 2, 1], [0, 1.0, 0]]), "f.npy", 3)
    assert m.dtype == np.uint8 and m.tolist() == [[0, 1, 2], [1, 2, 1], [0, 1, 0]]


@pytest.mark.parametrize("bad,msg", [
    (np.zeros((3, 3, 3)), "expected a 2-D map"),
    (np.array([[0, 1, 3], [1, 1, 1], [1, 1, 1]]), "outside {0,1,2}"),
    (np.array([[0, 1, -1], [1, 1, 1], [1, 1, 1]]), "outside {0,1,2}"),
    (np.array([[0, 1, np.nan], [1, 1, 1], [1, 1, 1]]), "NaN"),
    (np.zeros((4, 4)), "all 0"),
    (np.zeros((0, 5)), "empty map"),
    (np.ones((2, 5)), "smaller than 3x3"),
    (np.array([[0.5, 1, 1], [1, 1, 1], [1, 1, 1]]), "non-integer"),
    (np.array([["a", "b", "c"]] * 3), "not numeric"),
])
def test_check_map_errors_name_source_and_problem(bad, msg):
    with pytest.raises(WaferMapError) as e:
        check_map(bad, "myfile.npz:maps", 7)
    assert msg in str(e.value) and "myfile.npz:maps" in str(e.value) and "map 7" in str(e.value)


def brute_force_resize(m, s):
    """Independent: integrate the one-hot over each output pixel on a fine sub-grid
    (exact for lcm-aligned sub-sampling)."""
    h, w = m.shape
    fh, fw = np.lcm(h, s), np.lcm(w, s)
    fine = m[np.arange(fh) * h // fh][:, np.arange(fw) * w // fw]       # [fh,fw]
    out = np.zeros((s, s, 3))
    for a in range(s):
        for b in range(s):
            blk = fine[a * fh // s:(a + 1) * fh // s, b * fw // s:(b + 1) * fw // s]
            for c in range(3):
                out[a, b, c] = (blk == c).mean()
    return out


@pytest.mark.parametrize("shape,s", [((7, 5), 4), ((5, 9), 12), ((13, 13), 13), ((6, 11), 8)])
def test_area_resize_matches_brute_force(shape, s):
    m = np.random.default_rng(0).integers(0, 3, shape).astype(np.uint8)
    got = area_resize_onehot(m, s)
    assert got.shape == (s, s, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, brute_force_resize(m, s), atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1, atol=1e-6)


def test_area_resize_exact_when_s_multiple_and_thin_scratch_survives():
    m = np.random.default_rng(1).integers(0, 3, (8, 4)).astype(np.uint8)
    got = area_resize_onehot(m, 16)
    onehot = np.eye(3)[m]
    np.testing.assert_allclose(got, onehot.repeat(2, 0).repeat(4, 1), atol=1e-6)
    big = np.ones((200, 200), np.uint8)
    big[100, :] = 2                                  # one-die scratch on a 200-die grid
    img = area_resize_onehot(big, 32)
    assert img[..., 2].sum() == pytest.approx(200 * 32 * 32 / 200 / 200, rel=1e-5)
    assert img[..., 2].max() > 0.1


def test_views_preserve_content_and_dihedral_group():
    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    outs = {dihedral(img, k, f).tobytes() for k, f in DIHEDRAL}
    assert len(outs) == 8
    # rotating the map then resizing == resizing then rotating (labels preserved by symmetry)
    m = np.random.default_rng(2).integers(0, 3, (9, 6)).astype(np.uint8)
    for k, f in DIHEDRAL:
        mm = np.rot90(m[:, ::-1] if f else m, k)
        np.testing.assert_allclose(area_resize_onehot(mm, 12),
                                   dihedral(area_resize_onehot(m, 12), k, f), atol=1e-6)
    v = make_views(img, 3, np.random.default_rng(0))
    assert v.shape == (3, 8, 8, 3)
    for view in v:
        assert any(np.array_equal(view, dihedral(img, k, f)) for k, f in DIHEDRAL)


def test_generator_deterministic_valid_and_balanced():
    a, b = generate(180, seed=5), generate(180, seed=5)
    c = generate(180, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps))
    assert np.array_equal(a.labels, b.labels) and a.meta == b.meta
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a.maps, c.maps))
    assert np.bincount(a.labels, minlength=9).tolist() == [20] * 9
    for i, m in enumerate(a.maps):
        check_map(m, "gen", i)
        assert 1 <= a.meta[i]["wafer_index"] <= 25 and a.meta[i]["die_size"] == (m > 0).sum()
    lots = {}
    for md, y in zip(a.meta, a.labels):
        lots.setdefault(md["lot"], []).append((md["wafer_index"], md["grid"], y))
    for lot, items in lots.items():           # one product per lot, distinct wafer indices
        assert len({g for _, g, _ in items}) == 1 and len({w for w, _, _ in items}) == len(items)
    # lots share a cause: the majority class covers most wafers on average
    share = np.mean([np.bincount([y for *_, y in it]).max() / len(it) for it in lots.values()])
    assert share > 0.6


def test_generator_pattern_statistics():
    ds = generate(900, seed=0, background=0.0)
    names = ds.class_names
    ff = {n: [] for n in names}
    for m, y in zip(ds.maps, ds.labels):
        ff[names[y]].append((m == 2).sum() / (m > 0).sum())
    med = {n: np.median(v) for n, v in ff.items()}
    assert med["none"] == 0.0
    assert med["Near-full"] > 0.75 and 0.2 < med["Random"] < 0.65
    for n in ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Scratch"):
        assert 0.0 < med[n] < 0.5, (n, med[n])
    # Center mass near the centre, Edge-Ring mass near the edge
    def mean_radius(name):
        rs = []
        for m, y in zip(ds.maps, ds.labels):
            if names[y] == name:
                h, w = m.shape
                yy, xx = np.nonzero(m == 2)
                rs.append(np.mean(np.hypot((yy + .5) / h * 2 - 1, (xx + .5) / w * 2 - 1)))
        return np.median(rs)
    assert mean_radius("Center") < 0.3 < 0.85 < mean_radius("Edge-Ring")


def test_generator_mixed_patterns_lie_apart():
    """In Edge-Loc + Loc maps the edge crescent (failing dies at radius > 0.9) and the Loc blob
    (radius < 0.55) point in unrelated directions: their angular distance is about uniform on
    [0, pi] (median pi/2), not clustered as it is when the patterns share one angle."""
    from wamglm_jax.data import labels as L
    ci = L.MIXEDWM38_CLASSES.index(frozenset({"Edge-Loc", "Loc"}))
    w = np.zeros(len(L.MIXEDWM38_CLASSES))
    w[ci] = 1.0
    ds = generate(120, seed=1, label_space="mixedwm38", balance=w, background=0.0)
    gaps = []
    for m in ds.maps:
        h, wd = m.shape
        yy, xx = np.nonzero(m == 2)
        u, v = (xx + .5) / wd * 2 - 1, (yy + .5) / h * 2 - 1
        r = np.hypot(u, v)
        outer, inner = r > 0.9, r < 0.55
        if outer.sum() < 3 or inner.sum() < 3:
            continue
        a_out = np.angle(np.exp(1j * np.arctan2(v[outer], u[outer])).mean())
        a_in = np.angle(np.exp(1j * np.arctan2(v[inner], u[inner])).mean())
        gaps.append(abs(np.angle(np.exp(1j * (a_out - a_in)))))
    assert len(gaps) > 40
    assert np.median(gaps) > 1.0, np.median(gaps)


def _visible_fraction_loop(drawn, on, kind, row):
    """Brute force, straight from the rule: the share of pattern `kind`'s core dies (on the
    wafer, q > 0.5) in its map `row` where the other patterns fail with probability < 0.3."""
    from wamglm_jax.data import generator as G
    idx, q = drawn[kind]
    i = int(idx[row])
    core = clear = 0
    for h in range(on.shape[1]):
        for w in range(on.shape[2]):
            if not (on[i, h, w] and q[row, h, w] > 0.5):
                continue
            free = 1.0
            for other, (oidx, oq) in drawn.items():
                if other != kind and i in oidx:
                    free *= 1.0 - float(oq[list(oidx).index(i), h, w])
            core += 1
            clear += (1.0 - free) < G.CLEAR_MAX
    return clear / core if core else 0.0


def test_visible_fractions_match_brute_force():
    from wamglm_jax.data import generator as G
    rng = np.random.default_rng(0)
    n, h, w = 5, 6, 7
    on = rng.random((n, h, w)) < 0.8
    drawn = {"Center": (np.array([0, 1, 3]), rng.random((3, h, w)).astype(np.float32)),
             "Scratch": (np.array([1, 2, 3, 4]), rng.random((4, h, w)).astype(np.float32)),
             "Loc": (np.array([3]), np.zeros((1, h, w), np.float32))}   # no core: fraction 0
    got = G.visible_fractions(drawn, on)
    for kind, (idx, _) in drawn.items():
        want = [_visible_fraction_loop(drawn, on, kind, r) for r in range(len(idx))]
        np.testing.assert_allclose(got[kind], want, rtol=0, atol=1e-12)


def test_generator_mixed_patterns_stay_visible(monkeypatch):
    """Center+Loc+Scratch and Donut+Loc+Scratch maps: before the redraw rule about one Loc or
    Scratch in ten is mostly covered by the other patterns; after it, nearly none (brute-force
    check of the rule on the patterns actually rendered)."""
    from wamglm_jax.data import generator as G
    seen = {"before": [], "after": []}
    original = G._redraw_hidden

    def recording(drawn, b, on, rho, ang, rng):
        for tag in ("before", "after"):
            if tag == "after":
                original(drawn, b, on, rho, ang, rng)
            for kind in ("Loc", "Scratch"):
                seen[tag] += [_visible_fraction_loop(drawn, on, kind, r)
                              for r in range(len(drawn[kind][0]))]
    monkeypatch.setattr(G, "_redraw_hidden", recording)
    wts = np.zeros(len(L.MIXEDWM38_CLASSES))
    for combo in ({"Center", "Loc", "Scratch"}, {"Donut", "Loc", "Scratch"}):
        wts[L.MIXEDWM38_CLASSES.index(frozenset(combo))] = 1.0
    G.generate(60, seed=2, label_space="mixedwm38", balance=wts, shapes=[(26, 26)])
    before, after = np.array(seen["before"]), np.array(seen["after"])
    assert len(after) == 120
    assert np.mean(before < G.VISIBLE_MIN) > 0.08, np.mean(before < G.VISIBLE_MIN)
    assert np.mean(after < G.VISIBLE_MIN) <= 0.03, np.mean(after < G.VISIBLE_MIN)


def test_generator_single_pattern_maps_skip_the_redraw(monkeypatch):
    from wamglm_jax.data import generator as G

    def fail(*args):
        raise AssertionError("_redraw_hidden called for single-pattern maps")
    monkeypatch.setattr(G, "_redraw_hidden", fail)
    ds = G.generate(300, seed=4)
    assert len(ds) == 300


def test_generator_shapes_and_frequencies():
    ds = generate(2000, seed=1, balance="wm811k")
    counts = np.bincount(ds.labels, minlength=9)
    w = np.array([L.WM811K_CLASSES.index(n) for n in L.WM811K_CLASSES])
    assert counts[L.WM811K_CLASSES.index("none")] == round(2000 * 147431 / 172950)
    shapes = ds.shapes()
    assert len({tuple(s) for s in shapes}) > 10 and shapes.max() > 60 and shapes.min() < 25
    mixed = generate(76, seed=0, label_space="mixedwm38")
    assert np.bincount(mixed.labels, minlength=38).tolist() == [2] * 38
    assert all(m.shape == (52, 52) for m in mixed.maps)
    assert w.shape == (9,)


def test_load_splits_synthetic_distinct_and_deterministic():
    cfg = default_data_config()
    cfg.num_train, cfg.num_val, cfg.num_test = 36, 18, 18
    s1, s2 = load_splits(cfg), load_splits(cfg)
    assert [len(s1[k]) for k in ("train", "val", "test")] == [36, 18, 18]
    for k in s1:
        assert all(np.array_equal(a, b) for a, b in zip(s1[k].maps, s2[k].maps))
    tr = {m.tobytes() + bytes(m.shape) for m in s1["train"].maps}
    assert not tr & {m.tobytes() + bytes(m.shape) for m in s1["val"].maps}
    lots = {k: {d["lot"] for d in s1[k].meta} for k in s1}
    assert not lots["train"] & lots["test"] and not lots["train"] & lots["val"]
    assert not lots["val"] & lots["test"]
    # Same form in every split (a model must not be able to tell the split from the id).
    form = re.compile(r"^L[1-9]\d{5}$")
    assert all(form.match(lot) for k in lots for lot in lots[k]), lots
    cfg.background = 0.0
    clean = load_splits(cfg)["train"]
    none = [m for m, y in zip(clean.maps, clean.labels) if y == L.WM811K_CLASSES.index("none")]
    assert none and all((m == 2).sum() == 0 for m in none)


def test_load_splits_from_file(tmp_path):
    maps = generate(12, seed=0).maps
    flat = np.concatenate([m.reshape(-1) for m in maps])
    np.savez(tmp_path / "r.npz", maps_flat=flat,
             offsets=np.cumsum([0] + [m.size for m in maps[:-1]]),
             shapes=np.array([m.shape for m in maps]), labels=np.array(["Loc"] * 12),
             split=np.array(["train"] * 8 + ["val"] * 4))
    cfg = default_data_config()
    cfg.source = str(tmp_path / "r.npz")
    s = load_splits(cfg)
    assert len(s["train"]) == 8 and len(s["val"]) == 4 and s["test"] is None
    assert np.array_equal(s["val"].maps[0], maps[8])
    cfg.eval_split = "dev"
    with pytest.raises(ValueError, match="no split \\['dev'\\]; available: \\['train', 'val'\\]"):
        load_splits(cfg)
    s = load_splits(dict(source=str(tmp_path / "r.npz"), balanced_sampling="sqrt"))
    assert len(s["train"]) == 8                  # plain dict, pipeline-only fields pass
    cfg.eval_split, cfg.label_space = "val", "mixedwm38"
    with pytest.raises(ValueError, match="label space 'wm811k'"):
        load_splits(cfg)


def test_generator_lot_numbers_name_lots_and_too_few_are_rejected():
    ds = generate(40, seed=2, lot_prefix="X", lot_numbers=np.arange(700, 706))
    assert {d["lot"] for d in ds.meta} <= {f"X{k}" for k in range(700, 706)}
    with pytest.raises(ValueError, match="lot_numbers has 1 entries"):
        generate(40, seed=2, lot_numbers=[5])
