"""Grain input pipelines: source -> process shard -> shuffle -> decode/preprocess/tokenize -> batch.

A batch is a dict of numpy arrays with static shapes (B = per-process batch, T = max_frames,
P = patches per frame, S = seq_len, K = max_options):
  patches uint8 [B, T, P, 3*patch^2] (Molmo2-resized, row-major patches, (row, col, channel)),
  frame_mask bool [B, T] (real frames first), timestamps float32 [B, T],
  input_ids int32 [B, S] (right-padded with tokens.pad), token_mask bool [B, S],
  target_ids int32 [B, S] (next token), loss_mask bool [B, S] (target is an answer token),
  example_id int64 [B] (row of the split's manifest/source, also for skipped slots; -1 for padding slots),
  answer_index int32 [B] (-1 if open-ended), option_ids int32 [B, K] (option letter token ids,
  -1 padded), prompt_len int32 [B] (tokens before the answer), valid bool [B],
  skipped bool [B] (a bad example replaced by an empty slot).
Each real frame contributes exactly W = rows*cols `<im_patch>` tokens, frames in order.

Bad input: only data errors (`DATA_ERRORS`: `VideoError`, `DataError`, `ManifestError`, PyAV's
`FFmpegError`, `OSError` while reading a file) count as bad input. Problems of one example that the
processor detects itself (more options than `max_options`, a prompt longer than `seq_len`,
pre-decoded frames that are not uint8 [F, H, W, 3]) are raised as `DataError`. Anything else
(a plain `ValueError`, `TypeError`, ... from preprocessing, prompt building or the tokenizer on
well-formed data) is a bug and propagates. With `on_error="raise"` the first bad example raises
`DataError` naming the example, its video and the problem. With `"skip"` (default) it becomes an
empty slot (valid=False, all masks False, so it adds nothing to the loss; `example_id` kept), is
logged with the same message and counted (`batch["skipped"]`, `DataIterator.num_skipped`, saved in
the iterator state). Keeping the slot instead of filtering keeps batch composition, and hence
checkpoint resumption, exact. More than `data.max_skipped_fraction` skipped is an error of its own
(`TooManySkippedError`, checked by the training loop and the evaluation once at least
`MIN_EXAMPLES_FOR_SKIP_CHECK` examples were read): a few bad files are skipped, a broken dataset
stops the run with the list of files.
"""

import json
import logging
import os
from typing import Any, Optional, Union

import av
import grain
import numpy as np

from stts_jax import config as config_lib
from stts_jax.data import example_packing
from stts_jax.data import manifest as manifest_lib
from stts_jax.data import preprocess
from stts_jax.data import prompt as prompt_lib
from stts_jax.data import tokenizer as tokenizer_lib
from stts_jax.data import video as video_lib
from stts_jax.data.config import DataConfig


class DataError(ValueError):
  """An example could not be turned into model inputs (names the example, video and problem)."""


class TooManySkippedError(DataError):
  """More than `data.max_skipped_fraction` of the examples read were skipped (lists them)."""


# What `on_error="skip"` skips: problems of the data. Every other exception is a bug and propagates.
DATA_ERRORS = (video_lib.VideoError, DataError, manifest_lib.ManifestError, av.error.FFmpegError, OSError)

# A fraction over fewer examples says little (one bad file among the first few would trip it).
MIN_EXAMPLES_FOR_SKIP_CHECK = 20
# Skipped examples named in a `TooManySkippedError` (and kept in the iterator state).
MAX_LISTED = 20


def bad_example_message(rec: dict, error: BaseException) -> str:
  """One line naming the example, its video and the problem."""
  video = rec.get("video")
  where = rec.get("video_name") or (video if isinstance(video, str) else "<bytes>")
  return f"example {rec.get('id')!r} (video {where}): {error}"


