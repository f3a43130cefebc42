"""Knowledge base: schema validation with clear errors; answer parser on hand-written text."""
import json

import pytest

from wamglm_jax.data.labels import WM811K_CLASSES
from wamglm_jax.qa.answers import parse_answer, render_answer
from wamglm_jax.qa.knowledge_base import DEFAULT_PATH, KnowledgeBaseError, load_knowledge_base


def test_default_kb_complete_with_source_notes():
    kb = load_knowledge_base()
    assert set(kb.entries) == set(WM811K_CLASSES)
    for p, e in kb.entries.items():
        assert e.causes and e.actions and e.process_areas and e.severity in kb.severity_levels
        if p != "none":
            assert "not peer-reviewed" in e.source
    assert kb.worst(["Loc", "Near-full"]).pattern == "Near-full"
    assert kb.worst([]).pattern == "none"


def _write(tmp_path, data):
    p = tmp_path / "kb.json"
    p.write_text(json.dumps(data))
    return str(p)


def _data():
    with open(DEFAULT_PATH) as f:
        return json.load(f)


def test_missing_field_names_file_and_field(tmp_path):
    d = _data()
    del d["entries"]["Scratch"]["causes"]
    p = _write(tmp_path, d)
    with pytest.raises(KnowledgeBaseError, match=r"kb\.json.*entries\.Scratch\.causes"):
        load_knowledge_base(p)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["entries"].pop("Donut"), "entries.Donut"),
    (lambda d: d["entries"]["Loc"].__setitem__("severity", "apocalyptic"), "entries.Loc.severity"),
    (lambda d: d["entries"]["Center"].__setitem__("actions", []), "entries.Center.actions"),
    (lambda d: d.pop("version"), "version"),
    (lambda d: d["entries"].__setitem__("Blob", d["entries"]["Loc"]), "entries"),
])
def test_bad_kb_errors(tmp_path, mutate, field):
    d = _data()
    mutate(d)
    with pytest.raises(KnowledgeBaseError, match=f"'{field}'"):
        load_knowledge_base(_write(tmp_path, d))


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(KnowledgeBaseError, match="not found"):
        load_knowledge_base(str(tmp_path / "nope.json"))
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(KnowledgeBaseError, match="not valid JSON"):
        load_knowledge_base(str(p))


def test_custom_kb_changes_answers(tmp_path):
    d = _data()
    d["entries"]["Scratch"]["causes"] = ["the night-shift cart"]
    kb = load_knowledge_base(_write(tmp_path, d))
    text = render_answer("cause", {"kb_keys": ["Scratch"]}, kb)
    assert "night-shift cart" in text
    assert parse_answer("cause", text, kb) == {"kb_keys": ["Scratch"]}


def test_parse_free_text():
    assert parse_answer("defect_type", "I think it is edge ring plus a scratch") == \
        ["Edge-Ring", "Scratch"]
    assert parse_answer("defect_type", "Looks like Edge-Loc.") == ["Edge-Loc"]
    assert parse_answer("defect_type", "No pattern, normal wafer.") == []
    assert parse_answer("yield", "Yield: about 87.5 %") == {"yield_pct": 87.5}
    assert parse_answer("count", "There are 42 failing dies.") == {"failing": 42, "total": None}
    assert parse_answer("location", "mostly at the edge, lower-left quadrant") == \
        {"zones": ["edge"], "side": "lower-left"}
    assert parse_answer("batch", "I cannot tell from this map.") == {"lot": None}
    assert parse_answer("batch", "9 of the 24 other wafers in lot LX0123 show the same edge "
                        "ring pattern, so it is likely lot-wide.") == \
        {"lot": "LX0123", "n_other": 24, "shared": {"Edge-Ring": 9}, "lot_wide": True}
    assert parse_answer("severity", "This is critical.") == {"severity": "critical"}
