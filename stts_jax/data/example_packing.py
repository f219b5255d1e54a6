"""Example packing on the host: whole processed examples -> packed rows of a static size.

Why: a video-QA set mixes clips of 8 to 64 frames and prompts of any length; padding every example
to the longest leaves most of each row empty. STTS's budget is exact and static given a video's
frame count and the ratio (DESIGN.md 3.8), so the LLM length an example will have *after* pruning
is known here, before the forward pass, and rows can be filled by that length.

Input: the pipeline's processed examples (`pipeline.ExampleProcessor`, one example padded to
T = max_frames frames and S = seq_len tokens). Output: batches of B = `rows` packed rows
(`stts_jax/models/example_packing.py` lists the fields the model reads):
  patches uint8 [B, F, P, I], frame_mask bool [B, F], timestamps float32 [B, F],
  frame_example int32 [B, F]         example slot (0..V-1) of each frame, -1 padding,
  input_ids / target_ids int32, token_mask / loss_mask bool [B, S_in]: the examples' *unpruned*
                                     prompts back to back, pad after,
  token_example int32 [B, S_in]      example slot of each token, -1 padding,
  positions int32 [B, S_in]          position within the example (0 at its first token),
  example_frames int32 [B, V], example_tokens int32 [B, V] (unpruned), example_id int64 [B, V] (-1 empty),
  answer_index int32 [B, V], option_ids int32 [B, V, K], prompt_len int32 [B, V], valid / skipped bool [B, V],
  pack_tokens int64 [B] (pruned tokens placed), pack_capacity int64 [B] (= seq_len): host-only, for fill logs.
F = `max_frames` (frame budget: the ViT runs on F frames per row), V = `max_videos`,
S_in = `seq_len` + `budget.packed_dropped_bound(F)`: an example occupies its pruned length of the
row's `seq_len` pruned tokens; the model removes the pruned tokens (at most that bound) itself.

Placement: first fit, in stream order. Each step opens B empty rows; an example goes into the first
row where its pruned tokens, frames and one more example slot fit. An example that fits nowhere
waits (up to `lookahead` examples; a waiting example is placed before newer ones next step); the
step closes when one more would have to wait. Every example is placed whole, exactly once; none is
dropped or split (one that cannot fit an empty row is a data error: skipped as an empty slot, or
raised with on_error="raise"). Every call returns exactly B rows, so processes that each pack their
own shard step together. Deterministic: a function of the input order only.

State (JSON, saved with the model by Orbax like the unpacked iterator's): the upstream iterator's
state just before the oldest waiting example, and which of the examples read after it still wait.
Restoring rewinds upstream there and reads those examples again (the others were already emitted),
so a resumed run emits exactly the batches an uninterrupted run emits.
A finite stream (data.num_epochs) ends with partly filled rows; its processes may then run out at
different steps: train forever (num_epochs None, the default) with packing across processes.
"""

import dataclasses
import logging
from typing import Any, Optional

import numpy as np

from stts_jax.models import budget

# Fields of a processed example that belong to its slot (copied per example, not per frame/token).
SLOT_FIELDS = ("example_id", "answer_index", "option_ids", "prompt_len", "valid", "skipped")


class PackingError(ValueError):
  """An example can never fit an empty packed row (names the example and the limit)."""


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """Static sizes of the packed rows of one process (see the module docstring)."""
  rows: int                  # B: packed rows per step (per process)
  seq_len: int               # pruned LLM tokens per row
  max_frames: int            # F: frame budget per row
  max_videos: int            # V: most examples per row
  windows: int               # W: LLM tokens per frame
  llm_drop_ratio: float      # the LLM side drops windows at this ratio (0: unpruned or llm_prune off)
  lookahead: int = 8         # examples that may wait for a later step
  pad_id: int = 0            # input/target id of padding tokens (TokenIds.pad)

  def __post_init__(self):
    if min(self.rows, self.seq_len, self.max_frames, self.max_videos, self.windows) < 1 or self.lookahead < 0:
      raise ValueError(f"PackSpec: sizes must be >= 1 and lookahead >= 0, got {self}")
    if not 0.0 <= self.llm_drop_ratio < 1.0:
      raise ValueError(f"PackSpec.llm_drop_ratio must be in [0, 1), got {self.llm_drop_ratio}")

  @property
  def input_len(self) -> int:
    """S_in: the row's unpruned token slots (room for every pruned token the model will remove)."""
    return self.seq_len + budget.packed_dropped_bound(self.max_frames, self.windows, self.llm_drop_ratio)

  def pruned_len(self, num_tokens: int, num_frames: int) -> int:
    """Tokens an example of `num_tokens` unpruned tokens and `num_frames` frames keeps in the LLM."""
    return num_tokens - budget.num_dropped(num_frames, self.windows, self.llm_drop_ratio)


