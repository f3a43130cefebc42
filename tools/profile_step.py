"""Profile one training step: compile vs steady-state time, a jax.profiler trace, FLOP accounting.

    python -m tools.profile_step --config=configs/stage2.py[:arg] [--stage=stage2|stage1]
        [--steps=N] [--trace_dir=DIR] [--trace_steps=3] [--batch_size=B] [--seq_len=T]
        [--preset=NAME] [--peak_tflops=X] [--json=PATH]

Builds the trainers' own step functions (train/stage2.make_train_step: WamGLM LM loss with
LoRA when config.stage2.lora.rank > 0; train/stage1.make_train_step: the PSCL step on 3 views)
with the trainers' init/optimizer and the config's mesh and sharding rules, on a synthetic
batch of the configured shape. Times lowering + compilation, then `--steps` steady-state steps
(each blocked on), traces `--trace_steps` more under jax.profiler.trace(--trace_dir), and
compares analytic model FLOPs (below) with XLA's compiled cost_analysis().

Analytic FLOPs per step (maxtext convention: a matmul [m,k]x[k,n] is 2mkn FLOPs; training =
3 x forward: forward, backward to activations, backward to weights):
  ViT, per image, N = (S/P)^2 tokens, width Dv, MLP Iv, over the blocks actually computed
  (stage 2: blocks up to vit.feature_layer, XLA removes the rest as dead code; stage 1: all):
    patch embedding 2*N*(P*P*C)*Dv
    per block: q,k,v,o 2*N*4*Dv^2 + MLP 2*N*2*Dv*Iv
               + attention (QK^T and PV, bidirectional) 4*N^2*Dv
  projector, per image: 2*N*(K*Dv*D + D*D), K feature layers (vit.feature_layer a list)
  LM, per sequence of T tokens, width D, H heads, Hkv kv heads, head dim hd, MLP I, vocab V:
    per layer: q,o 2*T*2*D*H*hd + k,v 2*T*2*D*Hkv*hd + SwiGLU 2*T*3*D*I
               + causal attention 4*T^2*H*hd / 2 (half the score matrix is useful)
    lm_head 2*T*D*V
  stage-1 head, per image: classifier 2*Dv*C + projection 2*(Dv*Dv + Dv*256); prototypes
    (once per step) 2*C*(Dv*Dv + Dv*256).
"As computed" adds back the masked half of the causal score matrix (the implementation forms
the full T x T scores), which is what XLA counts. MFU = analytic FLOPs / step time / devices /
peak per device. The table and the JSON give every term.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

# bf16 dense peak TFLOP/s per device by jax device_kind (substring match, first hit).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("A10G", 125.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)
CPU_TFLOPS_PER_CORE = 0.1     # rough fp32 FMA peak of one AVX2/AVX-512 core at ~3 GHz


def peak_tflops(device, dtype: str, cores: int | None = None) -> tuple[float, str]:
    """(peak TFLOP/s per device, how it was chosen). fp32 on GPUs counts TF32 (half of bf16)."""
    kind = getattr(device, "device_kind", "") or ""
    if device.platform == "cpu":
        c = cores or os.cpu_count() or 1
        return CPU_TFLOPS_PER_CORE * c, f"cpu fallback: {c} cores x {CPU_TFLOPS_PER_CORE}"
    for key, val in PEAK_BF16_TFLOPS:
        if key.lower() in kind.lower():
            if dtype == "float32" and device.platform == "gpu":
                return val / 2, f"{key} bf16 {val} / 2 (fp32 matmuls as TF32)"
            return val, f"{key} bf16 dense"
    return float("nan"), f"unknown device kind {kind!r}: pass --peak_tflops"


# ----------------------------------------------------------------------------- FLOPs
def vit_blocks_computed(model_cfg, stage: str) -> int:
    from wamglm_jax.models.vit import feature_blocks
    return model_cfg.vit.num_layers if stage == "stage1" else max(feature_blocks(model_cfg)) + 1


def analytic_flops(model_cfg, *, stage: str, batch: int, seq_len: int = 0,
                   num_classes: int = 0, proj_dim: int = 256, views: int = 3) -> dict:
    """Training FLOPs per step (see the module docstring), term by term."""
    from wamglm_jax.models.vit import feature_dim, stem_depth, stem_kind, stem_widths
    v, lm = model_cfg.vit, model_cfg.lm
    s, p, c, dv, iv = v.image_size, v.patch_size, v.num_channels, v.hidden_size, \
        v.intermediate_size
    n = (s // p) ** 2
    blocks = vit_blocks_computed(model_cfg, stage)
    images = batch * (views if stage == "stage1" else 1)
    fwd = {}
    if stem_kind(model_cfg) == "conv":     # log2(P) 3x3/2 convs, then a 1x1 conv to Dv
        widths, extra = stem_widths(model_cfg), stem_depth(model_cfg) - 1
        fwd["vit_patch_embed"] = images * 2 * n * widths[-1] * dv + sum(
            images * 2 * (s >> (i + 1)) ** 2 * 9 * w * (cin + extra * w)
            for i, (cin, w) in enumerate(zip([c] + widths[:-1], widths)))
    else:
        fwd["vit_patch_embed"] = images * 2 * n * (p * p * c) * dv
    fwd["vit_dense"] = images * blocks * (2 * n * 4 * dv * dv + 2 * n * 2 * dv * iv)
    fwd["vit_attention"] = images * blocks * 4 * n * n * dv
    if stage == "stage1":
        fwd["head"] = images * (2 * dv * num_classes + 2 * (dv * dv + dv * proj_dim)) \
            + 2 * num_classes * (dv * dv + dv * proj_dim)
    else:
        d, h, hkv, hd, i, vocab, t = (lm.hidden_size, lm.num_heads, lm.num_kv_heads, lm.head_dim,
                                      lm.intermediate_size, lm.vocab_size, seq_len)
        fwd["projector"] = images * 2 * n * (feature_dim(model_cfg) * d + d * d)
        fwd["lm_dense"] = batch * lm.num_layers * (2 * t * 2 * d * h * hd + 2 * t * 2 * d * hkv * hd
                                                    + 2 * t * 3 * d * i)
        fwd["lm_attention_causal"] = batch * lm.num_layers * 4 * t * t * h * hd // 2
        fwd["lm_head"] = batch * 2 * t * d * vocab
    train = {k: 3 * x for k, x in fwd.items()}
    total = sum(train.values())
    masked_half = 3 * fwd.get("lm_attention_causal", 0)
    return dict(forward_terms=fwd, train_terms=train, total=total,
                total_as_computed=total + masked_half,
                tokens=dict(vision=images * n, text=batch * seq_len if stage == "stage2" else 0))


# ----------------------------------------------------------------------------- config
def load_config(spec: str):
    """'configs/x.py[:arg]' -> ConfigDict (the file's get_config(arg))."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config={spec}: no such file {path}")
    mod_spec = importlib.util.spec_from_file_location("_profile_cfg", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


# ----------------------------------------------------------------------------- steps
def build_stage2(config, batch_size, seq_len, mesh, rules):
    import numpy as np

    from wamglm_jax.models.wamglm import WamGLM, num_image_tokens
    from wamglm_jax.parallel import sharding as shd
    from wamglm_jax.train import stage2

    s2 = stage2.stage_cfg(config)
    cfg = config.model
    cfg.lm.vocab_size = shd.pad_vocab(int(cfg.lm.vocab_size))
    b = int(batch_size or s2.batch_size)
    t = int(seq_len or s2.max_len)
    n = num_image_tokens(cfg)
    if t < n + 2:
        raise ValueError(f"--seq_len={t} cannot hold the {n} image tokens plus 2 text tokens")
    shd.check_batch(b, mesh, "--batch_size")
    model = WamGLM(cfg)
    seed = int(config.seed)
    params, _ = stage2.init_params(model, cfg, mesh, rules, seed)
    alpha, lora_on = float(s2.lora.alpha), int(s2.lora.rank) > 0
    if lora_on:
        stage2.attach_lora(params, s2, cfg, mesh, seed)
    state, _ = stage2.make_state(params, stage2._opt_cfg(s2, lora_on), 1000, mesh, rules, seed)
    rng = np.random.default_rng(seed)
    s = cfg.vit.image_size
    tokens = rng.integers(7, min(cfg.lm.vocab_size, 1 << 15), (b, t)).astype(np.int32)
    tokens = np.where(tokens == cfg.image_token_id, 7, tokens)
    tokens[:, 1:1 + n] = cfg.image_token_id
    loss_mask = np.zeros((b, t), np.int32)
    loss_mask[:, 1 + n:] = 1
    batch = dict(image=rng.dirichlet(np.ones(3), (b, s, s)).astype(np.float32), tokens=tokens,
                 loss_mask=loss_mask, attention_mask=np.ones((b, t), np.int32),
                 valid=np.ones((b,), np.int32))
    shape = dict(batch=b, seq_len=t, lora_rank=int(s2.lora.rank))
    return stage2.make_train_step(model, alpha), state, batch, shape


def build_stage1(config, batch_size, mesh, rules):
    import numpy as np

    from wamglm_jax.data.labels import class_names
    from wamglm_jax.train import stage1

    s1 = stage1._stage_cfg(config)
    label_space = config.data.get("label_space", "wm811k") if "data" in config else "wm811k"
    c = len(class_names(label_space))
    model = stage1.build_model(config, c, s1)
    state, _ = stage1.init_state(config, model, mesh, s1, rules)
    b = int(batch_size or s1.batch_size)
    s = config.model.vit.image_size
    rng = np.random.default_rng(0)
    batch = dict(views=rng.dirichlet(np.ones(3), (b, 3, s, s)).astype(np.float32),
                 label=rng.integers(0, c, b).astype(np.int32))
    shape = dict(batch=b, num_classes=c, proj_dim=int(s1.proj_dim))
    return stage1.make_train_step(model, s1, None), state, batch, shape


# ----------------------------------------------------------------------------- main
def _cost_flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def profile(config, *, stage: str, steps: int, trace_dir: str | None, trace_steps: int,
            batch_size: int | None, seq_len: int | None, peak: float | None) -> dict:
    import jax

    from wamglm_jax.parallel import sharding as shd
    from wamglm_jax.parallel.mesh import make_mesh

    rules = shd.rules_from_config(config)
    mesh = make_mesh(config.mesh)
    t0 = time.perf_counter()
    if stage == "stage2":
        step_fn, state, host_batch, shape = build_stage2(config, batch_size, seq_len, mesh, rules)
    else:
        step_fn, state, host_batch, shape = build_stage1(config, batch_size, mesh, rules)
    t_init = time.perf_counter() - t0
    batch = shd.global_batch(host_batch, mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    with shd.activate(mesh, rules):
        jitted = jax.jit(step_fn, in_shardings=(state_sh, shd.data_sharding(mesh)),
                         out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)
        t0 = time.perf_counter()
        lowered = jitted.lower(state, batch)
        t_lower = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t0
        xla_flops_dev = _cost_flops(compiled)

        def run(st):
            st, m = compiled(st, batch)
            jax.block_until_ready((st, m))
            return st, m

        t0 = time.perf_counter()
        state, metrics = run(state)                  # first execution (warm-up)
        t_first = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = run(state)
            times.append(time.perf_counter() - t0)
        trace_path = None
        if trace_dir and trace_steps > 0:
            with jax.profiler.trace(trace_dir):
                for _ in range(trace_steps):
                    with jax.profiler.StepTraceAnnotation("train", step_num=len(times)):
                        state, metrics = run(state)
            trace_path = os.path.abspath(trace_dir)
    ndev = mesh.devices.size
    mc = config.model
    fl = analytic_flops(mc, stage=stage, batch=shape["batch"], seq_len=shape.get("seq_len", 0),
                        num_classes=shape.get("num_classes", 0),
                        proj_dim=shape.get("proj_dim", 256))
    step_s = sorted(times)[len(times) // 2] if times else t_first
    dev = jax.devices()[0]
    if peak is None:
        peak, peak_src = peak_tflops(dev, mc.dtype)
    else:
        peak_src = "--peak_tflops"
    achieved = fl["total"] / step_s / 1e12
    xla_total = xla_flops_dev * ndev
    return dict(
        stage=stage, device=f"{dev.platform}:{dev.device_kind}", devices=int(ndev),
        mesh={k: int(v) for k, v in mesh.shape.items()}, dtype=mc.dtype, remat=mc.remat,
        scan_layers=bool(mc.scan_layers), shape=shape, init_s=t_init, lower_s=t_lower,
        compile_s=t_compile, first_step_s=t_first, steps=len(times),
        step_s_median=step_s, step_s_min=min(times) if times else t_first,
        step_s_mean=sum(times) / len(times) if times else t_first,
        analytic_flops=fl["total"], analytic_flops_as_computed=fl["total_as_computed"],
        analytic_terms=fl["train_terms"], tokens=fl["tokens"],
        xla_flops_per_device=xla_flops_dev, xla_flops_total=xla_total,
        analytic_over_xla=fl["total_as_computed"] / xla_total if xla_total else None,
        achieved_tflops=achieved, achieved_tflops_per_device=achieved / ndev,
        peak_tflops_per_device=peak, peak_source=peak_src,
        mfu=achieved / ndev / peak if peak == peak and peak > 0 else None,
        tokens_per_s=(fl["tokens"]["text"] or fl["tokens"]["vision"]) / step_s,
        loss=float(metrics["loss"]), trace_dir=trace_path)


def table(r: dict) -> str:
    rows = [("stage / device", f"{r['stage']} / {r['device']} x{r['devices']} mesh {r['mesh']}"),
            ("shape", f"{r['shape']} dtype {r['dtype']} remat {r['remat']}"),
            ("lower + compile", f"{r['lower_s']:.2f} s + {r['compile_s']:.2f} s"),
            ("first step", f"{r['first_step_s']:.3f} s"),
            ("steady step (median/min)", f"{r['step_s_median']:.4f} / {r['step_s_min']:.4f} s "
                                         f"over {r['steps']} steps"),
            ("analytic TFLOP/step", f"{r['analytic_flops'] / 1e12:.6f} (as computed "
                                    f"{r['analytic_flops_as_computed'] / 1e12:.6f})"),
            ("XLA cost_analysis TFLOP/step", f"{r['xla_flops_total'] / 1e12:.6f} "
                                             f"(analytic/XLA {r['analytic_over_xla']:.3f})"
             if r["analytic_over_xla"] else "n/a"),
            ("achieved TFLOP/s", f"{r['achieved_tflops']:.4f} "
                                 f"({r['achieved_tflops_per_device']:.4f} per device)"),
            ("peak TFLOP/s per device", f"{r['peak_tflops_per_device']:.1f} ({r['peak_source']})"),
            ("MFU", f"{100 * r['mfu']:.2f}%" if r["mfu"] is not None else "n/a"),
            ("tokens/s", f"{r['tokens_per_s']:.1f}")]
    rows += [(f"  {k}", f"{v / 1e12:.6f} TFLOP") for k, v in r["analytic_terms"].items()]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
    ap.add_argument("--stage", default=None, choices=("stage1", "stage2"),
                    help="default: stage2 when the config runs it, else stage1")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--trace_dir", default=None)
    ap.add_argument("--trace_steps", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--seq_len", type=int, default=None)
    ap.add_argument("--preset", default=None, help="replace config.model by this preset")
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from configs import presets
    from configs.common import with_defaults

    config = with_defaults(load_config(args.config))
    if args.preset:
        config.model = presets.model_config(args.preset)
    stage = args.stage or ("stage2" if "stage2" in tuple(config.stages) else "stage1")
    res = profile(config, stage=stage, steps=args.steps, trace_dir=args.trace_dir,
                  trace_steps=args.trace_steps, batch_size=args.batch_size,
                  seq_len=args.seq_len, peak=args.peak_tflops)
    print(table(res))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
