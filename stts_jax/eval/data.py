"""Eval splits on top of the data pipeline, with every unusable example reported by id and reason.

`EvalData` reads a split through `stts_jax.data.pipeline` (manifest / arrays / TFDS): every example
exactly once, in order, sharded over processes, last batch padded with empty slots. The pipeline's
`on_error="skip"` replaces a bad example by an empty slot; here the slot also keeps its
`example_id` and the error text (field `error`, utf-8 bytes in uint8 `[B, ERROR_BYTES]`), so the
evaluators can list it and leave it out of the denominator. Bad manifest lines (no example at all)
are in `manifest_errors`. With `on_error="raise"` the first bad example raises `DataError`. Only data
errors (`pipeline.DATA_ERRORS`) are skipped; any other exception is a bug and propagates.
`check_skipped` (called by the runner after each cell) raises `TooManySkippedError` when more than
`data.max_skipped_fraction` of the split was skipped.
"""

import dataclasses
from collections.abc import Iterator
from typing import Any, Optional

import jax
import numpy as np

from stts_jax import config as config_lib
from stts_jax.data import pipeline
from stts_jax.data import tokenizer as tokenizer_lib
from stts_jax.data.config import DataConfig

ERROR_BYTES = 512


def encode_error(text: str) -> np.ndarray:
  """Text -> uint8 `[ERROR_BYTES]` (utf-8, zero padded, cut at a character boundary)."""
  raw = text.encode("utf-8")[:ERROR_BYTES].decode("utf-8", "ignore").encode("utf-8")
  out = np.zeros(ERROR_BYTES, np.uint8)
  out[:len(raw)] = np.frombuffer(raw, np.uint8)
  return out


