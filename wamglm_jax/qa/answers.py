"""Canonical answer sentences per question kind, and `parse_answer` that extracts the value
back from any text (a model's answer included). Evaluation compares the parsed value with the
item's answer_key value.

Kinds and their values (the `value` of an answer_key entry):
  defect_type   list[str]  sorted canonical pattern names; [] = no pattern (none)
  why_type      {"kb_keys": list[str]}   entries whose `description` is given (["none"]
                 for a map without pattern)
  location      {"zones": list[str] (center/middle/edge, or ["spread"], [] = no failing die),
                 "side": "upper-left"|...|"upper"|"lower"|"left"|"right"|"none"|None}
  type_location {"pattern": str, "present": bool, "zones": list[str] | None (None = cannot
                 tell, [] = no failing die), "side": str | None ("all around" for Edge-Ring)}
                 (facts.type_location)
  zone_extent   {"zone": str, "failing": int, "total": int} (parsed share-first answers also
                 carry "pct")
  count         {"failing": int, "total": int} (parsed answers in the share-first form also
                 carry "pct", the failing share they state)
  yield         {"yield_pct": float}
  area          {"area_pct": float}
  cause         {"kb_keys": list[str]}   entries whose causes are all given
  adjustment    {"kb_keys": list[str]}   entries whose actions are all given
  severity      {"severity": str, "kb_key": str}
  why_severity  {"kb_keys": list[str]}   entry whose severity_reason is given
  batch         facts.batch_answer: {"lot": None} (no lot information: cannot tell) |
                 {"lot", "n_other": 0} (no other wafer of the lot measured) |
                 {"lot", "n_other", "n_patterned"} (this wafer has no pattern) |
                 {"lot", "n_other", "shared": {pattern: other wafers showing it},
                  "lot_wide": bool}; derivable from the first turn's lot context line and the
                 map (lot ids must not contain spaces)
`parse_answer` returns the same structure (kb-valued kinds: the set of keys found, sorted;
fields it cannot find are None).
"""
from __future__ import annotations

import re
from typing import Any

from wamglm_jax.data.labels import WM811K_CLASSES
from wamglm_jax.qa.knowledge_base import KnowledgeBase, load_knowledge_base

KINDS = ("defect_type", "why_type", "location", "type_location", "zone_extent", "count",
         "yield", "area", "cause", "adjustment", "severity", "why_severity", "batch")
PATTERNS = tuple(p for p in WM811K_CLASSES if p != "none")
ZONE_TEXT = {"center": "the center", "middle": "the middle ring", "edge": "the edge"}
CANNOT_TELL = "I cannot tell from this map"
# Count answer forms: "8.4% of the 2046 dies fail, which is 171 dies." (share_first) or
# "171 of the 2046 dies fail." (count_first); see _count_sentence and README "Share first".
COUNT_FORMS = ("share_first", "count_first")
# Zone answer forms: "At the edge, 302 of 1120 dies fail (27.0%)." (count_first) or "At the
# edge, 27.0% of the 1120 dies fail, which is 302 dies." (share_first: the context's die count
# line then lists the dies per zone, qa.dialogues.die_count_line; README "Design notes").
ZONE_FORMS = ("count_first", "share_first")


def check_forms(where: str, count_form: str, zone_form: str) -> None:
    """ValueError naming `where` and the field unless both forms are known ones."""
    for name, value, allowed in (("count_form", count_form, COUNT_FORMS),
                                 ("zone_form", zone_form, ZONE_FORMS)):
        if value not in allowed:
            raise ValueError(f"{where}: {name} {value!r}; expected one of {allowed}")
# Every defect-type answer opens with these words, `none` maps included, so the first tokens
# of an answer say which question was read and not what the map shows: a held-out wording read
# in a later turn was misread mostly on `none` maps when their answer opened differently
# ("No defect pattern: ..."), README "One opening for every defect-type answer".
DEFECT_TYPE_OPENING = "This wafer shows a"

_kb_cache: dict = {}


def _kb(kb: KnowledgeBase | None) -> KnowledgeBase:
    if kb is None:
        kb = _kb_cache.setdefault("default", load_knowledge_base())
    return kb