def check_skipped_fraction(num_skipped: int, num_examples: int, max_fraction: float, listed: list[str], *,
                           what: str, min_examples: int = MIN_EXAMPLES_FOR_SKIP_CHECK) -> None:
  """Raises `TooManySkippedError` if `num_skipped / num_examples > max_fraction` (once
  `num_examples >= min_examples`); the message names the first `MAX_LISTED` of `listed`."""
  if num_examples < max(min_examples, 1) or num_skipped <= max_fraction * num_examples:
    return
  shown = listed[:MAX_LISTED]
  more = num_skipped - len(shown)
  lines = "".join(f"\n  {x}" for x in shown) + (f"\n  ... and {more} more" if more > 0 else "")
  raise TooManySkippedError(
      f"{what}: {num_skipped} of {num_examples} examples skipped ({num_skipped / num_examples:.1%}), more than "
      f"data.max_skipped_fraction={max_fraction:g}; fix or remove these files (or raise the limit):{lines}")


# ----------------------------------------------------------------------------------------
# sources: random access to raw records {"index", "id", "question", "options", "answer",
# "answer_index", and "video" (path or bytes) or "frames" + "fps"}
# ----------------------------------------------------------------------------------------
class ManifestSource:
  """Records of a JSONL manifest; videos are decoded from their files."""

  def __init__(self, examples: list[manifest_lib.Example]):
    self.examples = examples

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> dict:
    ex = self.examples[i]
    return {"index": i, "id": ex.id, "video": ex.video, "video_name": ex.video, "question": ex.question,
            "options": list(ex.options) if ex.options else None, "answer": ex.answer,
            "answer_index": ex.answer_index}

  def example(self, index: int) -> manifest_lib.Example:
    return self.examples[index]


class ArraysSource(ManifestSource):
  """Manifest records with all frames of every video pre-decoded into one uint8 .npy [N, F, H, W, 3]
  (`lengths`: real frames per record when clips of different lengths were padded to F).

  `fps` is the frame rate of the encoded videos; sampling then applies the same
  `video.sample_indices` rule to the stored frames as decoding the files would.
  """

  def __init__(self, examples: list[manifest_lib.Example], frames_path: str, fps: float,
               rows: Optional[list[int]] = None, lengths: Optional[list[Optional[int]]] = None):
    super().__init__(examples)
    self.frames_path = frames_path
    self.fps = float(fps)
    self.rows = rows if rows is not None else list(range(len(examples)))
    self.lengths = lengths          # real frames of each example's row (None: all stored frames)
    self._frames = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_frames"] = None
    return state

  def __getitem__(self, i: int) -> dict:
    if self._frames is None:
      self._frames = np.load(self.frames_path, mmap_mode="r")
    rec = super().__getitem__(i)
    frames = self._frames[self.rows[i]]
    if self.lengths is not None and self.lengths[i] is not None:
      frames = frames[:int(self.lengths[i])]
    rec["frames"] = np.asarray(frames)
    rec["fps"] = self.fps
    return rec


class TfdsSource:
  """Records of a prepared `tfds_builder.VideoQa` split (encoded video bytes)."""

  def __init__(self, data_dir: str, split: str):
    from stts_jax.data import tfds_builder
    self._source = tfds_builder.data_source(data_dir, split)
    self._to_raw = tfds_builder.record_to_raw

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    return self._to_raw(self._source[i])

  def example(self, index: int) -> manifest_lib.Example:
    """The manifest example with `index` (scans the records once to build the lookup)."""
    if getattr(self, "_examples", None) is None:
      self._examples = {}
      for i in range(len(self._source)):
        rec = self._source[i]
        raw = self._to_raw(rec)
        extra = rec.get("extra", b"{}")
        self._examples[raw["index"]] = manifest_lib.Example(
            id=raw["id"], video=raw["video_name"], question=raw["question"], answer=raw["answer"],
            options=tuple(raw["options"]) if raw["options"] else None,
            extra=json.loads(extra.decode("utf-8") if isinstance(extra, bytes) else extra))
    return self._examples[int(index)]


