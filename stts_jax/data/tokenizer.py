"""Text tokenizers: any local HF `tokenizer.json` (Qwen for real checkpoints) via `tokenizers`,
and the small word-level tokenizer the default dataset builds offline.

Only text and the ChatML tokens go through the tokenizer; the Molmo2 vision tokens
(`<im_patch>`, `<frame_start>`, ...) are placed by id from `config.TokenIds`. `check_ids`
verifies that a tokenizer which knows those strings maps them to the same ids.
"""

import string
from collections.abc import Iterable
from typing import Optional, Union

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from stts_jax import config as config_lib

# (TokenIds field, token string)
CHAT_TOKENS = (("chat_start", "<|im_start|>"), ("chat_end", "<|im_end|>"), ("pad", "<|endoftext|>"))
VISION_TOKENS = (
    ("image_start", "<im_start>"), ("image_end", "<im_end>"), ("image_patch", "<im_patch>"),
    ("image_col", "<im_col>"), ("low_res_image_start", "<low_res_im_start>"),
    ("image_placeholder", "<|image|>"), ("image_low", "<im_low>"), ("frame_start", "<frame_start>"),
    ("frame_end", "<frame_end>"), ("video_placeholder", "<|video|>"))

# Word-level pre-tokenization: ASCII words, single digits, single whitespace chars, any other char.
WORD_PATTERN = r"[A-Za-z]+|[0-9]|\s|[^A-Za-z0-9\s]"
UNK = "[UNK]"


class Tokenizer:
  """A `tokenizers.Tokenizer` with the few operations the data pipeline needs (picklable)."""

  def __init__(self, tok: tokenizers.Tokenizer, name: str = "<tokenizer>"):
    self._tok = tok
    self.name = name

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    try:
      return cls(tokenizers.Tokenizer.from_file(path), name=path)
    except Exception as e:  # tokenizers raises plain Exception subclasses
      raise ValueError(f"{path}: cannot load tokenizer.json ({e})") from e

  def __getstate__(self):
    return {"json": self._tok.to_str(), "name": self.name}

  def __setstate__(self, state):
    self._tok = tokenizers.Tokenizer.from_str(state["json"])
    self.name = state["name"]

  @property
  def backend(self) -> tokenizers.Tokenizer:
    return self._tok

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special tokens written in the text are recognised, none are added."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Union[Iterable[int], np.ndarray], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> Optional[int]:
    return self._tok.token_to_id(token)

  def single_token_id(self, text: str) -> int:
    """Id of `text` if it encodes to exactly one token (e.g. an option letter), else an error."""
    ids = self.encode(text)
    if len(ids) != 1:
      raise ValueError(f"{self.name}: {text!r} is {len(ids)} tokens {ids}, expected exactly one")
    return ids[0]

  def save(self, path: str) -> None:
    self._tok.save(path)

  def check_ids(self, token_ids: config_lib.TokenIds) -> None:
    """Raises if a special-token string the tokenizer knows has an id other than `token_ids`'s."""
    for field, text in CHAT_TOKENS + VISION_TOKENS:
      got = self._tok.token_to_id(text)
      want = getattr(token_ids, field)
      if field in ("chat_start", "chat_end") and got is None:
        raise ValueError(f"{self.name}: tokenizer has no {text} token (needed for the chat template)")
      if got is not None and got != want:
        raise ValueError(f"{self.name}: {text} has id {got} but the model's TokenIds.{field} is {want}")


def load_tokenizer(path: str) -> Tokenizer:
  return Tokenizer.from_file(path)


def build_word_tokenizer(words: Iterable[str], token_ids: config_lib.TokenIds,
                         num_ordinary: int) -> Tokenizer:
  """A word-level tokenizer: ordinary ids [0, num_ordinary), chat/vision specials from `token_ids`.

  The ordinary vocabulary is `[UNK]`, every single ASCII character class the pre-tokenizer can
  emit on its own (digits, punctuation, whitespace, single letters) and `words`, sorted.
  Decoding concatenates tokens, so it is lossless for in-vocabulary text.
  """
  base = set(string.digits) | set(string.punctuation) | {" ", "\n", "\t"} | set(string.ascii_letters)
  extra = set()
  for w in words:
    for piece in pre_tokenizers.Split(tokenizers.Regex(WORD_PATTERN), behavior="isolated") \
        .pre_tokenize_str(w):
      extra.add(piece[0])
  ordinary = [UNK] + sorted((base | extra) - {UNK})
  if len(ordinary) > num_ordinary:
    raise ValueError(f"word tokenizer needs {len(ordinary)} ordinary ids, only {num_ordinary} available")
  vocab = {w: i for i, w in enumerate(ordinary)}
  specials = CHAT_TOKENS + VISION_TOKENS
  for field, text in specials:
    vocab[text] = getattr(token_ids, field)
  taken = [i for i in vocab.values()]
  if len(set(taken)) != len(taken):
    raise ValueError("word tokenizer: special token ids collide with ordinary ids")
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(WORD_PATTERN), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([tokenizers.AddedToken(text, special=True, normalized=False)
                          for _, text in specials])
  return Tokenizer(tok, name="word-level")


__all__ = ["Tokenizer", "load_tokenizer", "build_word_tokenizer", "CHAT_TOKENS", "VISION_TOKENS"]