@dataclasses.dataclass
class _Item:
  read_no: int               # position in the upstream stream since the iterator was created/restored
  state_before: Any          # upstream state just before this example was read
  example: dict
  frames: int
  tokens: int                # unpruned
  pruned: int


class _Row:
  def __init__(self):
    self.items: list[_Item] = []
    self.frames = 0
    self.pruned = 0

  def fits(self, item: _Item, spec: PackSpec) -> bool:
    return (len(self.items) < spec.max_videos and self.frames + item.frames <= spec.max_frames
            and self.pruned + item.pruned <= spec.seq_len)

  def add(self, item: _Item) -> None:
    self.items.append(item)
    self.frames += item.frames
    self.pruned += item.pruned


def assemble(rows: list[list[dict]], spec: PackSpec) -> dict[str, np.ndarray]:
  """Packed batch arrays (module docstring) of `rows`, each a list of processed examples."""
  if len(rows) != spec.rows:
    raise ValueError(f"assemble: {len(rows)} rows, spec says {spec.rows}")
  ref = next((ex for row in rows for ex in row), None)
  if ref is None:
    raise ValueError("assemble: no example to take field shapes from")
  b, f, v, s = spec.rows, spec.max_frames, spec.max_videos, spec.input_len
  out = {
      "patches": np.zeros((b, f) + ref["patches"].shape[1:], ref["patches"].dtype),
      "frame_mask": np.zeros((b, f), bool), "timestamps": np.zeros((b, f), np.float32),
      "frame_example": np.full((b, f), -1, np.int32),
      "input_ids": np.full((b, s), spec.pad_id, np.int32), "token_mask": np.zeros((b, s), bool),
      "target_ids": np.full((b, s), spec.pad_id, np.int32), "loss_mask": np.zeros((b, s), bool),
      "token_example": np.full((b, s), -1, np.int32), "positions": np.zeros((b, s), np.int32),
      "example_frames": np.zeros((b, v), np.int32), "example_tokens": np.zeros((b, v), np.int32),
      "example_id": np.full((b, v), -1, np.int64), "answer_index": np.full((b, v), -1, np.int32),
      "option_ids": np.full((b, v) + ref["option_ids"].shape, -1, np.int32),
      "prompt_len": np.zeros((b, v), np.int32), "valid": np.zeros((b, v), bool),
      "skipped": np.zeros((b, v), bool),
      "pack_tokens": np.zeros((b,), np.int64), "pack_capacity": np.full((b,), spec.seq_len, np.int64),
  }
  for r, row in enumerate(rows):
    if len(row) > v:
      raise ValueError(f"assemble: row {r} has {len(row)} examples, more than max_videos {v}")
    fo = so = 0
    for j, ex in enumerate(row):
      t = int(np.sum(ex["frame_mask"]))
      n = int(np.sum(ex["token_mask"]))
      if fo + t > f or so + n > s:
        raise ValueError(f"assemble: row {r} overflows ({fo + t} frames / {so + n} tokens; F={f}, S_in={s})")
      out["patches"][r, fo:fo + t] = ex["patches"][:t]
      out["frame_mask"][r, fo:fo + t] = True
      out["timestamps"][r, fo:fo + t] = ex["timestamps"][:t]
      out["frame_example"][r, fo:fo + t] = j
      for key in ("input_ids", "token_mask", "target_ids", "loss_mask"):
        out[key][r, so:so + n] = ex[key][:n]
      out["token_example"][r, so:so + n] = j
      out["positions"][r, so:so + n] = np.arange(n, dtype=np.int32)
      out["example_frames"][r, j] = t
      out["example_tokens"][r, j] = n
      for key in SLOT_FIELDS:
        out[key][r, j] = ex[key]
      out["pack_tokens"][r] += spec.pruned_len(n, t)
      fo += t
      so += n
  return out


