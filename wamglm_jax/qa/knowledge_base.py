"""Defect knowledge base: loading and schema validation.

The default file (`knowledge_base.json`, next to this module) holds one entry per WM-811K
pattern name (`Center, Donut, Edge-Loc, Edge-Ring, Loc, Near-full, Random, Scratch, none`).
A fab can swap in its own file with the same schema; `load_knowledge_base(path)` checks it and
raises `KnowledgeBaseError` naming the file and the field that is wrong.

Schema (JSON object):
  name: str, version: str, severity_levels: list[str] (ordered low -> high),
  entries: {pattern: {description, appears, severity_reason, disposition, source: str;
                      causes, process_areas, actions: non-empty list[str];
                      severity: one of severity_levels}}
Every one of the 9 pattern names must have an entry; extra fields are allowed and ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Mapping

from wamglm_jax.data.labels import WM811K_CLASSES

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "knowledge_base.json")
STR_FIELDS = ("description", "appears", "severity_reason", "disposition", "source")
LIST_FIELDS = ("causes", "process_areas", "actions")


class KnowledgeBaseError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class KBEntry:
    pattern: str
    description: str
    appears: str
    causes: tuple[str, ...]
    process_areas: tuple[str, ...]
    actions: tuple[str, ...]
    severity: str
    severity_reason: str
    disposition: str
    source: str


@dataclasses.dataclass(frozen=True)
class KnowledgeBase:
    name: str
    version: str
    severity_levels: tuple[str, ...]
    entries: Mapping[str, KBEntry]
    path: str

    def __getitem__(self, pattern: str) -> KBEntry:
        return self.entries[pattern]

    def severity_rank(self, severity: str) -> int:
        return self.severity_levels.index(severity)

    def worst(self, patterns: Iterable[str]) -> KBEntry:
        """The entry with the highest severity among `patterns` (`none` if empty); ties go to
        the first pattern in WM811K_CLASSES order, so the choice is deterministic."""
        pats = sorted(set(patterns), key=WM811K_CLASSES.index) or ["none"]
        return max((self.entries[p] for p in pats),
                   key=lambda e: (self.severity_rank(e.severity), -WM811K_CLASSES.index(e.pattern)))


def _require(cond: bool, path: str, field: str, expected: str, got=None):
    if not cond:
        extra = "" if got is None else f", got {got!r}"
        raise KnowledgeBaseError(f"{path}: field {field!r}: expected {expected}{extra}")


def validate_knowledge_base(data: dict, path: str = "<knowledge base>") -> KnowledgeBase:
    _require(isinstance(data, dict), path, "<top level>", "a JSON object", type(data).__name__)
    for f in ("name", "version"):
        _require(isinstance(data.get(f), str) and data.get(f), path, f, "a non-empty string",
                 data.get(f))
    levels = data.get("severity_levels")
    _require(isinstance(levels, list) and len(levels) > 0
             and all(isinstance(s, str) and s for s in levels), path, "severity_levels",
             "a non-empty list of strings ordered from least to most severe", levels)
    entries = data.get("entries")
    _require(isinstance(entries, dict), path, "entries",
             f"an object keyed by the pattern names {list(WM811K_CLASSES)}", type(entries).__name__)
    out = {}
    for pattern in WM811K_CLASSES:
        _require(pattern in entries, path, f"entries.{pattern}",
                 "an entry for every pattern name (missing)")
        e = entries[pattern]
        where = f"entries.{pattern}"
        _require(isinstance(e, dict), path, where, "an object", type(e).__name__)
        for f in STR_FIELDS:
            _require(isinstance(e.get(f), str) and e.get(f).strip() != "", path, f"{where}.{f}",
                     "a non-empty string", e.get(f))
        for f in LIST_FIELDS:
            v = e.get(f)
            _require(isinstance(v, list) and len(v) > 0
                     and all(isinstance(s, str) and s.strip() for s in v), path, f"{where}.{f}",
                     "a non-empty list of non-empty strings", v)
        _require(e.get("severity") in levels, path, f"{where}.severity",
                 f"one of severity_levels {levels}", e.get("severity"))
        out[pattern] = KBEntry(pattern=pattern, causes=tuple(e["causes"]),
                               process_areas=tuple(e["process_areas"]), actions=tuple(e["actions"]),
                               severity=e["severity"], **{f: e[f] for f in STR_FIELDS})
    unknown = sorted(set(entries) - set(WM811K_CLASSES))
    _require(not unknown, path, "entries", f"only the pattern names {list(WM811K_CLASSES)}",
             unknown)
    return KnowledgeBase(name=data["name"], version=data["version"],
                         severity_levels=tuple(levels), entries=out, path=path)


def load_knowledge_base(path: str | None = None) -> KnowledgeBase:
    """Loads and validates a knowledge-base JSON file (default: the bundled one)."""
    path = path or DEFAULT_PATH
    if not os.path.exists(path):
        raise KnowledgeBaseError(f"{path}: knowledge-base file not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise KnowledgeBaseError(f"{path}: not valid JSON: {e}") from None
    return validate_knowledge_base(data, path)