class _Padded:
  """A fixed list of source rows; -1 entries are padding records."""

  def __init__(self, source, rows: np.ndarray):
    self.source = source
    self.rows = rows

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    row = int(self.rows[i])
    return {"index": -1} if row < 0 else self.source[row]


# ----------------------------------------------------------------------------------------
# one record -> fixed-shape model inputs
# ----------------------------------------------------------------------------------------
class ExampleProcessor:
  """decode + sample + preprocess + tokenize one raw record into fixed-shape arrays."""

  def __init__(self, cfg: DataConfig, tok: tokenizer_lib.Tokenizer, token_ids: config_lib.TokenIds):
    self.cfg = cfg
    self.tok = tok
    self.ids = token_ids
    rows, cols = preprocess.pooled_grid((cfg.grid, cfg.grid), cfg.pool)
    self.builder = prompt_lib.PromptBuilder(
        tok, token_ids, rows=rows, cols=cols, use_frame_special_tokens=cfg.use_frame_special_tokens,
        video_use_col_tokens=cfg.video_use_col_tokens)
    self.letter_ids = [tok.single_token_id(prompt_lib.LETTERS[k]) for k in range(cfg.max_options)]

  def frames(self, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    cfg = self.cfg
    if "frames" in rec:
      all_frames = rec["frames"]
      if all_frames.ndim != 4 or all_frames.shape[-1] != 3 or all_frames.dtype != np.uint8:
        raise DataError(f"pre-decoded frames must be uint8 [F, H, W, 3], got {all_frames.dtype} "
                        f"{list(all_frames.shape)}")
      if all_frames.shape[0] == 0:
        raise video_lib.VideoError(rec.get("video_name", rec["id"]), "video has zero frames")
      idx = video_lib.sample_indices(all_frames.shape[0], rec["fps"], all_frames.shape[0] / rec["fps"],
                                     cfg.max_frames, cfg.max_fps)
      return np.asarray(all_frames[idx]), video_lib.timestamps(idx, rec["fps"])
    name = rec.get("video_name") or (rec["video"] if isinstance(rec["video"], str) else rec["id"])
    return video_lib.sample_frames(rec["video"], cfg.max_frames, cfg.max_fps, name=name, seek_gap=cfg.seek_gap)

  def empty(self, skipped: bool) -> dict[str, np.ndarray]:
    cfg = self.cfg
    t, s = cfg.max_frames, cfg.seq_len
    p = cfg.grid * cfg.grid
    return {
        "patches": np.zeros((t, p, 3 * cfg.patch_size ** 2), np.uint8),
        "frame_mask": np.zeros(t, bool), "timestamps": np.zeros(t, np.float32),
        "input_ids": np.full(s, self.ids.pad, np.int32), "token_mask": np.zeros(s, bool),
        "target_ids": np.full(s, self.ids.pad, np.int32), "loss_mask": np.zeros(s, bool),
        "example_id": np.int64(-1), "answer_index": np.int32(-1),
        "option_ids": np.full(cfg.max_options, -1, np.int32), "prompt_len": np.int32(0),
        "valid": np.bool_(False), "skipped": np.bool_(skipped),
    }

  def process(self, rec: dict) -> dict[str, np.ndarray]:
    cfg = self.cfg
    frames, timestamps = self.frames(rec)
    t = frames.shape[0]
    if t > cfg.max_frames:
      raise DataError(f"{t} sampled frames exceed max_frames {cfg.max_frames}")
    options = rec.get("options")
    if options and len(options) > cfg.max_options:
      raise DataError(f"{len(options)} options exceed data.max_options {cfg.max_options}")
    question = prompt_lib.format_question(rec["question"], options, cfg.mc_template)
    answer = prompt_lib.LETTERS[rec["answer_index"]] if options else rec["answer"]
    ids = self.builder.build(timestamps, question, answer)
    if ids.input_ids.shape[0] > cfg.seq_len:
      raise DataError(f"prompt + answer are {ids.input_ids.shape[0]} tokens ({t} frames, question of "
                      f"{len(question)} characters), more than data.seq_len {cfg.seq_len}")
    out = self.empty(skipped=False)
    out["patches"][:t] = preprocess.preprocess_frames(frames, cfg.image_size, cfg.patch_size)
    out["frame_mask"][:t] = True
    out["timestamps"][:t] = timestamps
    out.update(prompt_lib.pad_for_training(ids, cfg.seq_len, self.ids.pad))
    if options:
      out["option_ids"][:len(options)] = self.letter_ids[:len(options)]
    out["example_id"] = np.int64(rec["index"])
    out["answer_index"] = np.int32(rec["answer_index"] if options else -1)
    out["prompt_len"] = np.int32(ids.prompt_len)
    out["valid"] = np.bool_(True)
    return out

  def __call__(self, rec: dict) -> dict[str, np.ndarray]:
    if rec["index"] < 0:
      return self.empty(skipped=False)
    try:
      return self.process(rec)
    except DATA_ERRORS as e:
      return self.skip(rec, e)

  def skip(self, rec: dict, error: BaseException) -> dict[str, np.ndarray]:
    """A data error: raises `DataError` (on_error="raise") or logs it and returns the skipped slot."""
    msg = bad_example_message(rec, error)
    if self.cfg.on_error == "raise":
      raise DataError(msg) from error
    logging.warning("skipping bad example: %s", msg)
    out = self.empty(skipped=True)
    out["example_id"] = np.int64(rec["index"])
    return out


# ----------------------------------------------------------------------------------------
# datasets and iterators
# ----------------------------------------------------------------------------------------
def open_source(cfg: DataConfig, split: str):
  """The random-access source of `split` for `cfg.format`; returns (source, manifest_errors)."""
  if cfg.format == "tfds":
    return TfdsSource(os.path.join(cfg.path, "tfds"), split), []
  examples, errors = manifest_lib.read_manifest(os.path.join(cfg.path, f"{split}.jsonl"),
                                                on_error=cfg.on_error)
  if cfg.format == "manifest":
    return ManifestSource(examples), errors
  frames_path = os.path.join(cfg.path, f"{split}_frames.npy")
  if not os.path.isfile(frames_path):
    raise FileNotFoundError(f"{frames_path}: pre-decoded frames not found (data.format='arrays')")
  fps = {float(ex.extra.get("fps", 0.0)) for ex in examples}
  if len(fps) != 1 or 0.0 in fps:
    raise ValueError(f"{cfg.path}/{split}.jsonl: format 'arrays' needs one positive 'fps' in every line, got {fps}")
  rows = [int(ex.extra["row"]) for ex in examples]
  # Datasets of clips of different lengths (default_dataset varlen) pad the array; `num_frames` says how many are real.
  lengths = [ex.extra.get("num_frames") for ex in examples]
  return ArraysSource(examples, frames_path, fps.pop(), rows=rows,
                      lengths=lengths if any(x is not None for x in lengths) else None), errors


def _batches(ds: grain.MapDataset, cfg: DataConfig, processor: ExampleProcessor, batch: int,
             drop_remainder: bool) -> grain.IterDataset:
  ds = ds.map(processor).batch(batch, drop_remainder=drop_remainder)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer))
  if cfg.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return it


