"""WaferMapVMQA on disk: JSONL + maps npz round trip, TFDS ArrayRecord read through grain,
build_vmqa + tools.qa_stats end to end."""
import json

import numpy as np
import pytest

from wamglm_jax.data.generator import generate
from wamglm_jax.qa import io
from wamglm_jax.qa.build import build_vmqa


@pytest.mark.slow
def test_build_write_read_and_stats(tmp_path, capsys):
    import grain.python as gp
    train = generate(24, seed=11, label_space="wm811k")
    test = generate(8, seed=12, label_space="wm811k")
    out = build_vmqa({"train": train, "test": test}, str(tmp_path), heldout={"test": True},
                     vocab_size=400)
    items = io.read_jsonl(str(tmp_path / "train.jsonl"))
    assert [it["messages"] for it in items] == [it["messages"] for it in out["items"]["train"]]
    assert all(it["images"] == [f"train_maps.npz#{it['image_index']}"] for it in items)
    assert all(it["heldout"] for it in io.read_jsonl(str(tmp_path / "test.jsonl")))
    items2, ds = io.load_vmqa(str(tmp_path), "train")
    assert items2 == items
    assert len(ds) == len(train) and ds.label_space == "wm811k"
    for a, b, ma, mb in zip(ds.maps, train.maps, ds.meta, train.meta):
        assert np.array_equal(a, b) and ma["lot"] == mb["lot"]
    # TFDS / grain
    src = io.load_data_source(out["paths"]["tfds"], "train")
    assert len(src) == len(items)
    by_id = {it["id"]: it for it in items}
    loader = gp.DataLoader(data_source=src, sampler=gp.IndexSampler(
        len(src), shard_options=gp.ShardByJaxProcess(), shuffle=False, num_epochs=1, seed=0),
        worker_count=0)
    n = 0
    for rec in loader:
        r = io.decode_record(rec)
        it = by_id[r["id"]]
        assert r["messages"] == it["messages"] and r["answer_key"] == it["answer_key"]
        assert np.array_equal(r["map"], train.maps[it["image_index"]])
        n += 1
    assert n == len(items)
    # stats tool: counts recomputed from the items
    from tools.qa_stats import main
    capsys.readouterr()
    main(["--data", str(tmp_path), "--num_image_tokens", "16", "--max_len", "4096"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    s = res["splits"]["train"]
    assert s["dialogues"] == len(items)
    assert s["turns"] == sum(len(it["messages"]) // 2 for it in items)
    kinds = {}
    for it in items:
        for k in it["answer_key"]:
            kinds[k["kind"]] = kinds.get(k["kind"], 0) + 1
    assert s["kinds"] == kinds
    classes = {}
    for it in items:
        classes[it["class_name"]] = classes.get(it["class_name"], 0) + 1
    assert s["classes"] == classes and sum(classes.values()) == len(train)
    tok = out["tokenizer"]     # rendered text tokenised, <image> (1 token) -> 16 tokens
    assert s["tokens"]["tokens"] == sum(
        len(tok(tok.apply_chat_template(it["messages"], tokenize=False),
                add_special_tokens=False)["input_ids"]) + 15 for it in items)
    assert res["splits"]["test"]["heldout_dialogues"] == len(test)
    assert s["tokens"]["truncated"] == 0 and s["tokens"]["samples"] == len(items)
    assert res["vocab"]["vocab_size"] == len(out["tokenizer"])


def test_bad_files_name_file_and_problem(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"messages": []}\n\n{"messages": [\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:3: not valid JSON"):
        io.read_jsonl(str(p))
    p.write_text('{"messages": []}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: expected a dialogue item"):
        io.read_jsonl(str(p))
    p.write_text('{"messages": [], "id": "a"}\n')
    assert io.read_jsonl(str(p)) == [{"messages": [], "id": "a"}]
    np.savez(tmp_path / "m.npz", maps=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"m\.npz: not a WaferMapVMQA maps file.*'maps_flat'"):
        io.load_maps(str(tmp_path / "m.npz"))

