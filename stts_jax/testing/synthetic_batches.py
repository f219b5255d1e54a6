"""Synthetic video-QA batches with the data pipeline's batch contract, for loop tests.

Each example: T frames (the first `num_real` real, the rest padding with frame_mask False) of
random uint8 patches `[P, 588]`; one "event" frame gets a bright patch block. Token layout:

  chat_start u | per real frame: ts ts frame_start <im_patch> x W frame_end | q q q q chat_end
  chat_start a | answer chat_end | pad ...

The answer token is `ANSWER_BASE + event frame index`, so a model that sees the frames can learn
it. target_ids[s] = input_ids[s + 1]; loss_mask marks the positions whose target is an answer
token or the closing chat_end. The iterator is a pure function of (seed, index): get_state() /
set_state() give exact resume.
"""

import dataclasses
from typing import Any

import numpy as np

from stts_jax import config as config_lib

ANSWER_BASE = 100


def min_seq_len(cfg: config_lib.ModelConfig, num_frames: int) -> int:
  """Shortest static sequence length that fits `num_frames` real frames."""
  return 2 + num_frames * (cfg.windows_per_frame + 4) + 5 + 2 + 2 + 1


def synthetic_batch(cfg: config_lib.ModelConfig, *, batch_size: int, num_frames: int,
                    seq_len: int, seed: int, index: int) -> dict[str, np.ndarray]:
  """One batch; deterministic in (seed, index). Fields as `stts_jax.data.pipeline` batches."""
  need = min_seq_len(cfg, num_frames)
  if seq_len < need:
    raise ValueError(f"synthetic_batch: seq_len={seq_len} < {need} needed for {num_frames} frames")
  tok = cfg.tokens
  grid = cfg.vit.grid
  p = grid * grid
  pix = cfg.vit.patch_size ** 2 * 3
  w = cfg.windows_per_frame
  rng = np.random.default_rng([seed, index])
  b = batch_size
  patches = rng.integers(0, 96, size=(b, num_frames, p, pix), dtype=np.uint8)
  frame_mask = np.zeros((b, num_frames), bool)
  timestamps = np.zeros((b, num_frames), np.float32)
  input_ids = np.full((b, seq_len), tok.pad, np.int32)
  token_mask = np.zeros((b, seq_len), bool)
  answer_pos = np.zeros((b, seq_len), bool)
  for i in range(b):
    num_real = int(rng.integers(max(1, num_frames // 2), num_frames + 1))
    event = int(rng.integers(0, num_real))
    frame_mask[i, :num_real] = True
    timestamps[i, :num_real] = np.arange(num_real, dtype=np.float32) * 0.5
    patches[i, num_real:] = 0
    patches[i, event, : p // 2] = 250
    ids = [tok.chat_start, 10]
    for t in range(num_real):
      ids += [20 + t % 10, 30, tok.frame_start] + [tok.image_patch] * w + [tok.frame_end]
    ids += [40, 41, 42, 43, tok.chat_end, tok.chat_start, 11]
    start = len(ids)
    ids += [ANSWER_BASE + event, tok.chat_end]
    answer_pos[i, start:len(ids)] = True
    input_ids[i, :len(ids)] = ids
    token_mask[i, :len(ids)] = True
  target_ids = np.concatenate([input_ids[:, 1:], np.full((b, 1), tok.pad, np.int32)], axis=1)
  loss_mask = np.concatenate([answer_pos[:, 1:], np.zeros((b, 1), bool)], axis=1)
  example_id = (np.int64(index) * b + np.arange(b, dtype=np.int64)) + np.int64(seed) * (1 << 32)
  return {"patches": patches, "frame_mask": frame_mask, "timestamps": timestamps,
          "input_ids": input_ids, "token_mask": token_mask, "target_ids": target_ids,
          "loss_mask": loss_mask, "example_id": example_id}


@dataclasses.dataclass
class SyntheticBatches:
  """Infinite iterator of `synthetic_batch`es with Grain-style `get_state()`/`set_state()`."""
  cfg: config_lib.ModelConfig
  batch_size: int
  num_frames: int
  seq_len: int
  seed: int = 0
  index: int = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = synthetic_batch(self.cfg, batch_size=self.batch_size, num_frames=self.num_frames,
                            seq_len=self.seq_len, seed=self.seed, index=self.index)
    self.index += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"seed": self.seed, "index": self.index}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("seed") != self.seed:
      raise ValueError(f"SyntheticBatches: state seed {state.get('seed')} != iterator seed {self.seed}")
    self.index = int(state["index"])