def pack_spec(cfg: DataConfig, rows: int, llm_drop_ratio: float, pad_id: int) -> example_packing.PackSpec:
  """The static packed-row sizes of `cfg` (`example_packing.PackSpec`)."""
  return example_packing.PackSpec(rows=rows, seq_len=cfg.packed_seq_len, max_frames=cfg.packed_max_frames,
                                  max_videos=cfg.pack_max_videos, windows=cfg.windows_per_frame,
                                  llm_drop_ratio=llm_drop_ratio, lookahead=cfg.pack_lookahead, pad_id=pad_id)


def train_dataset(cfg: DataConfig, source, processor: ExampleProcessor, *, process_index: int = 0,
                  process_count: int = 1, llm_drop_ratio: Optional[float] = None
                  ) -> Union[grain.IterDataset, example_packing.ExamplePacker]:
  """Shuffled (reshuffled every epoch), repeated `cfg.num_epochs` times (None: forever) batches.

  Every process takes a disjoint, equally long slice `[process_index::process_count]` of the
  first `len - len % process_count` records, so all hosts run the same number of steps.
  With `cfg.pack_examples`: an `example_packing.ExamplePacker` over the processed examples, emitting
  `batch_size / process_count` packed rows per step; `llm_drop_ratio` (the model's LLM-side pruning
  ratio, 0 when the LLM sequence is not pruned: `models.example_packing.llm_drop_ratio`) sizes each example's row space.
  """
  batch = cfg.per_process_batch(process_count)
  n = (len(source) // process_count) * process_count
  if n // process_count < batch:
    raise ValueError(f"split has {len(source)} examples: too few for {process_count} process(es) x batch {batch}")
  ds = grain.MapDataset.source(source)[:n][process_index::process_count]
  ds = ds.shuffle(seed=cfg.shuffle_seed).repeat(cfg.num_epochs)
  if not cfg.pack_examples:
    return _batches(ds, cfg, processor, batch, drop_remainder=True)
  if llm_drop_ratio is None:
    raise ValueError("data.pack_examples: pass llm_drop_ratio (the model's LLM-side pruning ratio) to size rows")
  it = ds.map(processor).to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                           prefetch_buffer_size=cfg.prefetch_buffer))
  if cfg.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return example_packing.ExamplePacker(iter(it), pack_spec(cfg, batch, llm_drop_ratio, processor.ids.pad),
                                       on_error=cfg.on_error)


