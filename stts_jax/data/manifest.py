"""JSONL manifests: one video question per line.

Fields: `video` (path, relative to the manifest's directory unless absolute), `question`,
`answer`, optional `options` (list of strings: multiple choice; `answer` is one of them or
its letter), optional `id` (default "<file name>:<line number>"). Other fields are kept in
`Example.extra` (the default dataset stores the event frame/window there).
"""

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, Optional

from stts_jax.data import prompt as prompt_lib

REQUIRED = ("video", "question", "answer")
KNOWN = REQUIRED + ("options", "id")


class ManifestError(ValueError):
  """A manifest line is unreadable; the message names the file, the line and the problem."""


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  video: str
  question: str
  answer: str
  options: Optional[tuple[str, ...]] = None
  extra: dict = dataclasses.field(default_factory=dict, compare=False)

  @property
  def answer_index(self) -> int:
    """Index of the answer among the options, -1 when open-ended."""
    if not self.options:
      return -1
    if self.answer in self.options:
      return self.options.index(self.answer)
    return prompt_lib.LETTERS.index(self.answer)

  @property
  def target_text(self) -> str:
    """What the model must output: the option letter (multiple choice) or the answer."""
    return prompt_lib.LETTERS[self.answer_index] if self.options else self.answer

  def to_json(self, base_dir: Optional[str] = None) -> dict[str, Any]:
    video = self.video
    if base_dir and os.path.isabs(video) and os.path.commonpath([video, base_dir]) == base_dir:
      video = os.path.relpath(video, base_dir)      # inside the manifest's directory: relative
    d: dict[str, Any] = {"id": self.id, "video": video, "question": self.question, "answer": self.answer}
    if self.options:
      d["options"] = list(self.options)
    d.update(self.extra)
    return d


def parse_record(record: Any, *, where: str, base_dir: str = "", default_id: str = "") -> Example:
  """Validates one decoded JSON record; errors name `where` and the problem."""
  if not isinstance(record, dict):
    raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
  missing = [k for k in REQUIRED if k not in record]
  if missing:
    raise ManifestError(f"{where}: missing required field(s) {missing}")
  for k in ("video", "question", "answer"):
    if not isinstance(record[k], str) or (k != "answer" and not record[k]):
      raise ManifestError(f"{where}: field {k!r} must be a non-empty string, got {record[k]!r}")
  options = record.get("options")
  if options is not None:
    if (not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options)):
      raise ManifestError(f"{where}: 'options' must be a non-empty list of strings, got {options!r}")
    if len(options) > len(prompt_lib.LETTERS):
      raise ManifestError(f"{where}: {len(options)} options, at most {len(prompt_lib.LETTERS)} supported")
    ans = record["answer"]
    letters = prompt_lib.LETTERS[:len(options)]
    if ans not in options and not (len(ans) == 1 and ans in letters):
      raise ManifestError(f"{where}: answer {ans!r} is neither one of the options nor a letter in {letters!r}")
    options = tuple(options)
  ex_id = record.get("id", default_id)
  if not isinstance(ex_id, (str, int)) or ex_id == "":
    raise ManifestError(f"{where}: 'id' must be a non-empty string or int, got {ex_id!r}")
  video = record["video"]
  if base_dir and not os.path.isabs(video) and "://" not in video:
    video = os.path.normpath(os.path.join(base_dir, video))
  extra = {k: v for k, v in record.items() if k not in KNOWN}
  return Example(id=str(ex_id), video=video, question=record["question"], answer=record["answer"],
                 options=options, extra=extra)


def read_manifest(path: str, *, on_error: str = "raise") -> tuple[list[Example], list[str]]:
  """Reads a JSONL manifest. Returns (examples, errors); errors is empty unless on_error="skip".

  Blank lines are ignored. With on_error="skip" each bad line is logged and listed, never dropped
  silently; with "raise" the first bad line raises `ManifestError` naming file and line.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  if not os.path.isfile(path):
    raise ManifestError(f"{path}: manifest file not found")
  base_dir = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  examples: list[Example] = []
  errors: list[str] = []
  seen: dict[str, int] = {}
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ManifestError(f"{where}: not valid UTF-8 ({e})") from e
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ManifestError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        ex = parse_record(record, where=where, base_dir=base_dir, default_id=f"{name}:{lineno}")
        if ex.id in seen:
          raise ManifestError(f"{where}: duplicate id {ex.id!r} (first on line {seen[ex.id]})")
        seen[ex.id] = lineno
        examples.append(ex)
      except ManifestError as e:
        if on_error == "raise":
          raise
        logging.warning("skipping manifest line: %s", e)
        errors.append(str(e))
  return examples, errors


def write_manifest(path: str, examples: Sequence[Example]) -> None:
  """Writes examples as JSONL with video paths relative to the manifest's directory."""
  base_dir = os.path.dirname(os.path.abspath(path))
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for ex in examples:
      f.write(json.dumps(ex.to_json(base_dir), ensure_ascii=False) + "\n")
  os.replace(tmp, path)


__all__ = ["Example", "ManifestError", "parse_record", "read_manifest", "write_manifest"]
