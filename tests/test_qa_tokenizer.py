"""Tokenizer: trained BPE round-trips, loads via AutoTokenizer and LlavaProcessor, 4.x-readable
config, pretrained-dir templates; encode: masks exactly the assistant spans, image expansion,
truncation, bucketing, clear errors."""
import json
import os

import numpy as np
import pytest

from wamglm_jax.data.generator import generate
from wamglm_jax.qa.dialogues import build_dialogues
from wamglm_jax.qa.encode import (EncodeError, bucket_boundaries, bucketed_batches,
                                  encode_dialogue, encode_items)
from wamglm_jax.qa.tokenizer import (CHAT_TEMPLATE, SPECIAL_TOKENS, TokenizerError,
                                     build_tokenizer, load_tokenizer, numeric_token_mask,
                                     vocab_report)

N_IMG = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    ds = generate(40, seed=7, label_space="mixedwm38")
    items = build_dialogues(ds, seed=0, heldout=0.3)
    tok = build_tokenizer(items, d, vocab_size=600)
    return tok, d, items


def test_roundtrip_and_specials(built):
    tok, d, items = built
    texts = [m["content"] for it in items for m in it["messages"]]
    texts += ["Ünïcödé wafer ✓ 12.5% — tabs\tand\nnewlines", "  leading spaces", ""]
    for t in texts:
        assert tok.decode(tok.encode(t, add_special_tokens=False)) == t
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(s) == i
        assert tok.encode(s, add_special_tokens=False) == [i]
    rep = vocab_report(tok)
    assert rep["vocab_size"] == len(tok) == len(tok.get_vocab()) <= 600
    assert rep["image_token_id"] == 3 and rep["padded_to_128"] % 128 == 0


def test_every_digit_is_one_token(built):
    """Numbers are spelt digit by digit whatever surrounds them (a saved, reloaded tokenizer)."""
    from transformers import AutoTokenizer
    _, d, _ = built
    tok = AutoTokenizer.from_pretrained(d)
    for text in ["171 of the 2046 dies fail.", "Lot L738138, wafer 12.", "yield 83.2% (17.0%)"]:
        pieces = [tok.convert_tokens_to_string([p]) for p in tok.tokenize(text)]
        assert "".join(pieces) == text
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digit_pieces), pieces
        assert len(digit_pieces) == sum(c.isdigit() for c in text)


def test_numeric_token_mask_marks_exactly_the_digits(built):
    tok, _, _ = built
    v = len(tok) + 40                                   # a padded model vocabulary
    mask = numeric_token_mask(tok, v)
    assert mask.shape == (v,) and not mask[len(tok):].any()
    ids = tok.encode("8.4% of the 2046 dies fail, which is 171 dies.", add_special_tokens=False)
    for i in ids:
        assert mask[i] == tok.decode([i]).isdigit(), tok.decode([i])
    assert set(np.flatnonzero(mask)) == {tok.convert_tokens_to_ids(tok.tokenize(str(d))[0])
                                         for d in range(10)}
    assert not mask[tok.all_special_ids].any()
    with pytest.raises(ValueError, match="more than the model's vocab_size=10"):
        numeric_token_mask(tok, 10)


def test_config_loads_in_transformers_4_and_5(built):
    from transformers import AutoTokenizer
    tok, d, _ = built
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in cfg and "TokenizersBackend" not in json.dumps(cfg)
    assert cfg["additional_special_tokens"] == ["<image>", "<|user|>", "<|assistant|>",
                                                "<|system|>"]
    assert "{% generation %}" in cfg["chat_template"]
    t2 = AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Yo."}]
    assert t2.apply_chat_template(msgs, tokenize=False) == \
        "<s><|user|>\n<image>\nHi\n<|assistant|>\nYo.</s>"
    assert t2.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>\n")


def test_llava_processor_matches_encode(built, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor, SiglipImageProcessor
    tok, d, items = built
    ip = SiglipImageProcessor(do_resize=False, size={"height": 16, "width": 16},
                              do_rescale=False, do_normalize=False)
    # the saved directory, as a user loads it (not the in-memory tokenizer)
    proc = LlavaProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(d),
                          patch_size=4,
                          vision_feature_select_strategy="full", image_token="<image>",
                          num_additional_image_tokens=0, chat_template=tok.chat_template)
    proc.save_pretrained(str(tmp_path / "proc"))
    proc = AutoProcessor.from_pretrained(str(tmp_path / "proc"))
    msgs = items[0]["messages"]
    text = tok.apply_chat_template(msgs, tokenize=False)
    out = proc(text=text, images=np.zeros((16, 16, 3), np.float32), return_tensors="np")
    enc = encode_dialogue(tok, msgs, num_image_tokens=N_IMG, max_len=4096)
    assert out["input_ids"][0].tolist() == enc["tokens"].tolist()
    assert (out["input_ids"][0] == 3).sum() == N_IMG


def reference_tokens(tok, messages):
    """Independent construction: tokenize the template's pieces one by one, marking the
    assistant contents and their </s> as targets."""
    ids, mask = [1], [0]
    def add(text, m):
        t = tok.encode(text, add_special_tokens=False)
        ids.extend(t)
        mask.extend([m] * len(t))
    for msg in messages:
        if msg["role"] == "user":
            add("<|user|>\n" + msg["content"] + "\n", 0)
        else:
            add("<|assistant|>\n", 0)
            add(msg["content"], 1)
            add("</s>", 1)
    return ids, mask


