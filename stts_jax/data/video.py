"""Video decoding with PyAV and frame sampling as the Molmo2 video processor does it.

Sampling follows `transformers` `Molmo2VideoProcessor.sample_frames` (video_processing_molmo2.py):
the target count is `max_frames`, capped at `int(duration * max_fps)` when the video's fps
exceeds `max_fps`, clamped to [1, total]; indices are a floor-uniform stride from frame 0
(`arange(0, total, total / target)` in float32, truncated). Metadata follows transformers'
`read_video_pyav`: total = the stream's frame count, fps = the stream's average rate,
duration = total / fps. Timestamps are `index / fps` seconds from the first frame, computed in
float32 exactly as transformers does (an int32 index tensor divided by the fps), which matters
for the one-decimal timestamp text at rounding boundaries (e.g. 1.05 s).

Containers that report no frame count (WebM/MKV often do) are counted by decoding. Frames are
converted with `frame.to_ndarray(format="rgb24")` (as transformers does). Sparse indices in
long videos are reached by seeking to the keyframe before the target and decoding forward;
the frame index of a decoded frame is recovered from its pts, so seeking and sequential
decoding return the same frames for constant-frame-rate streams (the seek path is only used
when the stream's pts are consistent with its rate).
"""

import dataclasses
import io
import logging
import math
import os
from typing import Optional, Union

import av
import numpy as np
from jaxtyping import Float32, UInt8

VideoSource = Union[str, os.PathLike, bytes]

# Seek instead of decoding forward when the next wanted frame is at least this many frames away.
DEFAULT_SEEK_GAP = 96