def eval_dataset(cfg: DataConfig, source, processor: ExampleProcessor, *, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Every example exactly once, in order, split across processes; the last batches are padded
  with empty slots (valid=False) so every process yields the same number of full batches."""
  batch = cfg.per_process_batch(process_count)
  shard = np.arange(process_index, len(source), process_count)
  per_process = -(-len(source) // process_count)
  num_batches = max(1, -(-per_process // batch))
  rows = np.full(num_batches * batch, -1, np.int64)
  rows[:shard.shape[0]] = shard
  ds = grain.MapDataset.source(_Padded(source, rows))
  return _batches(ds, cfg, processor, batch, drop_remainder=False)


class DataIterator:
  """Iterates batches; counts examples read and skipped; state = grain state + counters (JSON-able)."""

  def __init__(self, dataset: Union[grain.IterDataset, example_packing.ExamplePacker], source, manifest_errors: Optional[list[str]] = None, *,
               max_skipped_fraction: float = 1.0):
    self.dataset = dataset
    self.source = source
    self._it = iter(dataset)
    self.num_seen = 0                        # real examples read (valid or skipped; not padding)
    self.num_skipped = 0
    self.skipped_examples: list[str] = []    # the first MAX_LISTED skipped, "id (video)"
    self.manifest_errors = list(manifest_errors or [])
    self.max_skipped_fraction = max_skipped_fraction

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    skipped = np.asarray(batch["skipped"], bool)
    self.num_seen += int(np.sum(np.asarray(batch["valid"], bool) | skipped))
    n = int(np.sum(skipped))
    if n:
      self.num_skipped += n
      for row in np.asarray(batch["example_id"])[skipped][:MAX_LISTED - len(self.skipped_examples)]:
        self.skipped_examples.append(self._describe(int(row)))
      logging.warning("data: %d bad example(s) skipped in this batch (%d so far)", n, self.num_skipped)
    return batch

  def _describe(self, row: int) -> str:
    examples = getattr(self.source, "examples", None)    # manifest/arrays: cheap; tfds would scan the split
    if examples is not None and 0 <= row < len(examples):
      return f"{examples[row].id} ({examples[row].video})"
    return f"example_id {row}"

  def check_skipped(self, num_skipped: Optional[int] = None, num_seen: Optional[int] = None) -> None:
    """Raises `TooManySkippedError` when more than `max_skipped_fraction` of the examples read so far
    (or of the manifest's lines) were bad, once `MIN_EXAMPLES_FOR_SKIP_CHECK` were read. Counts default
    to this iterator's; pass all processes' sums to decide the same on every host (the list shown
    is this process's)."""
    num_skipped = self.num_skipped if num_skipped is None else num_skipped
    num_seen = self.num_seen if num_seen is None else num_seen
    bad_lines = len(self.manifest_errors)
    check_skipped_fraction(bad_lines, len(self.source) + bad_lines, self.max_skipped_fraction,
                           self.manifest_errors, what="data: unreadable manifest lines")
    check_skipped_fraction(num_skipped, num_seen, self.max_skipped_fraction, self.skipped_examples,
                           what="data: bad examples (reasons in the 'skipping bad example' log lines)")

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "num_skipped": self.num_skipped, "num_seen": self.num_seen,
            "skipped_examples": list(self.skipped_examples)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state["grain"])
    self.num_skipped = int(state.get("num_skipped", 0))
    self.num_seen = int(state.get("num_seen", 0))
    self.skipped_examples = list(state.get("skipped_examples", []))

  def example(self, example_id: Union[int, np.integer]) -> manifest_lib.Example:
    """Host-side record of a batch's `example_id` (question, option strings, answer, extra)."""
    if not hasattr(self.source, "example"):
      raise TypeError(f"{type(self.source).__name__} keeps no host-side examples (use format manifest/arrays)")
    return self.source.example(int(example_id))

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_processor(cfg: DataConfig, token_ids: config_lib.TokenIds,
                   tok: Optional[tokenizer_lib.Tokenizer] = None) -> ExampleProcessor:
  tok = tok or tokenizer_lib.load_tokenizer(cfg.tokenizer_path)
  return ExampleProcessor(cfg, tok, token_ids)


def train_iterator(cfg: DataConfig, token_ids: config_lib.TokenIds, *, process_index: int = 0,
                   process_count: int = 1, tok: Optional[tokenizer_lib.Tokenizer] = None,
                   llm_drop_ratio: Optional[float] = None) -> DataIterator:
  """Training batches (`train_dataset`); `llm_drop_ratio` is needed with `cfg.pack_examples`."""
  source, errors = open_source(cfg, cfg.train_split)
  ds = train_dataset(cfg, source, make_processor(cfg, token_ids, tok), process_index=process_index,
                     process_count=process_count, llm_drop_ratio=llm_drop_ratio)
  return DataIterator(ds, source, errors, max_skipped_fraction=cfg.max_skipped_fraction)


def eval_iterator(cfg: DataConfig, token_ids: config_lib.TokenIds, split: str, *, process_index: int = 0,
                  process_count: int = 1, tok: Optional[tokenizer_lib.Tokenizer] = None) -> DataIterator:
  source, errors = open_source(cfg, split)
  ds = eval_dataset(cfg, source, make_processor(cfg, token_ids, tok), process_index=process_index,
                    process_count=process_count)
  return DataIterator(ds, source, errors, max_skipped_fraction=cfg.max_skipped_fraction)


__all__ = ["DATA_ERRORS", "DataError", "MAX_LISTED", "MIN_EXAMPLES_FOR_SKIP_CHECK", "TooManySkippedError",
           "bad_example_message", "check_skipped_fraction", "ManifestSource", "ArraysSource", "TfdsSource",
           "ExampleProcessor", "open_source", "train_dataset", "eval_dataset", "DataIterator", "make_processor",
           "train_iterator", "eval_iterator"]
