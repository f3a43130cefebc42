"""requirements.txt alone must install what the main job imports at run time. The test
requirements (torch) pull in packages the runtime also needs, so a missing runtime pin stays
hidden from the test suite itself: this walks the installed packages' declared dependencies
from requirements.txt, independently of what happens to be installed, and checks the closure."""
import importlib.metadata as md
import pathlib
import re

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Imported at run time by the quickstart path, beyond what each library declares it needs:
# transformers' apply_chat_template needs jinja2 (an optional extra of transformers).
RUNTIME_IMPORTS = {"jinja2", "tokenizers", "safetensors", "matplotlib", "tensorflow-cpu"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pinned(path: pathlib.Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(Requirement(line).name)
    return out


def _closure(names: list[str]) -> set[str]:
    seen, todo = set(), [_norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(_norm(r.name))
    return seen


def test_runtime_requirements_cover_runtime_imports():
    closure = _closure(_pinned(ROOT / "requirements.txt"))
    missing = sorted(n for n in map(_norm, RUNTIME_IMPORTS) if n not in closure)
    assert not missing, f"requirements.txt: {missing} are imported at run time but neither " \
                        "pinned nor required by a pinned package"


def test_closure_walk_follows_declared_dependencies_only():
    # torch declares jinja2; transformers only as an extra: the walk must see the difference
    assert "jinja2" in _closure(["torch"])
    assert "jinja2" not in _closure(["transformers", "tokenizers"])
