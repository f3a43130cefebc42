"""Stage-1 pieces that need no training: TTA transforms, class weights, config validation."""
import numpy as np
import pytest

from configs import stage1 as stage1_config
from wamglm_jax.data.preprocess import dihedral
from wamglm_jax.train import stage1


def test_tta_views_are_the_eight_dihedral_transforms():
    x = np.random.default_rng(0).random((3, 5, 5, 3)).astype(np.float32)
    outs = []
    for k, flip in stage1.DIHEDRAL:
        got = stage1._dihedral_batch(x, k, flip)
        for b in range(3):
            np.testing.assert_array_equal(got[b], dihedral(x[b], k, flip))
        outs.append(got.tobytes())
    assert len(set(outs)) == 8 and stage1.DIHEDRAL[0] == (0, False)   # identity first


def test_class_weights():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, -1])
    assert stage1.class_weights(labels, 4, "none") is None
    w = stage1.class_weights(labels, 4, "full")
    raw = np.array([1 / 4, 1 / 1, 1 / 2])
    np.testing.assert_allclose(w[:3], raw / raw.mean(), rtol=1e-6)
    assert w[3] == 1.0                                            # absent class: neutral
    w = stage1.class_weights(labels, 4, "sqrt")
    raw = 1 / np.sqrt([4, 1, 2])
    np.testing.assert_allclose(w[:3], raw / raw.mean(), rtol=1e-6)


def test_stage1_config_errors_name_the_field():
    config = stage1_config.get_config("")
    config.stage1.unknown_knob = 1
    with pytest.raises(ValueError, match="config.stage1 has unknown fields.*unknown_knob"):
        stage1._stage_cfg(config)
    config = stage1_config.get_config("mixed")
    assert config.data.label_space == "mixedwm38"
    config.stage1.class_weighting = "inverse"
    with pytest.raises(ValueError, match="class_weighting"):
        stage1._stage_cfg(config)
    with pytest.raises(ValueError, match="configs/stage1.py"):
        stage1_config.get_config("bogus")
