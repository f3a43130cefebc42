"""Tokenisation of dialogues for training: chat template -> token ids, assistant-only loss
mask (from the template's {% generation %} marks via `return_assistant_tokens_mask`, never
hand-counted lengths), `<image>` expanded to the model's N image tokens, truncation from the
end that never cuts into the image tokens, and length-bucketed padded batches (no packing).

Per sample (`encode_dialogue`): tokens int32[T], loss_mask int32[T] (1 = this token is a
training target: the loss at position t-1 predicts tokens[t] where loss_mask[t] == 1),
attention_mask int32[T] (all ones before padding), truncated bool.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from wamglm_jax.qa.tokenizer import IMAGE


class EncodeError(ValueError):
    pass


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of mask == 1."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def check_mask(tok, ids: Sequence[int], mask: Sequence[int], messages: list[dict],
               sample_id: str) -> None:
    """The masked spans must be exactly the assistant contents, in order (decoded text, special
    tokens such as </s> skipped, surrounding whitespace ignored). Raises EncodeError."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    if mask.sum() == 0:
        raise EncodeError(f"sample {sample_id}: the assistant-token mask is empty (does the chat "
                          "template mark assistant turns with {% generation %}?)")
    spans = _spans(mask)
    decoded = [tok.decode(ids[s:e].tolist(), skip_special_tokens=True).strip() for s, e in spans]
    if decoded != answers:
        raise EncodeError(f"sample {sample_id}: the assistant-token mask disagrees with the "
                          f"rendered text: masked spans decode to {decoded!r}, the assistant "
                          f"turns are {answers!r}")


def encode_dialogue(tok, messages: list[dict], *, num_image_tokens: int, max_len: int,
                    sample_id: str = "?", image_token_id: int | None = None) -> dict:
    """One dialogue -> dict(tokens, loss_mask, attention_mask int32[T], truncated bool)."""
    img = int(tok.convert_tokens_to_ids(IMAGE)) if image_token_id is None else image_token_id
    n_img_text = sum(m["content"].count(IMAGE) for m in messages)
    if n_img_text != 1 or IMAGE not in messages[0]["content"] or messages[0]["role"] != "user":
        raise EncodeError(f"sample {sample_id}: expected exactly one {IMAGE} in the first user "
                          f"turn, found {n_img_text} in the dialogue")
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = np.asarray(out["input_ids"], np.int64)
    mask = np.asarray(out["assistant_masks"], np.int32)
    check_mask(tok, ids, mask, messages, sample_id)
    pos = np.flatnonzero(ids == img)
    if len(pos) != 1:
        raise EncodeError(f"sample {sample_id}: {len(pos)} tokens with the image id {img} after "
                          "rendering, expected 1 (is <image> a special token?)")
    p = int(pos[0])
    if mask[p]:
        raise EncodeError(f"sample {sample_id}: the image token lies inside an assistant span")
    n = int(num_image_tokens)
    tokens = np.concatenate([ids[:p], np.full(n, img), ids[p + 1:]]).astype(np.int32)
    loss = np.concatenate([mask[:p], np.zeros(n, np.int32), mask[p + 1:]]).astype(np.int32)
    truncated = len(tokens) > max_len
    if truncated:
        if p + n >= max_len:
            raise EncodeError(f"sample {sample_id}: max_len={max_len} cannot hold the {n} image "
                              f"tokens starting at position {p} plus an answer")
        tokens, loss = tokens[:max_len], loss[:max_len]
        if loss.sum() == 0:
            raise EncodeError(f"sample {sample_id}: truncation to max_len={max_len} removed every "
                              "assistant token; raise max_len")
    return {"tokens": tokens, "loss_mask": loss,
            "attention_mask": np.ones(len(tokens), np.int32), "truncated": bool(truncated)}


