"""Chat with a trained WamGLM about one wafer map.

    python -m tools.chat --workdir=DIR [--map=PATH [--index=I]] [--question=TEXT ...]

The map: `--map` is anything `data.dataset.load_dataset` reads (.npy map or stack, .npz with
`--index` (e.g. a WM-811K row of the converted file), .png, .csv, a tools.make_dataset dir);
without it a synthetic map is generated (`--seed`). The map is printed as text (colour on a
terminal) so you see what the model sees. With `--question` (repeatable, one per turn) the
answers are printed non-interactively, each on its own line after `A: `; otherwise an
interactive prompt streams the answers (`/reset` starts over, `/quit` or an empty line ends).
"""
from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of the command line, defined only when run as a script, so that importing
    this module (tests, other tools) never clashes with another module's --workdir."""
    flags.DEFINE_string("workdir", None, "Run directory with stage2/ (and tokenizer/).")
    flags.DEFINE_string("map", None, "Map file (.npy/.npz/.png/.csv/dataset dir); default: generated.")
    flags.DEFINE_integer("index", None, "Row of a multi-map file.")
    flags.DEFINE_multi_string("question", [], "Question (repeatable; one per turn).")
    flags.DEFINE_integer("seed", 0, "Seed of the generated map (no --map).")
    flags.DEFINE_integer("max_new_tokens", 128, "Longest answer in tokens.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0).")
    flags.DEFINE_integer("step", None, "Stage-2 checkpoint step (default: latest).")
    flags.DEFINE_bool("color", None, "Colour the map (default: when stdout is a terminal).")


_CHARS = {0: " ", 1: ".", 2: "X"}
_COLORS = {0: "\033[90m", 1: "\033[32m", 2: "\033[31;1m"}


def render_map(m, color: bool) -> str:
    """Text picture of a map: ' ' off-wafer, '.' good die, 'X' failing die."""
    rows = []
    for r in m:
        if color:
            rows.append("".join(f"{_COLORS[int(v)]}{_CHARS[int(v)] if v else '·'}\033[0m"
                                for v in r))
        else:
            rows.append("".join(_CHARS[int(v)] for v in r).rstrip())
    return "\n".join(rows)


def load_map(path: str | None, index: int | None, seed: int, zone_dies: bool = False):
    """(uint8[H,W] map, description, context lines: die count (with the dies per zone if
    zone_dies: the run's zone_form is 'share_first'), lot when known) from a file or the
    generator."""
    from wamglm_jax.data.dataset import load_dataset
    from wamglm_jax.data.generator import generate
    from wamglm_jax.data.wafer import check_map
    from wamglm_jax.qa.dialogues import dataset_context_line

    if path is None:
        ds = generate(1, seed=seed)
        i = 0
        where = f"generated sample (seed {seed})"
    else:
        ds = load_dataset(path)
        if index is None and len(ds) > 1:
            raise app.UsageError(f"--map={path} holds {len(ds)} maps: pass --index=0..{len(ds)-1}")
        i = 0 if index is None else int(index)
        if not 0 <= i < len(ds):
            raise app.UsageError(f"--index={i} is outside 0..{len(ds) - 1} of --map={path}")
        where = f"{path}" + (f" row {i}" if index is not None else "")
    m = check_map(ds.maps[i], where, i)
    label = int(ds.labels[i])
    name = ds.class_names[label] if label >= 0 else "unlabeled"
    return (m, f"{where}; {m.shape[0]}x{m.shape[1]} dies grid; label: {name}",
            dataset_context_line(ds, i, zone_dies))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    from wamglm_jax.data.preprocess import area_resize_onehot
    from wamglm_jax.inference.chat import ChatSession
    from wamglm_jax.inference.generate import GenerationConfig, Generator
    from wamglm_jax.inference.load import answer_forms, load_for_inference

    forms = answer_forms(FLAGS.workdir)
    m, desc, context = load_map(FLAGS.map, FLAGS.index, FLAGS.seed,
                                zone_dies=forms["zone_form"] == "share_first")
    color = sys.stdout.isatty() if FLAGS.color is None else FLAGS.color
    print(f"Wafer map: {desc}  ('.' good, 'X' failing)")
    print(render_map(m, color))
    for line in (context or "").split("\n"):
        if line:
            print(f"Context: {line}")
    model_cfg, params, tok = load_for_inference(FLAGS.workdir, FLAGS.step)
    gen = GenerationConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                           top_p=FLAGS.top_p, stop_tokens=(tok.eos_token_id,),
                           pad_id=int(tok.pad_token_id or 0), seed=FLAGS.seed)
    session = ChatSession(Generator(model_cfg, params), tok,
                          area_resize_onehot(m, int(model_cfg.vit.image_size)), gen=gen,
                          context=context)
    if FLAGS.question:
        for q in FLAGS.question:
            print(f"Q: {q}")
            print(f"A: {session.ask(q)}", flush=True)
        return
    print("Ask about this wafer (/reset to start over, /quit or empty line to end).")
    while True:
        try:
            q = input("> ").strip()
        except EOFError:
            break
        if not q or q == "/quit":
            break
        if q == "/reset":
            session.reset()
            print("[history cleared]")
            continue
        print("A: ", end="", flush=True)
        session.ask(q, stream=lambda piece: print(piece, end="", flush=True))
        print()


if __name__ == "__main__":
    define_flags()
    app.run(main)