def _join(items: list[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _types_or_none(types: list[str]) -> list[str]:
    return list(types) if types else ["none"]


def _pname(p: str) -> str:
    return "a map without a pattern" if p == "none" else p


def _zone_phrase(zones: list[str]) -> str:
    if zones == ["spread"]:
        return "spread over all radial zones"
    return "concentrated at " + _join([ZONE_TEXT[z] for z in zones])


def _side_phrase(side: str | None) -> str:
    if side in (None, "none"):
        return "with no preferred side"
    if "-" in side:
        return f"mostly in the {side} quadrant"
    return f"mostly in the {side} half"


def render_answer(kind: str, value: Any, kb: KnowledgeBase | None = None,
                  count_form: str = "share_first", zone_form: str = "count_first") -> str:
    kb = _kb(kb)
    if kind == "defect_type":
        if not value:
            return f"{DEFECT_TYPE_OPENING} normal map with no defect pattern (none)."
        if len(value) == 1:
            return f"{DEFECT_TYPE_OPENING} {value[0]} pattern."
        return f"{DEFECT_TYPE_OPENING} mixed pattern of {_join(value)}."
    if kind in ("why_type", "cause", "adjustment", "why_severity"):
        keys = value["kb_keys"]
        if kind == "why_type":
            if keys == ["none"]:
                return f"Because the failures show {kb['none'].description}."
            return "Because " + "; ".join(
                f"{p} is {kb[p].description}, {kb[p].appears}" for p in keys) + "."
        if kind == "cause":
            return " ".join(f"Commonly cited causes for {_pname(p)}: {'; '.join(kb[p].causes)}."
                            for p in keys)
        if kind == "adjustment":
            return " ".join(f"For {_pname(p)}: {'; '.join(kb[p].actions)}." for p in keys)
        e = kb[keys[0]]
        return f"Because {_pname(e.pattern)} means {e.severity_reason}."
    if kind == "location":
        zones, side = value["zones"], value["side"]
        if not zones:
            return "There are no failing dies on this wafer."
        return f"The failing dies are {_zone_phrase(zones)}, {_side_phrase(side)}."
    if kind == "type_location":
        p = value["pattern"]
        if not value["present"]:
            return f"This wafer shows no {p} pattern."
        if value["zones"] is None:
            return (f"{CANNOT_TELL} exactly where the {p} pattern is, because it overlaps the "
                    "other patterns.")
        if not value["zones"]:          # the map's only pattern, but no failing die at all
            return f"The {p} pattern shows no failing dies on this map."
        if value["side"] == "all around":
            return f"The {p} pattern runs all around the edge."
        if value["zones"] == ["spread"] and value["side"] is None:
            return f"The {p} pattern covers the whole wafer."
        if value["side"] is None:
            return f"The {p} pattern is {_zone_phrase(value['zones'])}."
        return f"The {p} pattern is {_zone_phrase(value['zones'])}, {_side_phrase(value['side'])}."
    if kind == "zone_extent":
        z = value["zone"]
        if value["total"] == 0:
            return f"This map has no dies in {ZONE_TEXT[z]} zone."
        if zone_form not in ZONE_FORMS:
            raise ValueError(f"render_answer: zone_form {zone_form!r}; expected one of "
                             f"{ZONE_FORMS}")
        if zone_form == "share_first":
            return f"At {ZONE_TEXT[z]}, " + _count_sentence(value["failing"], value["total"],
                                                            "share_first")
        pct = round(100.0 * value["failing"] / value["total"], 1)
        return (f"At {ZONE_TEXT[z]}, {value['failing']} of {value['total']} dies fail "
                f"({pct}%).")
    if kind == "count":
        return _count_sentence(value["failing"], value["total"], count_form)
    if kind == "yield":
        return f"The yield is {value['yield_pct']}%."
    if kind == "area":
        return f"The failing dies cover {value['area_pct']}% of the wafer area."
    if kind == "severity":
        e = kb[value["kb_key"]]
        return f"Severity: {value['severity']}. Recommended disposition: {e.disposition}."
    if kind == "batch":
        lot = value["lot"]
        if lot is None:
            return (f"{CANNOT_TELL}: it has no lot information, so I cannot compare it with "
                    "other wafers.")
        n = value["n_other"]
        if n == 0:
            return f"No other wafer of lot {lot} was measured, so there is nothing to compare."
        others = f"{n} other wafer{'s' if n != 1 else ''} in lot {lot}"
        if "shared" not in value:
            k = value["n_patterned"]
            return (f"This wafer shows no defect pattern; {k} of the {others} "
                    f"{'has' if k == 1 else 'have'} failure patterns.")
        parts = [f"{c} {'shows' if c == 1 else 'show'} the same {p} pattern"
                 for p, c in value["shared"].items()]
        verdict = ("so the cause is likely lot-wide (a shared tool or process step)"
                   if value["lot_wide"] else "so it looks isolated to this wafer")
        head = parts[0].replace(" ", f" of the {others} ", 1)
        return f"{' and '.join([head] + parts[1:])}, {verdict}."
    raise ValueError(f"render_answer: unknown kind {kind!r}; expected one of {KINDS}")


def stated_share(failing: int, total: int) -> float:
    """The failing share as the share-first count answer states it: a percentage rounded to
    0.1 ("8.4" for 171 of 2046 dies)."""
    return round(100.0 * failing / total, 1)


def _count_sentence(failing: int, total: int, form: str) -> str:
    """share_first: "8.4% of the 2046 dies fail, which is 171 dies." The share is what the
    image shows (it is area-resized, so dies cannot be counted one by one) and the die total
    is the context line's, so the count follows from the two numbers written just before it
    instead of from a product computed silently across the dialogue. count_first: the older
    "171 of the 2046 dies fail." (kept for the real-data config; README)."""
    if form not in COUNT_FORMS:
        raise ValueError(f"render_answer: count_form {form!r}; expected one of {COUNT_FORMS}")
    if form == "count_first":
        return f"{failing} of the {total} dies fail."
    if total == 0:
        return "This map has no dies."
    pct = stated_share(failing, total)
    return (f"{pct}% of the {total} dies fail, which is {failing} "
            f"{'die' if failing == 1 else 'dies'}.")


_INT = r"(\d+)"
_NUM = r"(\d+(?:\.\d+)?)"
_SHARE_FIRST = _NUM + r"\s*% of (?:the )?" + _INT + r" dies fail\w*, which is " + _INT
_PAT_RE = re.compile(r"\b(Edge[-_ ]?Loc|Edge[-_ ]?Ring|Near[-_ ]?full|Center|Centre|Donut|Loc|"
                     r"Random|Scratch)\b", re.IGNORECASE)


def _canon_pattern(s: str) -> str:
    key = re.sub(r"[-_ ]", "", s.lower())
    return {"edgeloc": "Edge-Loc", "edgering": "Edge-Ring", "nearfull": "Near-full",
            "centre": "Center"}.get(key, key.capitalize() if key != "loc" else "Loc")


def _kb_keys(text: str, kb: KnowledgeBase, field: str) -> list[str]:
    t = text.lower()
    return sorted(p for p, e in kb.entries.items()
                  if all(s.lower() in t for s in ((getattr(e, field),) if isinstance(
                      getattr(e, field), str) else getattr(e, field))))


def _parse_zones(t: str) -> list[str]:
    if "spread" in t:
        return ["spread"]
    return [z for z in ("center", "middle", "edge") if re.search(rf"\b{z}", t)]


def _parse_side(t: str) -> str | None:
    q = re.search(r"\b(upper|lower)[- ](left|right)\b", t)
    h = re.search(r"\b(upper|lower|left|right) half\b", t)
    return f"{q.group(1)}-{q.group(2)}" if q else h.group(1) if h else None


def parse_answer(kind: str, text: str, kb: KnowledgeBase | None = None) -> Any:
    """Extracts the value of a `kind` answer from free text (see the module docstring)."""
    kb = _kb(kb)
    if kind == "defect_type":
        found = sorted({_canon_pattern(s) for s in _PAT_RE.findall(text)})
        return found
    if kind in ("why_type", "cause", "adjustment", "why_severity"):
        field = {"why_type": "description", "cause": "causes", "adjustment": "actions",
                 "why_severity": "severity_reason"}[kind]
        return {"kb_keys": _kb_keys(text, kb, field)}
    if kind == "location":
        t = text.lower()
        if "no failing" in t:
            return {"zones": [], "side": None}
        return {"zones": _parse_zones(t), "side": _parse_side(t) or
                ("none" if "no preferred side" in t else None)}
    if kind == "type_location":
        t = text.lower()
        m = re.search(r"\b([\w-]+) pattern", text)
        pats = parse_answer("defect_type", m.group(1) if m else "", kb)
        p = pats[0] if pats else None
        if re.search(r"\bno\b.*\bpattern\b", t) and "preferred" not in t:
            return {"pattern": p, "present": False, "zones": None, "side": None}
        if "cannot tell" in t:
            return {"pattern": p, "present": True, "zones": None, "side": None}
        if "no failing" in t:
            return {"pattern": p, "present": True, "zones": [], "side": None}
        if "all around" in t:
            return {"pattern": p, "present": True, "zones": ["edge"], "side": "all around"}
        if "whole wafer" in t:
            return {"pattern": p, "present": True, "zones": ["spread"], "side": None}
        side = _parse_side(t) or ("none" if "no preferred side" in t else None)
        return {"pattern": p, "present": True, "zones": _parse_zones(t), "side": side}
    if kind == "zone_extent":
        t = text.lower()
        z = next((z for z in ("center", "middle", "edge") if z in t), None)
        if "no dies" in t:
            return {"zone": z, "failing": 0, "total": 0}
        m = re.search(_SHARE_FIRST, t)
        if m:
            return {"zone": z, "failing": int(m.group(3)), "total": int(m.group(2)),
                    "pct": float(m.group(1))}
        m = re.search(_INT + r" of " + _INT, t)
        return {"zone": z, "failing": int(m.group(1)) if m else None,
                "total": int(m.group(2)) if m else None}
    if kind == "count":
        if "no dies" in text.lower():
            return {"failing": 0, "total": 0}
        m = re.search(_SHARE_FIRST, text)
        if m:
            return {"failing": int(m.group(3)), "total": int(m.group(2)),
                    "pct": float(m.group(1))}
        m = re.search(_INT + r" of (?:the )?" + _INT, text)
        if m:
            return {"failing": int(m.group(1)), "total": int(m.group(2))}
        m = re.search(_INT, text)
        return {"failing": int(m.group(1)) if m else None, "total": None}
    if kind in ("yield", "area"):
        m = re.search(_NUM + r"\s*%", text)
        return {f"{kind}_pct": float(m.group(1)) if m else None}
    if kind == "severity":
        t = text.lower()
        found = [s for s in kb.severity_levels if re.search(rf"\b{re.escape(s.lower())}\b", t)]
        m = re.search(r"severity:\s*(\w+)", t)
        sev = (m.group(1) if m and m.group(1) in kb.severity_levels
               else found[0] if found else None)
        return {"severity": sev}
    if kind == "batch":
        t = text.lower()
        if "cannot tell" in t:
            return {"lot": None}
        m = re.search(r"no other wafer of lot (\S+) was measured", text, re.IGNORECASE)
        if m:
            return {"lot": m.group(1), "n_other": 0}
        m = re.search(_INT + r" of the " + _INT + r" other wafers? in lot (\S+) "
                      r"(?:has|have|shows?)\b", text, re.IGNORECASE)
        if not m:
            return {"lot": None, "n_other": None}
        lot, n = m.group(3), int(m.group(2))
        if "no defect pattern" in t:
            return {"lot": lot, "n_other": n, "n_patterned": int(m.group(1))}
        shared = {}
        for c, p in re.findall(_INT + r" (?:of the \d+ other wafers? in lot \S+ )?shows? the "
                               r"same ([\w -]{1,12}?) pattern", text, re.IGNORECASE):
            name = _PAT_RE.search(p)
            if name:
                shared[_canon_pattern(name.group(1))] = int(c)
        lot_wide = True if "lot-wide" in t else False if "isolated" in t else None
        return {"lot": lot, "n_other": n, "shared": shared, "lot_wide": lot_wide}
    raise ValueError(f"parse_answer: unknown kind {kind!r}; expected one of {KINDS}")