class VideoError(ValueError):
  """A video could not be decoded; the message names the file and the problem."""

  def __init__(self, name: str, problem: str):
    super().__init__(f"{name}: {problem}")
    self.name = name
    self.problem = problem


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What sampling needs to know about a video (transformers' `VideoMetadata` subset)."""
  total_frames: int
  fps: float
  duration: float
  height: int
  width: int
  counted: bool      # True if total_frames came from decoding (header had no count)


def _name(src: VideoSource, name: Optional[str]) -> str:
  if name:
    return name
  return "<video bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src)


def _open(src: VideoSource, name: str) -> av.container.InputContainer:
  if isinstance(src, (bytes, bytearray)):
    if not src:
      raise VideoError(name, "empty video bytes")
    handle = io.BytesIO(src)
  else:
    path = os.fspath(src)
    if not os.path.exists(path):
      raise VideoError(name, "file not found")
    if os.path.isdir(path):
      raise VideoError(name, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
      raise VideoError(name, "file is empty (0 bytes)")
    handle = path
  try:
    container = av.open(handle, mode="r")
  except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
    raise VideoError(name, f"cannot open as a video container ({type(e).__name__}: {e})") from e
  if not container.streams.video:
    container.close()
    raise VideoError(name, "no video stream")
  return container


def _stream_fps(stream) -> Optional[float]:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate is not None and float(rate) > 0:
      return float(rate)
  return None


def _count_by_decoding(src: VideoSource, name: str) -> int:
  """Frames of the first video stream, counted by decoding a separately opened container."""
  container = _open(src, name)
  count = 0
  try:
    for _ in container.decode(container.streams.video[0]):
      count += 1
  except av.error.FFmpegError as e:
    raise VideoError(name, f"decode error while counting frames after frame {count} ({e})") from e
  finally:
    container.close()
  return count


def _probe_open(container, src: VideoSource, name: str, default_fps: float) -> VideoInfo:
  stream = container.streams.video[0]
  fps = _stream_fps(stream)
  if fps is None:
    # transformers falls back to max_fps with a warning; timestamps are then approximate.
    logging.warning("%s: the stream has no frame rate; assuming %s fps for timestamps", name, default_fps)
    fps = float(default_fps)
  total = int(stream.frames or 0)
  counted = total <= 0
  if counted:
    total = _count_by_decoding(src, name)
  if total <= 0:
    raise VideoError(name, "video has zero decodable frames")
  return VideoInfo(total_frames=total, fps=fps, duration=total / fps, height=int(stream.height),
                   width=int(stream.width), counted=counted)


def probe(src: VideoSource, *, default_fps: float = 2.0, name: Optional[str] = None) -> VideoInfo:
  """Frame count, fps and size of a video (counts by decoding when the header has no count)."""
  name = _name(src, name)
  container = _open(src, name)
  try:
    return _probe_open(container, src, name, default_fps)
  finally:
    container.close()


def sample_indices(total_frames: int, fps: float, duration: float, max_frames: int,
                   max_fps: Optional[float]) -> np.ndarray:
  """Frame indices the Molmo2 video processor keeps, int64 [T] (T <= max_frames)."""
  if total_frames <= 0:
    raise ValueError(f"total_frames must be positive, got {total_frames}")
  target = int(max_frames)
  if max_fps is not None and fps > max_fps:
    target = min(target, int(duration * max_fps))
  target = max(min(target, total_frames), 1)
  step = total_frames / target
  # torch.arange(0, total, step): length ceil(total / step) in double, values start + i * step
  # computed in double and stored as float32, then `.int()` truncates.
  count = int(math.ceil(total_frames / step))
  values = (np.arange(count, dtype=np.float64) * step).astype(np.float32)
  return values.astype(np.int64)


def timestamps(indices: np.ndarray, fps: float) -> Float32[np.ndarray, "T"]:
  """Seconds of frame `indices`: float32(index) / float32(fps), as transformers computes them."""
  return np.asarray(indices).astype(np.float32) / np.float32(fps)


def _frame_index(frame, base_pts: int, time_base: float, fps: float) -> Optional[int]:
  if frame.pts is None:
    return None
  return int(round((frame.pts - base_pts) * time_base * fps))


class _SeekMismatch(Exception):
  """Frame pts after a seek do not map onto consecutive indices: decode sequentially instead."""


def _decode_pass(container, stream, wanted: list[int], info: VideoInfo, name: str, seek_gap: int,
                 time_base: float) -> list[np.ndarray]:
  out: list[np.ndarray] = []
  frames_iter = container.decode(stream)
  pos: Optional[int] = -1        # index of the last decoded frame (None right after a seek)
  base_pts = None                # pts of frame 0
  after_seek = False
  for target in wanted:
    if (seek_gap > 0 and base_pts is not None and pos is not None and target - pos >= seek_gap):
      seek_pts = base_pts + int(math.floor((target - 0.5) / info.fps / time_base))
      container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
      frames_iter, pos, after_seek = container.decode(stream), None, True
    while pos is None or pos < target:
      frame = next(frames_iter, None)
      if frame is None:
        if after_seek:
          raise _SeekMismatch()
        raise VideoError(name, f"truncated: the stream ended after {pos + 1} frames, but frame "
                               f"{target} was needed (header reports {info.total_frames} frames)")
      if after_seek:
        idx = _frame_index(frame, base_pts, time_base, info.fps)
        if idx is None or (pos is None and idx > target) or (pos is not None and idx != pos + 1):
          raise _SeekMismatch()
        pos = idx
      else:
        pos += 1
        if pos == 0:
          base_pts = frame.pts
      if pos == target:
        out.append(frame.to_ndarray(format="rgb24"))
  return out


def _decode_at(container, indices: np.ndarray, info: VideoInfo, name: str,
               seek_gap: int) -> list[np.ndarray]:
  """Decodes the frames at sorted unique `indices`; returns rgb24 arrays in that order."""
  stream = container.streams.video[0]
  time_base = float(stream.time_base) if stream.time_base else 0.0
  if time_base <= 0 or info.counted:
    seek_gap = 0
  wanted = [int(i) for i in indices]
  try:
    try:
      return _decode_pass(container, stream, wanted, info, name, seek_gap, time_base)
    except _SeekMismatch:
      container.seek(0, stream=stream)
      return _decode_pass(container, stream, wanted, info, name, 0, time_base)
  except av.error.FFmpegError as e:
    raise VideoError(name, f"decode error ({type(e).__name__}: {e})") from e


def decode_frames(src: VideoSource, indices: np.ndarray, *, info: Optional[VideoInfo] = None,
                  name: Optional[str] = None,
                  seek_gap: int = DEFAULT_SEEK_GAP) -> UInt8[np.ndarray, "T H W 3"]:
  """Frames at `indices` (any order, repeats allowed) as uint8 RGB [T, H, W, 3]."""
  name = _name(src, name)
  indices = np.asarray(indices, dtype=np.int64)
  if indices.size == 0:
    raise VideoError(name, "no frame indices requested")
  container = _open(src, name)
  try:
    info = info or _probe_open(container, src, name, 2.0)
    if indices.min() < 0 or indices.max() >= info.total_frames:
      raise VideoError(name, f"frame indices outside [0, {info.total_frames}): "
                             f"{indices.min()}..{indices.max()}")
    unique = np.unique(indices)
    frames = _decode_at(container, unique, info, name, seek_gap)
  finally:
    container.close()
  pos = np.searchsorted(unique, indices)
  return np.stack([frames[p] for p in pos])


def sample_frames(path: VideoSource, max_frames: int, max_fps: Optional[float], *,
                  name: Optional[str] = None, seek_gap: int = DEFAULT_SEEK_GAP,
                  ) -> tuple[UInt8[np.ndarray, "T H W 3"], Float32[np.ndarray, "T"]]:
  """Decodes and samples a video like the Molmo2 processor.

  Args:
    path: a video file path (any container/codec FFmpeg reads) or its encoded bytes.
    max_frames: at most this many frames (Molmo2: 64).
    max_fps: sampling-rate cap for videos faster than it (Molmo2: 2); None for no cap.
  Returns:
    frames uint8 [T, H, W, 3] (RGB) and timestamps float32 [T] in seconds (index / fps).
  """
  name = _name(path, name)
  container = _open(path, name)
  try:
    info = _probe_open(container, path, name, max_fps or 2.0)
    indices = sample_indices(info.total_frames, info.fps, info.duration, max_frames, max_fps)
    frames = _decode_at(container, indices, info, name, seek_gap)
  finally:
    container.close()
  return np.stack(frames), timestamps(indices, info.fps)


__all__ = ["VideoError", "VideoInfo", "probe", "sample_indices", "timestamps", "decode_frames", "sample_frames"]