def test_mask_covers_exactly_assistant_spans(built):
    tok, _, items = built
    enc, stats = encode_items(tok, items, num_image_tokens=N_IMG, max_len=4096)
    assert stats["truncated"] == 0 and stats["samples"] == len(items)
    for it, e in zip(items, enc):
        ids, mask = reference_tokens(tok, it["messages"])
        p = ids.index(3)
        ids = ids[:p] + [3] * N_IMG + ids[p + 1:]
        mask = mask[:p] + [0] * N_IMG + mask[p + 1:]
        assert e["tokens"].tolist() == ids and e["loss_mask"].tolist() == mask
        # decoded masked text == assistant contents + </s>
        masked = tok.decode([t for t, m in zip(ids, mask) if m])
        assert masked == "".join(m["content"] + "</s>" for m in it["messages"]
                                 if m["role"] == "assistant")
        assert e["attention_mask"].sum() == len(ids) and e["tokens"].dtype == np.int32


def test_truncation_keeps_image_and_counts(built):
    tok, _, items = built
    lengths = [len(encode_dialogue(tok, it["messages"], num_image_tokens=N_IMG,
                                   max_len=4096)["tokens"]) for it in items]
    max_len = int(np.median(lengths))
    enc, stats = encode_items(tok, items, num_image_tokens=N_IMG, max_len=max_len)
    assert stats["truncated"] == sum(n > max_len for n in lengths) > 0
    for e, n in zip(enc, lengths):
        assert len(e["tokens"]) == min(n, max_len) and e["truncated"] == (n > max_len)
        assert (e["tokens"] == 3).sum() == N_IMG and e["loss_mask"].sum() > 0
    p = items[0]["messages"]
    with pytest.raises(EncodeError, match=f"sample x1: max_len=10 cannot hold the {N_IMG}"):
        encode_dialogue(tok, p, num_image_tokens=N_IMG, max_len=10, sample_id="x1")


def test_empty_or_wrong_mask_is_hard_error(built, tmp_path):
    tok, d, items = built
    msgs = items[0]["messages"]
    no_marks = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tok.chat_template = no_marks
    try:
        with pytest.raises(EncodeError, match="sample bad-7: the assistant-token mask is empty"):
            encode_dialogue(tok, msgs, num_image_tokens=N_IMG, max_len=4096, sample_id="bad-7")
        # marks around the wrong text (the role header too): disagreement with the contents
        tok.chat_template = CHAT_TEMPLATE.replace("<|assistant|>\n{% generation %}",
                                                  "{% generation %}<|assistant|>\nOK ")
        with pytest.raises(EncodeError, match="sample bad-8: the assistant-token mask disagrees"):
            encode_dialogue(tok, msgs, num_image_tokens=N_IMG, max_len=4096, sample_id="bad-8")
    finally:
        tok.chat_template = CHAT_TEMPLATE
    with pytest.raises(EncodeError, match="exactly one <image>"):
        encode_dialogue(tok, [{"role": "user", "content": "no image"}] + msgs[1:],
                        num_image_tokens=N_IMG, max_len=4096, sample_id="s")


def test_pretrained_dir_template(built, tmp_path):
    tok, d, _ = built
    # A "pretrained" dir whose shipped template has no generation marks and no <image>.
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(d)
    t.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    t.save_pretrained(str(tmp_path / "pre"))
    with pytest.raises(TokenizerError, match="no {% generation %} marks"):
        load_tokenizer(str(tmp_path / "pre"))
    t2 = load_tokenizer(str(tmp_path / "pre"), chat_template=CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "A."}]
    assert t2.apply_chat_template(msgs, tokenize=False) == t.apply_chat_template(msgs,
                                                                                 tokenize=False)
    # other jinja spellings of the marks are accepted (the probe dialogue then checks them)
    tight = CHAT_TEMPLATE.replace("{% generation %}", "{%generation%}").replace(
        "{% endgeneration %}", "{%- endgeneration %}")
    assert load_tokenizer(str(tmp_path / "pre"), chat_template=tight).chat_template == tight
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))


def test_bucketed_batches(built):
    tok, _, items = built
    enc, _ = encode_items(tok, items, num_image_tokens=N_IMG, max_len=512)
    bounds = bucket_boundaries(512, 64)
    assert bounds == [64, 128, 256, 512]
    seen = []
    for b in bucketed_batches(enc, 4, tok.pad_token_id, bounds, seed=0):
        B, T = b["tokens"].shape
        assert B == 4 and T in bounds and b["tokens"].dtype == np.int32
        for r in range(B):
            n = int(b["attention_mask"][r].sum())
            if b["valid"][r]:
                assert b["tokens"][r, n:].tolist() == [0] * (T - n)
                assert (b["loss_mask"][r, n:] == 0).all() and n > T // 2 or T == 64
                seen.append(b["image_index"][r])
            else:
                assert n == 0 and b["loss_mask"][r].sum() == 0
    assert sorted(seen) == sorted(e["image_index"] for e in enc)


def test_inference_prompt_is_training_prefix(built):
    from wamglm_jax.qa.encode import encode_prompt
    tok, _, items = built
    for it in items[:5]:
        full = encode_dialogue(tok, it["messages"], num_image_tokens=N_IMG, max_len=4096)
        for t in range(0, len(it["messages"]), 2):
            pr = encode_prompt(tok, it["messages"][:t + 1], num_image_tokens=N_IMG)
            assert full["tokens"][:len(pr)].tolist() == pr.tolist()
            # the next tokens are exactly the answer (the first trained tokens after the prompt)
            assert full["loss_mask"][len(pr)] == 1 and full["loss_mask"][len(pr) - 1] == 0
    with pytest.raises(EncodeError, match="end with a user turn"):
        encode_prompt(tok, items[0]["messages"][:2], num_image_tokens=N_IMG)
