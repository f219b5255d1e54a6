"""Molmo2 prompt layout, chat template and loss mask.

One video question becomes (transformers `Molmo2Processor` + the hub chat template):

  BOS "0.0 " <frame_start> <im_patch>*W <frame_end> " 0.5 " <frame_start> ... <frame_end>
  "<|im_start|>user\\n" QUESTION "<|im_end|>\\n<|im_start|>assistant\\n" [ANSWER "<|im_end|>"]

BOS is `<|im_end|>` (Molmo2-4B has bos = eos = <|im_end|>). Each frame's timestamp is
`f"{t:.1f}"`, preceded by a space for every frame but the first and followed by one space.
With `video_use_col_tokens`, `<im_col>` follows each row of pooled tokens. Text between
special tokens is tokenized piecewise, which equals tokenizing the whole string because the
tokenizer splits on its added special tokens first (tested against the transformers processor).
The loss covers the answer tokens and the closing `<|im_end|>` only.
"""

import dataclasses
import string
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
from jaxtyping import Bool, Float, Int32

from stts_jax import config as config_lib
from stts_jax.data import tokenizer as tokenizer_lib

LETTERS = string.ascii_uppercase
Timestamps = Union[Sequence[float], Float[np.ndarray, "T"]]


def timestamp_text(frame_index: int, seconds: float) -> str:
  """The text before frame `frame_index`'s start token: "0.0 " then " 0.5 ", " 1.0 ", ..."""
  return (" " if frame_index > 0 else "") + f"{float(seconds):.1f} "


def video_text(timestamps: Timestamps, rows: int, cols: int, *, use_frame_special_tokens: bool = True,
               video_use_col_tokens: bool = False) -> str:
  """The expanded video string the transformers processor puts in place of `<|video|>`."""
  start = "<frame_start>" if use_frame_special_tokens else "<im_start>"
  end = "<frame_end>" if use_frame_special_tokens else "<im_end>"
  row = "<im_patch>" * cols + ("<im_col>" if video_use_col_tokens else "")
  return "".join(timestamp_text(i, float(t)) + start + row * rows + end for i, t in enumerate(timestamps))


def format_question(question: str, options: Optional[Sequence[str]], template: str) -> str:
  """Multiple choice: `template` with {question} and {options} ("A. x\\nB. y"); else the question."""
  if not options:
    return question
  if len(options) > len(LETTERS):
    raise ValueError(f"at most {len(LETTERS)} options are supported, got {len(options)}")
  lines = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
  return template.format(question=question, options=lines)


def user_turn_text(question_text: str) -> str:
  return f"<|im_start|>user\n{question_text}<|im_end|>\n<|im_start|>assistant\n"


@dataclasses.dataclass(frozen=True)
class PromptIds:
  """Unpadded token ids of one example; `answer_mask` marks answer tokens (+ closing <|im_end|>)."""
  input_ids: Int32[np.ndarray, "N"]
  answer_mask: Bool[np.ndarray, "N"]
  prompt_len: int           # tokens before the answer (the generation prompt)


class PromptBuilder:
  """Builds Molmo2 prompt ids for a tokenizer and the model's special token ids."""

  def __init__(self, tok: tokenizer_lib.Tokenizer, token_ids: config_lib.TokenIds, *, rows: int, cols: int,
               use_frame_special_tokens: bool = True, video_use_col_tokens: bool = False):
    tok.check_ids(token_ids)
    self.tok = tok
    self.ids = token_ids
    self.rows, self.cols = rows, cols
    self.start_id = token_ids.frame_start if use_frame_special_tokens else token_ids.image_start
    self.end_id = token_ids.frame_end if use_frame_special_tokens else token_ids.image_end
    row = [token_ids.image_patch] * cols + ([token_ids.image_col] if video_use_col_tokens else [])
    self.frame_body = [self.start_id] + row * rows + [self.end_id]
    self.patches_per_frame = rows * cols
    self._cache: dict[str, tuple[int, ...]] = {}

  def _encode(self, text: str) -> tuple[int, ...]:
    """Cached encoding of a text segment (timestamps and chat text repeat a lot)."""
    ids = self._cache.get(text)
    if ids is None:
      ids = tuple(self.tok.encode(text))
      if len(self._cache) < 8192:
        self._cache[text] = ids
    return ids

  def video_ids(self, timestamps: Timestamps) -> list[int]:
    out: list[int] = []
    for i, t in enumerate(timestamps):
      out.extend(self._encode(timestamp_text(i, float(t))))
      out.extend(self.frame_body)
    return out

  def build(self, timestamps: Timestamps, question_text: str, answer: Optional[str]) -> PromptIds:
    """BOS + video + user turn (+ answer + <|im_end|> when `answer` is not None)."""
    prompt = [self.ids.chat_end] + self.video_ids(timestamps) + list(self._encode(user_turn_text(question_text)))
    answer_ids = [] if answer is None else list(self.tok.encode(answer)) + [self.ids.chat_end]
    ids = np.asarray(prompt + answer_ids, np.int32)
    mask = np.zeros(ids.shape[0], bool)
    mask[len(prompt):] = True
    return PromptIds(input_ids=ids, answer_mask=mask, prompt_len=len(prompt))


def pad_for_training(prompt: PromptIds, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads to [S]: input_ids, token_mask, target_ids (next token), loss_mask (target is answer)."""
  n = prompt.input_ids.shape[0]
  if n > seq_len:
    raise ValueError(f"sequence of {n} tokens does not fit seq_len {seq_len}")
  input_ids = np.full(seq_len, pad_id, np.int32)
  input_ids[:n] = prompt.input_ids
  token_mask = np.zeros(seq_len, bool)
  token_mask[:n] = True
  target_ids = np.full(seq_len, pad_id, np.int32)
  target_ids[:n - 1] = prompt.input_ids[1:]
  loss_mask = np.zeros(seq_len, bool)
  loss_mask[:n - 1] = prompt.answer_mask[1:]
  return {"input_ids": input_ids, "token_mask": token_mask, "target_ids": target_ids, "loss_mask": loss_mask}


__all__ = ["timestamp_text", "video_text", "format_question", "user_turn_text", "PromptIds", "PromptBuilder",
           "pad_for_training", "LETTERS"]
