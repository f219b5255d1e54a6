"""Input-pipeline throughput: frames/s decoded + preprocessed by one worker, and batches/s."""

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from stts_jax import config as config_lib
from stts_jax.data import pipeline, preprocess, video
from stts_jax.data.config import DataConfig


def decode_preprocess_rate(paths: Sequence[str], *, max_frames: int, max_fps: float, image_size: int,
                           patch_size: int = 14, min_seconds: float = 2.0) -> dict[str, Any]:
  """Single-process rate of `sample_frames` + resize + patchify over `paths` (cycled).

  Returns frames/s for decode (PyAV sampling incl. rgb conversion), preprocess (Molmo2 resize +
  patchify) and both together (wall clock), the same total per CPU-second of this process
  (`total_fps_cpu`: what one worker sustains on an otherwise idle core), and the counts timed.
  """
  decode_s = prep_s = 0.0
  cpu0 = time.process_time()
  frames_done = videos_done = 0
  start = time.perf_counter()
  while time.perf_counter() - start < min_seconds or videos_done < len(paths):
    path = paths[videos_done % len(paths)]
    t0 = time.perf_counter()
    frames, _ = video.sample_frames(path, max_frames, max_fps)
    t1 = time.perf_counter()
    preprocess.preprocess_frames(frames, image_size, patch_size)
    t2 = time.perf_counter()
    decode_s += t1 - t0
    prep_s += t2 - t1
    frames_done += frames.shape[0]
    videos_done += 1
  cpu = time.process_time() - cpu0
  return {"videos": videos_done, "frames": frames_done, "decode_fps": frames_done / decode_s,
          "preprocess_fps": frames_done / prep_s, "total_fps": frames_done / (decode_s + prep_s),
          "total_fps_cpu": frames_done / cpu}


def pipeline_rate(cfg: DataConfig, token_ids: config_lib.TokenIds, *, num_batches: int = 20,
                  warmup: int = 2) -> dict[str, Any]:
  """Batches/s and real frames/s of the training iterator for `cfg` (its format and workers)."""
  it = pipeline.train_iterator(cfg, token_ids)
  try:
    for _ in range(warmup):
      next(it)
    frames = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
      frames += int(np.sum(next(it)["frame_mask"]))
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  finally:
    it.close()
  return {"format": cfg.format, "workers": cfg.num_workers, "batch": cfg.batch_size, "batches": num_batches,
          "batches_per_s": num_batches / dt, "frames_per_s": frames / dt,
          "examples_per_s": num_batches * cfg.batch_size / dt,
          "frames_per_cpu_s": frames / cpu if cfg.num_workers == 0 else None}


__all__ = ["decode_preprocess_rate", "pipeline_rate"]
