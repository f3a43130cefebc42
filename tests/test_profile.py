"""tools.profile_step: runs the stage-2 train step on the tiny preset, writes a trace and a JSON
whose analytic FLOPs equal an independent count from the parameter tree; stage-1 formula too."""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import presets
from tools import profile_step
from wamglm_jax.models import WamGLM, num_image_tokens
from wamglm_jax.models.stage1 import Stage1Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernels(tree, prefix=""):
    """{'/'-path: shape} of every `kernel` leaf (the weights of matmuls and the patch conv)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = "/".join(str(getattr(k, "key", k)) for k in path)
        if p.endswith("kernel"):
            out[prefix + p] = tuple(x.shape)
    return out


def independent_stage2_flops(cfg, b, t):
    """6 x (matmul weights) x (tokens they see) + 3 x attention score/value products, with the
    weights read off the initialised WamGLM parameter tree (not the config formulas)."""
    n = num_image_tokens(cfg)
    shapes = jax.eval_shape(lambda: nn.unbox(WamGLM(cfg).init(
        jax.random.key(0), jnp.zeros((1, cfg.vit.image_size, cfg.vit.image_size, 3)),
        jnp.full((1, n), cfg.image_token_id), jnp.ones((1, n)))["params"]))
    k = kernels(shapes)
    fl = cfg.vit.feature_layer
    last_used = max(cfg.vit.num_layers + f if f < 0 else f - 1
                    for f in (fl if isinstance(fl, tuple) else (fl,)))
    total = 0
    for path, shape in k.items():
        w = math.prod(shape)
        if path.startswith("vision/"):
            if "layers_" in path and int(path.split("layers_")[1].split("/")[0]) > last_used:
                continue                     # blocks after the feature layer are dead code
            total += 6 * w * b * n
        elif path.startswith("projector/"):
            total += 6 * w * b * n
        else:
            total += 6 * w * b * t
    dv, lm = cfg.vit.hidden_size, cfg.lm
    total += 3 * b * (last_used + 1) * 2 * (n * n * dv) * 2           # QK^T and PV, full
    total += 3 * b * lm.num_layers * 2 * (t * t * lm.num_heads * lm.head_dim)  # causal half x2
    return total


def test_profile_step_stage2_tiny(tmp_path, capsys):
    out = tmp_path / "prof.json"
    trace = tmp_path / "trace"
    rc = profile_step.main([f"--config={ROOT}/configs/presets.py:tiny", "--stage=stage2",
                            "--steps=2", "--trace_steps=1", f"--trace_dir={trace}",
                            "--batch_size=8", "--seq_len=96", f"--json={out}"])
    assert rc == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "MFU" in printed and "XLA cost_analysis" in printed
    cfg = presets.model_config("tiny")
    assert res["analytic_flops"] == independent_stage2_flops(cfg, 8, 96)
    assert res["steps"] == 2 and res["step_s_median"] > 0 and res["compile_s"] > 0
    assert np.isfinite(res["loss"]) and res["shape"] == dict(batch=8, seq_len=96, lora_rank=0)
    assert res["tokens"] == dict(vision=8 * 64, text=8 * 96)
    # XLA's count (elementwise ops, softmax, optimizer included) is of the same size.
    assert 0.5 < res["analytic_over_xla"] < 1.5
    assert res["peak_tflops_per_device"] > 0 and 0 < res["mfu"] < 1
    assert any(f.endswith(".xplane.pb") for _, _, fs in os.walk(trace) for f in fs)


@pytest.mark.parametrize("feature_layer", [-2, 0, (0, -3), (1, 0)])
def test_stage2_analytic_flops_with_feature_layers(feature_layer):
    """Blocks past the deepest feature layer are not counted; the projector reads K*Dv wide."""
    cfg = presets.model_config("tiny")
    cfg.vit.num_layers, cfg.vit.feature_layer = 3, feature_layer
    got = profile_step.analytic_flops(cfg, stage="stage2", batch=4, seq_len=80)["total"]
    assert got == independent_stage2_flops(cfg, 4, 80)


@pytest.mark.parametrize("stem,depth", [("patch", 1), ("conv", 1), ("conv", 3)])
def test_stage1_analytic_flops_match_param_count(stem, depth):
    cfg = presets.model_config("tiny")
    cfg.vit.update(stem=stem, stem_depth=depth)
    b, c, pd = 4, 9, 256
    s = cfg.vit.image_size
    shapes = jax.eval_shape(lambda: nn.unbox(Stage1Model(config=cfg, num_classes=c, proj_dim=pd)
                                             .init(jax.random.key(0), jnp.zeros((1, s, s, 3)))
                                             ["params"]))
    n = num_image_tokens(cfg)
    images = 3 * b
    total = 0
    for path, shape in kernels(shapes).items():
        w = math.prod(shape)
        if "/stem_" in path:                # conv-stem stage i runs at (S / 2^(i+1))^2 pixels
            i = int(path.split("/stem_")[1].split("_")[0])
            total += 6 * w * images * (s // 2 ** (i + 1)) ** 2
        elif path.startswith("vision/"):
            total += 6 * w * images * n
        elif "proto_" in path:
            total += 6 * w * c                # prototypes: one pass over the C class rows
        else:
            total += 6 * w * images           # classifier, projection head: one row per image
    total += 3 * images * cfg.vit.num_layers * 4 * n * n * cfg.vit.hidden_size
    got = profile_step.analytic_flops(cfg, stage="stage1", batch=b, num_classes=c, proj_dim=pd)
    assert got["total"] == total


def test_benchmark_tiny_and_skip_reason(tmp_path, capsys):
    from tools import benchmark
    out = tmp_path / "bench.json"
    assert benchmark.main(["--preset=tiny", "--steps=1", "--batch_size=2", "--seq_len=72",
                           f"--json={out}"]) == 0
    (row,) = json.loads(out.read_text())
    assert row["status"] == "ok" and row["params"] > 0 and np.isfinite(row["final_loss"])
    assert row["train_tokens_per_s"] == 2 * 72 / row["train_step_s"]
    assert row["forward_images_per_s"] == 2 / row["forward_step_s"]
    assert row["train_flops_per_step"] == profile_step.analytic_flops(
        presets.model_config("tiny"), stage="stage2", batch=2, seq_len=72)["total"]
    assert "tiny" in capsys.readouterr().out
    r = benchmark.bench_preset("small", steps=1, batch_size=None, seq_len=None, dtype=None,
                               max_step_s=1e-9)
    assert r["status"] == "skipped" and "estimated train step" in r["reason"]
    assert benchmark.main(["--preset=nope"]) == 2