def decode_error(arr: np.ndarray) -> str:
  return bytes(np.asarray(arr, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


class ReportingProcessor(pipeline.ExampleProcessor):
  """`pipeline.ExampleProcessor` whose bad examples become empty slots that keep their row
  (`example_id`) and their error message (field `error`). Picklable (Grain worker processes)."""

  def __call__(self, rec: dict) -> dict[str, np.ndarray]:
    if rec["index"] < 0:
      out = self.empty(skipped=False)
      out["error"] = np.zeros(ERROR_BYTES, np.uint8)
      return out
    try:
      out = self.process(rec)
      out["error"] = np.zeros(ERROR_BYTES, np.uint8)
      return out
    except pipeline.DATA_ERRORS as e:
      out = self.skip(rec, e)
      out["error"] = encode_error(pipeline.bad_example_message(rec, e))
      return out


class _Head:
  """The first `n` records of a source (keeps `example()` when the source has it)."""

  def __init__(self, source, n: int):
    self.source = source
    self.n = min(n, len(source))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]

  def example(self, i: int):
    return self.source.example(i)


@dataclasses.dataclass(frozen=True)
class ExampleInfo:
  """Host-side facts of one example (for reports and open-ended answers)."""
  id: str
  answer: str
  options: Optional[tuple[str, ...]]


class EvalData:
  """One eval split. `batches()` starts a fresh pass (this process's rows, same order every time)."""

  def __init__(self, cfg: DataConfig, token_ids: config_lib.TokenIds, split: str, *,
               tokenizer: Optional[tokenizer_lib.Tokenizer] = None, max_examples: Optional[int] = None,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    self.cfg = cfg
    self.split = split
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    source, errors = pipeline.open_source(cfg, split)
    self.source = _Head(source, max_examples) if max_examples is not None else source
    self.manifest_errors: list[str] = list(errors)
    tok = tokenizer or tokenizer_lib.load_tokenizer(cfg.tokenizer_path)
    self.processor = ReportingProcessor(cfg, tok, token_ids)
    self.tokenizer = tok
    self._by_index: Optional[dict[int, ExampleInfo]] = None
    # (examples read, skipped "id (video): why" texts) of this process's last complete pass
    self.last_pass: Optional[tuple[int, list[str]]] = None

  def __len__(self) -> int:
    return len(self.source)

  @property
  def batch_size(self) -> int:
    """Global batch size (all processes)."""
    return self.cfg.batch_size

  def num_batches(self) -> int:
    per_process = -(-len(self.source) // self.process_count)
    return max(1, -(-per_process // self.cfg.per_process_batch(self.process_count)))

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    ds = pipeline.eval_dataset(self.cfg, self.source, self.processor,
                               process_index=self.process_index, process_count=self.process_count)
    return self._counted(iter(ds))

  def _counted(self, it) -> Iterator[dict[str, np.ndarray]]:
    """Yields `it`'s batches; a complete pass sets `last_pass`. Closing it closes `it`."""
    seen, skipped = 0, []
    try:
      for batch in it:
        rows = np.asarray(batch["skipped"], bool)
        seen += int(np.sum(np.asarray(batch["valid"], bool) | rows))
        skipped += [decode_error(e) for e in np.asarray(batch["error"])[rows]]
        yield batch
      self.last_pass = (seen, skipped)
    finally:
      close = getattr(it, "close", None)
      if close is not None:
        close()

  def check_skipped(self, what: str) -> None:
    """After a complete pass: raises `pipeline.TooManySkippedError` when more than
    `data.max_skipped_fraction` of the split (bad manifest lines + examples the pipeline skipped,
    all processes) was skipped, listing them (this process's), once the split has at least
    `pipeline.MIN_EXAMPLES_FOR_SKIP_CHECK` examples."""
    if self.last_pass is None:
      raise RuntimeError(f"{self.split}: check_skipped before a complete pass over batches()")
    seen, skipped = self.last_pass
    counts = np.asarray([seen, len(skipped)], np.int64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
    bad_lines = len(self.manifest_errors)
    pipeline.check_skipped_fraction(int(counts[1]) + bad_lines, int(counts[0]) + bad_lines,
                                    self.cfg.max_skipped_fraction, self.manifest_errors + skipped,
                                    what=f"{what}: split {self.split!r}")

  def info(self, example_id: int) -> ExampleInfo:
    """Id, answer text and options of the example a batch calls `example_id`.

    Manifest/arrays sources: `example_id` is the source row. TFDS records come in hashed order and
    carry their manifest `index` as `example_id`, so the first call scans the split once (every
    record, video bytes included) to map indices to records.
    """
    if hasattr(self.source, "example"):
      ex = self.source.example(int(example_id))
      return ExampleInfo(ex.id, ex.answer, tuple(ex.options) if ex.options else None)
    if self._by_index is None:
      self._by_index = {}
      for i in range(len(self.source)):
        rec: dict[str, Any] = self.source[i]
        options = rec.get("options")
        self._by_index[int(rec["index"])] = ExampleInfo(str(rec["id"]), str(rec["answer"]),
                                                        tuple(options) if options else None)
    if int(example_id) not in self._by_index:
      raise KeyError(f"{self.split}: no record with index {example_id}")
    return self._by_index[int(example_id)]


def with_frames(cfg: DataConfig, frames: int, *, tokens_per_extra_frame: Optional[int] = None,
                max_fps: Optional[float] = None) -> DataConfig:
  """`cfg` for T = `frames` (test-time scaling): max_frames, a sequence length grown (never shrunk)
  by `tokens_per_extra_frame` per extra frame (default W + 2 + 8), and optionally another fps cap
  (0 -> no cap)."""
  extra = cfg.windows_per_frame + 2 + 8 if tokens_per_extra_frame is None else tokens_per_extra_frame
  seq_len = cfg.seq_len + max(0, frames - cfg.max_frames) * extra
  kw: dict[str, Any] = dict(max_frames=frames, seq_len=seq_len)
  if max_fps is not None:
    kw["max_fps"] = None if max_fps == 0 else float(max_fps)
  return dataclasses.replace(cfg, **kw).validate()


__all__ = ["ERROR_BYTES", "EvalData", "ExampleInfo", "ReportingProcessor", "decode_error", "encode_error",
           "with_frames"]