def encode_items(tok, items: Iterable[dict], *, num_image_tokens: int, max_len: int
                 ) -> tuple[list[dict], dict]:
    """Encodes dialogue items (adds `id`, `image_index`); returns (encoded, stats) where stats
    = {samples, truncated, tokens, loss_tokens, max_tokens}. Truncations are counted, not
    hidden: print/record stats['truncated']."""
    img = int(tok.convert_tokens_to_ids(IMAGE))
    enc, trunc, ntok, nloss, mx = [], 0, 0, 0, 0
    for it in items:
        e = encode_dialogue(tok, it["messages"], num_image_tokens=num_image_tokens,
                            max_len=max_len, sample_id=it.get("id", "?"), image_token_id=img)
        e["id"], e["image_index"] = it.get("id"), int(it.get("image_index", -1))
        enc.append(e)
        trunc += e["truncated"]
        ntok += len(e["tokens"])
        nloss += int(e["loss_mask"].sum())
        mx = max(mx, len(e["tokens"]))
    return enc, {"samples": len(enc), "truncated": trunc, "tokens": ntok, "loss_tokens": nloss,
                 "max_tokens": mx}


def bucket_boundaries(max_len: int, min_bucket: int = 64) -> list[int]:
    """Powers-of-two bucket lengths from min_bucket, the last one = max_len."""
    out, b = [], min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def bucket_for(length: int, boundaries: Sequence[int]) -> int:
    for b in boundaries:
        if length <= b:
            return b
    raise EncodeError(f"length {length} exceeds the largest bucket {boundaries[-1]}")


def pad_batch(examples: Sequence[dict], length: int, pad_id: int, batch_size: int | None = None
              ) -> dict[str, np.ndarray]:
    """Right-pads to int32[B, length]; with batch_size, adds empty rows (valid=0, all masks 0)
    so every batch has the same B."""
    b = batch_size or len(examples)
    out = {"tokens": np.full((b, length), pad_id, np.int32),
           "loss_mask": np.zeros((b, length), np.int32),
           "attention_mask": np.zeros((b, length), np.int32),
           "image_index": np.full((b,), -1, np.int32), "valid": np.zeros((b,), np.int32)}
    for i, e in enumerate(examples):
        t = len(e["tokens"])
        if t > length:
            raise EncodeError(f"sample {e.get('id')}: {t} tokens do not fit a batch of length "
                              f"{length}")
        out["tokens"][i, :t] = e["tokens"]
        out["loss_mask"][i, :t] = e["loss_mask"]
        out["attention_mask"][i, :t] = e["attention_mask"]
        out["image_index"][i] = e.get("image_index", -1)
        out["valid"][i] = 1
    return out


def bucketed_batches(encoded: Sequence[dict], batch_size: int, pad_id: int,
                     boundaries: Sequence[int], *, seed: int = 0, shuffle: bool = True,
                     drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One pass of batches: samples grouped by bucket length (each batch is padded to its
    bucket, [B, T_bucket]), batch order shuffled with `seed`. The last, short batch of a bucket
    is dropped (drop_remainder) or filled with empty rows (valid == 0)."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(bucket_for(len(e["tokens"]), boundaries), []).append(i)
    plan = []
    for b, idx in sorted(groups.items()):
        idx = list(rng.permutation(idx)) if shuffle else idx
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            if len(chunk) < batch_size and drop_remainder:
                continue
            plan.append((b, chunk))
    order = rng.permutation(len(plan)) if shuffle else range(len(plan))
    for k in order:
        b, chunk = plan[k]
        yield pad_batch([encoded[i] for i in chunk], b, pad_id, batch_size)


def encode_prompt(tok, messages: list[dict], *, num_image_tokens: int,
                  image_token_id: int | None = None) -> np.ndarray:
    """Inference prompt: the dialogue so far (ending with a user turn) rendered with the
    generation prompt (`<|assistant|>\\n` for our template), `<image>` expanded to N tokens.
    Returns int32[T]. Generation stops at the eos token (the template ends answers with it)."""
    img = int(tok.convert_tokens_to_ids(IMAGE)) if image_token_id is None else image_token_id
    if not messages or messages[-1]["role"] != "user":
        raise EncodeError("encode_prompt: the dialogue must end with a user turn")
    n_img = sum(m["content"].count(IMAGE) for m in messages)
    if n_img != 1 or IMAGE not in messages[0]["content"]:
        raise EncodeError(f"encode_prompt: expected exactly one {IMAGE} in the first user turn")
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  add_generation_prompt=True)
    ids = np.asarray(out["input_ids"], np.int64)
    p = int(np.flatnonzero(ids == img)[0])
    return np.concatenate([ids[:p], np.full(int(num_image_tokens), img), ids[p + 1:]]
                          ).astype(np.int32)
