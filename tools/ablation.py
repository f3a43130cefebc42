"""PSCL ablation: train stage 1 with pscl_weight=0.35 and 0 (same seed/config), print a table.

    python -m tools.ablation --config=configs/stage1.py --workdir=DIR [--weights=0.35,0]
                             [--config.stage1.loop.num_steps=...]

Each weight trains in DIR/pscl_<w>/ (re-running resumes / reuses finished runs); the table is
printed and written to DIR/ablation.json and DIR/ablation.md.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/stage1.py", "stage-1 config file",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory", required=True)
_WEIGHTS = flags.DEFINE_list("weights", ["0.35", "0"], "pscl_weight values to compare")


def table(rows) -> str:
    splits = [s for s in ("val", "test") if any(s in r["splits"] for r in rows)]
    head = "| pscl_weight | " + " | ".join(f"{s} accuracy | {s} macro-F1" for s in splits) + \
        " | train wall s |"
    lines = [head, "|" + " ---: |" * (1 + 2 * len(splits) + 1)]
    for r in rows:
        cells = []
        for s in splits:
            m = r["splits"].get(s)
            cells += [f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}"] if m else ["n/a", "n/a"]
        lines.append(f"| {r['pscl_weight']:g} | " + " | ".join(cells) +
                     f" | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    from configs import common
    from wamglm_jax.evaluate.classification import atomic_write_text
    from wamglm_jax.parallel import sharding as shd
    from wamglm_jax.parallel.mesh import make_mesh
    from wamglm_jax.train import stage1

    base = common.with_defaults(_CONFIG.value)
    mesh = make_mesh(base.mesh)
    rows = []
    for w in [float(x) for x in _WEIGHTS.value]:
        config = common.with_defaults(base)
        config.stage1.pscl_weight = w
        workdir = os.path.join(_WORKDIR.value, f"pscl_{w:g}")
        with shd.activate(mesh, shd.rules_from_config(config)):
            report = stage1.run(config, workdir, mesh)
        rows.append(dict(pscl_weight=w, workdir=workdir, splits=report["splits"],
                         wall_seconds=report["wall_seconds"],
                         per_class_f1={s: {k: v["f1"] for k, v in m["per_class"].items()}
                                       for s, m in report["splits"].items()}))
    text = table(rows)
    atomic_write_text(os.path.join(_WORKDIR.value, "ablation.json"),
                      json.dumps(dict(rows=rows), indent=2) + "\n")
    atomic_write_text(os.path.join(_WORKDIR.value, "ablation.md"), text + "\n")
    print(text)
    print(json.dumps({str(r["pscl_weight"]): {s: {"accuracy": m["accuracy"],
                                                  "macro_f1": m["macro_f1"]}
                                              for s, m in r["splits"].items()} for r in rows}))


if __name__ == "__main__":
    app.run(main)
