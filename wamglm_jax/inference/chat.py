"""Multi-turn chat about one wafer map.

    session = ChatSession(generator, tokenizer, image float[S,S,3])
    answer = session.ask("What defect pattern is on this wafer?", stream=print_piece)
    answer = session.ask("Why?")          # history kept, template re-rendered every turn

The image is given once: `<image>` is put in front of the first user question (the template
expands it into the N image tokens), followed by the context lines when given
(`context=qa.dialogues.dataset_context_line(dataset, i, zone_dies)`: the die count line,
with the dies per zone when the run's zone_form is 'share_first' (zone_dies; read it with
inference.load.answer_forms(workdir)), plus the lot line for a dataset map with lot metadata; rendered by qa.dialogues.first_user_turn exactly as
in the training dialogues: a model trained with them expects them). Every turn
re-renders the whole dialogue with the chat template (`qa.encode.encode_prompt`) and generates
with the KV cache.

Context-length policy (prompt + max_new_tokens must fit `max_context`, default
config.model.lm.max_seq_len): the oldest complete question/answer pairs after the image turn are
dropped first (a message is printed naming how many); if only the image turn and the current
question are left and they still do not fit, the image turn's pair is dropped too and `<image>`
moves to the current question (with the context line); if that single turn still does not
fit, ContextLengthError.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from wamglm_jax.inference.generate import GenerationConfig, Generator
from wamglm_jax.models.wamglm import num_image_tokens
from wamglm_jax.qa.dialogues import first_user_turn
from wamglm_jax.qa.encode import encode_prompt

IMAGE = "<image>"


class ContextLengthError(ValueError):
    """The current question alone (with the image) does not fit the context."""


class ChatSession:
    def __init__(self, generator: Generator, tokenizer, image, *,
                 gen: GenerationConfig | None = None, max_context: int | None = None,
                 log: Callable[[str], None] = print, context: str | None = None):
        self.generator = generator
        self.tok = tokenizer
        self.image = np.asarray(image, np.float32)
        if self.image.ndim != 3:
            raise ValueError(f"ChatSession: image must be float[S,S,3], got {self.image.shape}")
        eos = tokenizer.eos_token_id
        self.gen = gen or GenerationConfig(max_new_tokens=128, stop_tokens=(eos,),
                                           pad_id=tokenizer.pad_token_id or 0)
        self.max_context = int(max_context or generator.cfg.lm.max_seq_len)
        self.n_img = num_image_tokens(generator.cfg)
        self.history: list[dict] = []          # complete user/assistant pairs
        self.log = log
        self.context = context or None         # context lines of the first user turn

    def _prompt(self, messages):
        return encode_prompt(self.tok, messages, num_image_tokens=self.n_img,
                             image_token_id=self.generator.cfg.image_token_id)

    def _fit(self, question: str) -> np.ndarray:
        """Token ids of history + question, trimming history by the policy above."""
        budget = self.max_context - self.gen.max_new_tokens
        dropped = 0
        while True:
            msgs = [dict(m) for m in self.history]
            if msgs:
                msgs.append({"role": "user", "content": question})
            else:
                msgs = [{"role": "user", "content": first_user_turn(question, self.context)}]
            ids = self._prompt(msgs)
            if len(ids) <= budget:
                break
            if len(self.history) >= 4:            # drop the oldest pair after the image turn
                del self.history[2:4]
            elif len(self.history) == 2:          # only the image turn left: drop it, move image
                self.history = []
            else:
                raise ContextLengthError(
                    f"the question with the image needs {len(ids)} tokens, more than the "
                    f"{budget} available (max_context {self.max_context} - max_new_tokens "
                    f"{self.gen.max_new_tokens}); ask a shorter question or lower max_new_tokens")
            dropped += 1
        if dropped:
            self.log(f"[context full: dropped the {dropped} oldest question/answer pair(s) to fit "
                     f"{self.max_context} tokens]")
        if self.history:                          # keep the image on the first user turn
            if IMAGE not in self.history[0]["content"]:
                self.history[0]["content"] = first_user_turn(self.history[0]["content"],
                                                             self.context)
        return ids

    def ask(self, question: str, stream: Callable[[str], None] | None = None) -> str:
        question = question.replace(IMAGE, "").strip()
        if not question:
            raise ValueError("empty question")
        ids = self._fit(question)
        pieces: list[int] = []
        shown = [""]

        def on_token(tok, step):
            t = int(tok[0])
            if t in self.gen.stop_tokens:
                return
            pieces.append(t)
            text = self.tok.decode(pieces, skip_special_tokens=True)
            if stream is not None and len(text) > len(shown[0]) and not text.endswith("\ufffd"):
                stream(text[len(shown[0]):])
                shown[0] = text

        out = self.generator.generate(self.image[None], [ids.tolist()], self.gen,
                                      stream=on_token if stream is not None else None)[0]
        answer = self.tok.decode(out, skip_special_tokens=True).strip()
        if stream is not None and len(answer) > len(shown[0].strip()):
            full = self.tok.decode(out, skip_special_tokens=True)
            stream(full[len(shown[0]):])
        first = not self.history
        self.history.append({"role": "user",
                             "content": first_user_turn(question, self.context) if first
                             else question})
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def reset(self):
        self.history = []