class ExamplePacker:
  """Iterator of packed batches over an iterator of processed examples (module docstring).

  upstream: yields processed examples and has get_state()/set_state() (a Grain DatasetIterator).
  on_error: "skip" turns an example that can never fit into an empty slot (valid False, skipped True,
  logged); "raise" raises `PackingError`.
  """

  def __init__(self, upstream, spec: PackSpec, *, on_error: str = "skip"):
    self.upstream = upstream
    self.spec = spec
    self.on_error = on_error
    self._pending: list[_Item] = []
    self._reads = 0
    self._exhausted = False

  def __iter__(self):
    return self

  def _read(self) -> Optional[_Item]:
    state = self.upstream.get_state()
    try:
      ex = next(self.upstream)
    except StopIteration:
      self._exhausted = True
      return None
    item = self._item(self._reads, state, ex)
    self._reads += 1
    return item

  def _item(self, read_no: int, state: Any, ex: dict) -> _Item:
    t = int(np.sum(ex["frame_mask"]))
    n = int(np.sum(ex["token_mask"]))
    item = _Item(read_no, state, ex, t, n, self.spec.pruned_len(n, t) if n else 0)
    spec = self.spec
    if t > spec.max_frames or item.pruned > spec.seq_len:
      msg = (f"example_id {int(ex['example_id'])}: {t} frames and {item.pruned} pruned tokens do not fit a packed "
             f"row of {spec.max_frames} frames and {spec.seq_len} tokens (data.pack_max_frames / pack_seq_len)")
      if self.on_error == "raise":
        raise PackingError(msg)
      logging.warning("skipping example that cannot be packed: %s", msg)
      empty = {k: np.zeros_like(v) for k, v in ex.items()}
      empty.update(example_id=ex["example_id"], valid=np.bool_(False), skipped=np.bool_(True),
                   answer_index=np.int32(-1), option_ids=np.full_like(ex["option_ids"], -1))
      item = _Item(read_no, state, empty, 0, 0, 0)
    return item

  def __next__(self) -> dict[str, np.ndarray]:
    spec = self.spec
    rows = [_Row() for _ in range(spec.rows)]

    def place(item: _Item) -> bool:
      for row in rows:
        if row.fits(item, spec):
          row.add(item)
          return True
      return False

    waiting = [item for item in self._pending if not place(item)]
    while len(waiting) <= spec.lookahead and not self._exhausted:
      item = self._read()
      if item is not None and not place(item):
        waiting.append(item)
    self._pending = waiting
    if not any(row.items for row in rows):
      raise StopIteration
    return assemble([[it.example for it in row.items] for row in rows], spec)

  # -- state -------------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    """JSON-able: upstream state before the oldest waiting example + which later reads still wait."""
    if self._pending:
      first = self._pending[0].read_no
      return {"upstream": self._pending[0].state_before,
              "waiting": [it.read_no - first for it in self._pending]}
    return {"upstream": self.upstream.get_state(), "waiting": []}

  def set_state(self, state: dict[str, Any]) -> None:
    self.upstream.set_state(state["upstream"])
    self._pending, self._reads, self._exhausted = [], 0, False
    waiting = set(int(i) for i in state.get("waiting", []))
    last = max(waiting) if waiting else -1
    for _ in range(last + 1):
      item = self._read()
      if item is None:
        raise ValueError("example packing: the data ended while restoring the waiting examples")
      if item.read_no in waiting:
        self._pending.append(item)

  def close(self) -> None:
    close = getattr(self.upstream, "close", None)
    if close is not None:
      close()


__all__ = ["PackSpec", "PackingError", "ExamplePacker", "assemble", "SLOT_FIELDS"]
