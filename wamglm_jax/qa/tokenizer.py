"""Tokenizer and chat format for WamGLM.

* `train_tokenizer(texts, vocab_size)`: byte-level BPE trained offline with `tokenizers` on the
  dialogue corpus plus the knowledge base (`corpus_texts`), wrapped as a transformers fast
  tokenizer with the chat template below.
* `save_tokenizer(tok, dir)`: `save_pretrained` and then rewrites `tokenizer_config.json` so
  transformers 4.x also loads it: `tokenizer_class: PreTrainedTokenizerFast`, the extra special
  tokens as the `additional_special_tokens` list (5.x writes `TokenizersBackend` and a list
  `extra_special_tokens`, which 4.x rejects), the chat template inline as well as in
  `chat_template.jinja`.
* `load_tokenizer(dir, chat_template=None)`: any HF tokenizer dir (ours or a pretrained LM's).
  A pretrained LM's shipped template usually lacks `{% generation %}` marks, so a config may
  pass a template that renders the same text with the marks; it is validated by rendering a
  probe dialogue. `<image>` is added as a special token if missing (the vocab grows: report
  `len(tok)`).

Chat format (ours): `<s>` then per turn `<|user|>\n{content}\n` or
`<|assistant|>\n{content}</s>` (the answer and its `</s>` inside {% generation %}: the model
learns to stop), and `<|assistant|>\n` as the generation prompt.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable

from wamglm_jax.qa.knowledge_base import KnowledgeBase, load_knowledge_base

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, USER, ASSISTANT, SYSTEM)   # ids 0..6 in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

PROBE = [{"role": "user", "content": "<image>\nWhat is this?"},
         {"role": "assistant", "content": "A probe answer."},
         {"role": "user", "content": "And then?"},
         {"role": "assistant", "content": "Another answer."}]


_GENERATION_MARK = re.compile(r"{%[-+]?\s*generation\s*[-+]?%}")   # any jinja spacing/trim form


class TokenizerError(ValueError):
    pass


def corpus_texts(items: Iterable[dict], kb: KnowledgeBase | None = None) -> Iterable[str]:
    """Message contents of the dialogues plus every string of the knowledge base."""
    for it in items:
        for m in it["messages"]:
            yield m["content"]
    kb = kb or load_knowledge_base()
    for e in kb.entries.values():
        yield from (e.pattern, e.description, e.appears, e.severity_reason, e.disposition,
                    e.source, *e.causes, *e.process_areas, *e.actions)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) -> PreTrainedTokenizerFast
    with our special tokens (ids 0..6) and chat template. vocab_size includes the 256 byte
    symbols and the special tokens.

    Every digit is its own token (as in Llama and Qwen2): with plain GPT-2 pre-tokenisation
    BPE merges frequent digit runs ("Ġ17", "46"), so one number is spelt with different pieces
    depending on its neighbours; counts, percentages and lot ids then have to be learnt value by
    value instead of digit by digit, and copying a lot id from the context is harder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size={vocab_size}: must be >= {256 + len(SPECIAL_TOKENS)}"
                             " (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IMAGE, USER, ASSISTANT, SYSTEM], chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20)


def save_tokenizer(tok, out_dir: str) -> str:
    """save_pretrained + a tokenizer_config.json that transformers 4.x and 5.x both read."""
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, dict):
        extra = list(extra.values())
    cfg["additional_special_tokens"] = list(extra or cfg.get("additional_special_tokens") or [])
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg["chat_template"] = tok.chat_template
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def load_tokenizer(path: str, chat_template: str | None = None):
    """AutoTokenizer from `path`; `chat_template` (if given) replaces the shipped one. The
    template must mark assistant turns with {% generation %} (checked on a probe dialogue)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: tokenizer directory not found")
    tok = AutoTokenizer.from_pretrained(path)
    if chat_template is not None:
        tok.chat_template = chat_template
    if not tok.chat_template:
        raise TokenizerError(f"{path}: the tokenizer has no chat template; pass one (with "
                             "{% generation %} marks around assistant turns)")
    if not _GENERATION_MARK.search(tok.chat_template):
        raise TokenizerError(f"{path}: the chat template has no {{% generation %}} marks around "
                             "assistant turns; supply a template that renders the same text "
                             "with them (config chat_template)")
    if IMAGE not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = tok.apply_chat_template(PROBE, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    if sum(out["assistant_masks"]) == 0:
        raise TokenizerError(f"{path}: the chat template's generation marks select no tokens "
                             "on a probe dialogue")
    return tok


def build_tokenizer(items: Iterable[dict], out_dir: str, vocab_size: int = 1024,
                    kb: KnowledgeBase | None = None):
    """Trains on the dialogues + KB, saves to out_dir, and reloads it the way users will."""
    tok = train_tokenizer(corpus_texts(items, kb), vocab_size=vocab_size)
    save_tokenizer(tok, out_dir)
    return load_tokenizer(out_dir)


def image_token_id(tok) -> int:
    return int(tok.convert_tokens_to_ids(IMAGE))


def vocab_report(tok) -> dict:
    """Sizes to report: len(tok) (incl. added tokens) and the padded size a model would use."""
    n = len(tok)
    return {"vocab_size": n, "padded_to_128": -(-n // 128) * 128,
            "image_token_id": image_token_id(tok), "pad_id": tok.pad_token_id,
            "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id}



def numeric_token_mask(tok, vocab_size: int):
    """bool[vocab_size]: True for the token ids whose text contains a digit (our tokenizer
    spells every digit as its own token; for a pretrained one, any token with a digit in it).
    Special tokens and the padding ids past len(tok) are False; digits are 0-9 (not other
    Unicode digits such as superscripts). Stage 2 weights these targets by
    config.stage2.numeric_loss_weight (README "Numeric loss weight")."""
    import numpy as np

    if len(tok) > vocab_size:
        raise ValueError(f"numeric_token_mask: the tokenizer has {len(tok)} tokens, more than "
                         f"the model's vocab_size={vocab_size}")
    out = np.zeros(vocab_size, bool)
    special = set(tok.all_special_ids)
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    for i, text in enumerate(texts):
        if i not in special and any("0" <= c <= "9" for c in text):
            out[i] = True
    return out
