"""Forward and train-step throughput of the WamGLM model presets on this machine.

    python -m tools.benchmark [--preset=NAME[,NAME]] [--json=PATH] [--steps=5]
        [--batch_size=B] [--seq_len=T] [--dtype=float32|bfloat16] [--max_step_s=30]

For each preset (configs/presets.py; all by default) on one device (jax.devices()[0]):
- checks that it fits: the config is valid, training memory (16 bytes/parameter for fp32
  params + grads + AdamW moments, plus a rough activation estimate) is below 90% of the
  device's memory (accelerator `bytes_limit`, host RAM available for CPU), and the estimated
  step time at 30% of peak is below --max_step_s; otherwise the row says why it was skipped;
- times a jitted forward (logits) and a jitted train step (masked next-token cross-entropy on
  the text positions, AdamW, state donated), each: compile, then the median of --steps runs;
- reports tokens/s (B*T per step) and images/s (B per step) for both, train TFLOP/s from the
  analytic FLOP count of tools.profile_step, and MFU against the device's peak.
Only models/, configs/presets.py and optax are used (no data/trainer stack), so it runs on a
bare accelerator machine. A table, then one JSON line (also written to --json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# (batch, seq_len) per preset for one device; seq_len holds the N image tokens + text.
SHAPES = {"tiny": (16, 128), "small": (16, 256), "base": (8, 512), "pod7b": (1, 1024)}


def _available_bytes(dev) -> tuple[float, str]:
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return float(stats["bytes_limit"]), "device bytes_limit"
    try:
        return (float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")),
                "host RAM available")
    except (ValueError, OSError):
        return float("inf"), "unknown"


def _param_count(cfg) -> int:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from wamglm_jax.models import WamGLM, num_image_tokens
    n, s = num_image_tokens(cfg), cfg.vit.image_size
    shapes = jax.eval_shape(lambda: nn.unbox(WamGLM(cfg).init(
        jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.full((1, n), cfg.image_token_id),
        jnp.ones((1, n)))["params"]))
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def _activation_bytes(cfg, b, t) -> float:
    """Rough: ~16 saved values per hidden unit per layer (no remat), 4 per layer with remat."""
    per = 4 if cfg.remat != "none" else 16
    width = 2 if cfg.dtype == "bfloat16" else 4
    n = (cfg.vit.image_size // cfg.vit.patch_size) ** 2
    return width * b * per * (t * cfg.lm.hidden_size * cfg.lm.num_layers
                              + n * cfg.vit.hidden_size * cfg.vit.num_layers) \
        + 4 * 3 * b * t * cfg.lm.vocab_size          # fp32 logits, log-softmax, grad


def _batch(cfg, b, t, seed=0):
    import numpy as np

    from wamglm_jax.models import num_image_tokens
    n = num_image_tokens(cfg)
    rng = np.random.default_rng(seed)
    s = cfg.vit.image_size
    tokens = rng.integers(7, cfg.lm.vocab_size, (b, t)).astype(np.int32)
    tokens = np.where(tokens == cfg.image_token_id, 7, tokens)
    tokens[:, 1:1 + n] = cfg.image_token_id
    mask = np.zeros((b, t), np.float32)
    mask[:, 1 + n:] = 1.0
    return dict(image=rng.dirichlet(np.ones(3), (b, s, s)).astype(np.float32), tokens=tokens,
                attention_mask=np.ones((b, t), np.int32), loss_mask=mask)


def _time(fn, args, steps, carry: bool = False):
    """(compile s, median step s, last output) of jitted `fn`; with carry, output[0] is fed
    back as the first argument (a donated train state)."""
    import jax
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))          # warm-up
    times = []
    for _ in range(steps):
        if carry:
            args = (out[0],) + tuple(args[1:])
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, sorted(times)[len(times) // 2], out


def bench_preset(name, *, steps, batch_size, seq_len, dtype, max_step_s) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from configs import presets
    from tools.profile_step import analytic_flops, peak_tflops
    from wamglm_jax.models import WamGLM, num_image_tokens

    dev = jax.devices()[0]
    cfg = presets.model_config(name)
    if dtype:
        cfg.dtype = dtype
    b, t = SHAPES.get(name, (8, 256))
    b, t = batch_size or b, seq_len or t
    row = dict(preset=name, device=f"{dev.platform}:{dev.device_kind}", dtype=cfg.dtype,
               remat=cfg.remat, batch=b, seq_len=t)
    try:
        n = num_image_tokens(cfg)
        if t < n + 2:
            raise ValueError(f"seq_len={t} cannot hold the {n} image tokens")
        row["params"] = _param_count(cfg)
    except ValueError as e:
        return dict(row, status="skipped", reason=f"invalid config: {e}")
    row["image_tokens"] = n
    need = 16 * row["params"] + _activation_bytes(cfg, b, t)
    have, src = _available_bytes(dev)
    peak, peak_src = peak_tflops(dev, cfg.dtype)
    flops = analytic_flops(cfg, stage="stage2", batch=b, seq_len=t)["total"]
    est = flops / (0.3 * peak * 1e12) if peak == peak else float("nan")
    row.update(memory_needed_gb=need / 2**30, memory_available_gb=have / 2**30,
               memory_source=src, estimated_train_step_s=est)
    if need > 0.9 * have:
        return dict(row, status="skipped", reason=f"needs ~{need / 2**30:.1f} GiB for training, "
                                                  f"{have / 2**30:.1f} GiB available ({src})")
    if est > max_step_s:
        return dict(row, status="skipped", reason=f"estimated train step {est:.0f} s > "
                                                  f"--max_step_s={max_step_s:g} at 30% of peak")

    model = WamGLM(cfg)
    batch = jax.device_put(_batch(cfg, b, t), dev)
    params = jax.jit(lambda k: model.init(k, batch["image"][:1], batch["tokens"][:1],
                                          batch["attention_mask"][:1])["params"])(
        jax.random.key(0))
    import flax.linen as nn
    params = nn.unbox(params)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params)

    def forward(p, bt):
        return model.apply({"params": p}, bt["image"], bt["tokens"], bt["attention_mask"])

    def loss_fn(p, bt):
        logits = forward(p, bt)[:, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, bt["tokens"][:, 1:, None], -1)[..., 0]
        w = bt["loss_mask"][:, 1:]
        return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)

    def train(state, bt):
        p, o = state
        loss, g = jax.value_and_grad(loss_fn)(p, bt)
        upd, o = tx.update(g, o, p)
        return (optax.apply_updates(p, upd), o), loss

    fwd_c, fwd_s, _ = _time(jax.jit(forward), (params, batch), steps)
    tr_c, tr_s, out = _time(jax.jit(train, donate_argnums=0), ((params, opt_state), batch),
                            steps, carry=True)
    loss = float(out[1])
    achieved = flops / tr_s / 1e12
    return dict(row, status="ok", steps=steps, forward_compile_s=fwd_c, forward_step_s=fwd_s,
                forward_tokens_per_s=b * t / fwd_s, forward_images_per_s=b / fwd_s,
                train_compile_s=tr_c, train_step_s=tr_s, train_tokens_per_s=b * t / tr_s,
                train_images_per_s=b / tr_s, train_flops_per_step=flops,
                train_tflops=achieved, peak_tflops=peak, peak_source=peak_src,
                mfu=achieved / peak if peak == peak and peak > 0 else None, final_loss=loss)


def table(rows) -> str:
    head = ("preset", "params", "B x T", "fwd tok/s", "fwd img/s", "train tok/s", "train img/s",
            "train s", "TFLOP/s", "MFU")
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["preset"], f"{r.get('params', 0) / 1e6:.1f}M", f"{r['batch']}x"
                          f"{r['seq_len']}", f"skipped: {r['reason']}", "", "", "", "", "", ""))
            continue
        lines.append((r["preset"], f"{r['params'] / 1e6:.1f}M", f"{r['batch']}x{r['seq_len']}",
                      f"{r['forward_tokens_per_s']:.0f}", f"{r['forward_images_per_s']:.1f}",
                      f"{r['train_tokens_per_s']:.0f}", f"{r['train_images_per_s']:.1f}",
                      f"{r['train_step_s']:.4f}", f"{r['train_tflops']:.3f}",
                      f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"))
    w = [max(len(str(line[i])) for line in lines if not str(line[3]).startswith("skipped")
             or i < 3) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w[i]) if i < 3 or not str(line[3]).startswith(
        "skipped") else str(c) for i, c in enumerate(line)).rstrip() for line in lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="", help="comma-separated; default: every preset")
    ap.add_argument("--json", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--seq_len", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    ap.add_argument("--max_step_s", type=float, default=30.0)
    args = ap.parse_args(argv)

    from configs import presets
    names = [p for p in args.preset.split(",") if p] or list(presets.PRESETS)
    unknown = [p for p in names if p not in presets.PRESETS]
    if unknown:
        print(f"benchmark: unknown preset(s) {unknown}; expected {sorted(presets.PRESETS)}",
              file=sys.stderr)
        return 2
    rows = []
    for name in names:
        rows.append(bench_preset(name, steps=args.steps, batch_size=args.batch_size,
                                 seq_len=args.seq_len, dtype=args.dtype,
                                 max_step_s=args.max_step_s))
        print(f"{name}: {rows[-1]['status']}", file=sys.stderr)
    print(table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
