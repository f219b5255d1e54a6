"""Ask a video: load a checkpoint once, then answer questions about local video files.

  pipe = Pipeline.from_checkpoint("/ckpt/Molmo2-4B", method="stts", ratio=0.5)
  video = pipe.load_video("clip.mp4")                   # decoded and sampled once
  answer = pipe.ask(video, "What happens after the dog jumps?")
  answer.text, answer.token_ids, answer.vision_tokens, answer.timings_s

Checkpoints: an HF Molmo2 directory (`config.json`, safetensors, `tokenizer.json`, the processor
settings in `processor_config.json` (transformers' `save_pretrained` layout, `video_processor`
nested) or `video_preprocessor_config.json` (hub layout); `generation_config.json` adds stop ids),
or an Orbax run of ours (its workdir, `checkpoints/` or a step directory). Training writes the
run's `tokenizer.json` and `processor.json` (`save_run_files`); for older runs the data section of
the saved config (or the main job's `run_config.json`) supplies them.

The path from file to text is the one transformers runs: PyAV metadata and Molmo2's frame
sampling (`data.video`), the direct bilinear resize and patches (`data.preprocess`), the chat
prompt with timestamps (`data.prompt`), the vision stage, the pruned prefill and KV-cache decoding
(`eval.generate`, `eval.decoding`). Greedy by default; `temperature` / `top_p` sample; a row stops
at `<|im_end|>` (and the checkpoint's eos ids).

Static shapes: a video of t sampled frames runs in the smallest frame bucket T >= t (padding
frames masked; STTS budgets follow the real t, `models.budget`), and its prompt in a sequence
bucket S (a multiple of `seq_multiple` that also has room for the bucket's padding frames). Each
stage is compiled once per (method, ratio, T, S, max_new_tokens, sampling) and reused by every
video and question that lands there (`eval.predictor.compile_counts()`); compilation time is
reported apart (`timings_s["compile"]`, from `jax.monitoring`'s compile events).
The vision stage depends only on the video, so several questions about one video reuse its
features.
"""

import dataclasses
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.data import preprocess
from stts_jax.data import prompt as prompt_lib
from stts_jax.data import tokenizer as tokenizer_lib
from stts_jax.data import video as video_lib
from stts_jax.data.config import DEFAULT_MC_TEMPLATE
from stts_jax.eval import checkpoints
from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor
from stts_jax.models import budget
from stts_jax.models import vlm

log = logging.getLogger(__name__)

PROCESSOR_FILE = "processor.json"      # what an Orbax run stores beside its checkpoints
TOKENIZER_FILE = "tokenizer.json"
FRAME_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 320, 384, 512)
METHODS = config_lib.PRUNING_METHODS


class AskError(ValueError):
  """Bad input to the pipeline (checkpoint, video, flag); the message names the file or field."""


# ----------------------------------------------------------------------------------------------
# processor settings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ProcessorSettings:
  """How a video becomes model input (transformers' Molmo2 video processor defaults)."""
  max_frames: int = 64
  max_fps: Optional[float] = 2.0
  image_size: int = 378
  patch_size: int = 14
  pool: tuple[int, int] = (3, 3)
  use_frame_special_tokens: bool = True
  video_use_col_tokens: bool = False
  mc_template: str = DEFAULT_MC_TEMPLATE

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def validate(self, where: str) -> "ProcessorSettings":
    if self.max_frames < 1:
      raise AskError(f"{where}: max_frames must be >= 1, got {self.max_frames}")
    if self.max_fps is not None and self.max_fps <= 0:
      raise AskError(f"{where}: max_fps must be positive, got {self.max_fps}")
    if self.image_size % self.patch_size:
      raise AskError(f"{where}: image size {self.image_size} is not divisible by patch_size {self.patch_size}")
    return self

  def check_model(self, cfg: config_lib.ModelConfig, where: str) -> None:
    if (self.image_size, self.patch_size) != (cfg.vit.image_size, cfg.vit.patch_size):
      raise AskError(f"{where}: image size / patch size ({self.image_size}, {self.patch_size}) do not match the "
                     f"model's vision config ({cfg.vit.image_size}, {cfg.vit.patch_size})")
    if tuple(self.pool) != tuple(cfg.adapter.video_pool):
      raise AskError(f"{where}: pooling_size {list(self.pool)} does not match the model's video pooling "
                     f"{list(cfg.adapter.video_pool)}")

  @classmethod
  def from_data_config(cls, data: Mapping[str, Any]) -> "ProcessorSettings":
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in data.items() if k in fields}
    if "pool" in kw:
      kw["pool"] = tuple(kw["pool"])
    return cls(**kw)

  def to_json(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), pool=list(self.pool))


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise AskError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(out, dict):
    raise AskError(f"{path}: expected a JSON object")
  return out


def _size_of(size: Any, where: str) -> int:
  """transformers' `size` ({"height", "width"} or {"shortest_edge"} or an int) -> the square side."""
  if isinstance(size, int):
    return size
  if isinstance(size, dict):
    if "height" in size and "width" in size:
      if size["height"] != size["width"]:
        raise AskError(f"{where}: size {size} is not square (Molmo2 resizes frames to a square)")
      return int(size["height"])
    if "shortest_edge" in size:
      return int(size["shortest_edge"])
  raise AskError(f"{where}: unsupported size {size!r}")


def read_hf_processor(directory: str) -> ProcessorSettings:
  """Video settings of an HF Molmo2 directory: `processor_config.json` (nested `video_processor`,
  transformers 5) and/or `video_preprocessor_config.json` (hub layout); defaults when absent."""
  proc_path = os.path.join(directory, "processor_config.json")
  video_path = os.path.join(directory, "video_preprocessor_config.json")
  top = _read_json(proc_path) if os.path.isfile(proc_path) else {}
  video, where = {}, proc_path
  if isinstance(top.get("video_processor"), dict):
    video = top["video_processor"]
  elif os.path.isfile(video_path):
    video, where = _read_json(video_path), video_path
  if not top and not video:
    log.warning("%s: no processor_config.json / video_preprocessor_config.json; using Molmo2's video defaults",
                directory)
  for key, want in (("image_mean", [0.5, 0.5, 0.5]), ("image_std", [0.5, 0.5, 0.5])):
    if key in video and not np.allclose(video[key], want):
      raise AskError(f"{where}: {key} {video[key]} is not supported (the model normalises with {want})")
  for key in ("do_rescale", "do_normalize"):
    if video.get(key) is False:
      raise AskError(f"{where}: {key}=false is not supported (the model expects rescaled, normalised pixels)")
  if video.get("do_sample_frames") is False:
    raise AskError(f"{where}: do_sample_frames=false is not supported (frames are sampled as the processor does)")
  d = ProcessorSettings()
  pool = video.get("pooling_size", list(d.pool))
  return ProcessorSettings(
      max_frames=int(video.get("num_frames") or d.max_frames),
      max_fps=None if "max_fps" in video and video["max_fps"] is None else float(video.get("max_fps", d.max_fps)),
      image_size=_size_of(video["size"], where) if "size" in video else d.image_size,
      patch_size=int(video.get("patch_size", d.patch_size)), pool=(int(pool[0]), int(pool[1])),
      use_frame_special_tokens=bool(top.get("use_frame_special_tokens", d.use_frame_special_tokens)),
      video_use_col_tokens=bool(top.get("video_use_col_tokens", d.video_use_col_tokens)),
  ).validate(where)


def save_run_files(workdir: str, data_cfg: Any, tok: tokenizer_lib.Tokenizer) -> None:
  """Writes `tokenizer.json` and `processor.json` (the data section's sampling settings) into a
  training run, so `Pipeline.from_checkpoint(workdir)` needs nothing else."""
  os.makedirs(workdir, exist_ok=True)
  tok.save(os.path.join(workdir, TOKENIZER_FILE))
  settings = ProcessorSettings.from_data_config(config_lib.to_dict(data_cfg))
  with open(os.path.join(workdir, PROCESSOR_FILE), "w") as f:
    json.dump(settings.to_json(), f, indent=1)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def _token_ids_from_tokenizer(tok: tokenizer_lib.Tokenizer, base: config_lib.TokenIds) -> config_lib.TokenIds:
  """`base` with the ChatML ids (and vision ids the model config does not name) read from the tokenizer."""
  ids = config_lib.to_dict(base)
  for field, text in tokenizer_lib.CHAT_TOKENS:
    got = tok.token_to_id(text)
    if got is not None:
      ids[field] = got
  for field, text in (("image_col", "<im_col>"), ("image_placeholder", "<|image|>"),
                      ("video_placeholder", "<|video|>")):
    got = tok.token_to_id(text)
    if got is not None:
      ids[field] = got
  return config_lib.from_dict(config_lib.TokenIds, ids, "tokens")


def _load_tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  if not os.path.isfile(path):
    raise AskError(f"{path}: tokenizer not found (the checkpoint needs its tokenizer.json)")
  return tokenizer_lib.Tokenizer.from_file(path)


def _stts_overrides(method: Optional[str], ratio: Optional[float], prune_at: Optional[int]) -> dict[str, Any]:
  """The STTS fields the caller sets (None: the checkpoint's), validated."""
  out: dict[str, Any] = {}
  if method is not None:
    if method not in METHODS:
      raise AskError(f"--method must be one of {list(METHODS)}, got {method!r}")
    out["method"] = method
  if ratio is not None:
    if not 0.0 <= ratio < 1.0:
      raise AskError(f"--ratio must be in [0, 1), got {ratio}")
    out["ratio"] = float(ratio)
  if prune_at is not None:
    out["prune_at"] = int(prune_at)
  return out


def _variant_of(model: vlm.Molmo2, overrides: Mapping[str, Any], where: str) -> vlm.Molmo2:
  if not overrides:
    return model
  try:
    return gen_lib.model_variant(model, **dict(overrides, num_rows=None))
  except ValueError as e:
    raise AskError(f"{where}: {e}") from e


def _check_scorer(model: vlm.Molmo2, fresh: Sequence[str], where: str) -> None:
  stts = model.config.stts
  if stts.method == "stts" and stts.prunes and (model.scorer is None or fresh):
    raise AskError(f"{where}: method 'stts' needs a trained scorer, but this checkpoint has none"
                   + (f" (its {len(fresh)} scorer parameters would be freshly initialised)" if fresh else "")
                   + "; use --method none | heuristic | random or an STTS-trained checkpoint")


def _load_hf(path: str, overrides: Mapping[str, Any], dtype: Optional[str], attention: Optional[str]):
  cfg_path = os.path.join(path, "config.json")
  hf = _read_json(cfg_path)
  if hf.get("model_type", "molmo2") != "molmo2":
    raise AskError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not a Molmo2 checkpoint")
  tok = _load_tokenizer(os.path.join(path, TOKENIZER_FILE))
  from stts_jax import weights
  from stts_jax.weights import hf_config
  try:
    base = hf_config.from_hf_config(hf, dtype=jnp.dtype(dtype or "float32").name)
  except ValueError as e:
    raise AskError(f"{cfg_path}: {e}") from e
  updates: dict[str, Any] = dict(tokens=_token_ids_from_tokenizer(tok, base.tokens))
  if "method" in overrides:   # builds (or not) the scorer slot for the requested method
    updates["stts"] = dataclasses.replace(base.stts, **dict(overrides, num_rows=None))
  if attention:
    updates["attention"] = attention
  try:
    model, report = weights.load_molmo2_with_report(path, dtype=dtype or "float32", **updates)
  except ValueError as e:
    raise AskError(f"{path}: {e}") from e
  model = _variant_of(model, {k: v for k, v in overrides.items() if k != "method"}, path)
  _check_scorer(model, report.fresh, path)
  stop = []
  gen_path = os.path.join(path, "generation_config.json")
  if os.path.isfile(gen_path):
    eos = _read_json(gen_path).get("eos_token_id")
    stop = [eos] if isinstance(eos, int) else list(eos or [])
  return model, tok, read_hf_processor(path), tuple(int(s) for s in stop), {"format": "hf", "directory": path}


def _orbax_saved_config(path: str, step: Optional[int]) -> dict[str, Any]:
  import orbax.checkpoint as ocp
  root, dir_step = checkpoints._orbax_root(path)
  manager = ocp.CheckpointManager(root, item_names=("state", "data_iter", "config"))
  try:
    step = dir_step if step is None else step
    step = manager.latest_step() if step is None else step
    if step is None:
      raise AskError(f"{path}: not a Molmo2 checkpoint (no config.json + *.safetensors, no Orbax checkpoint steps)")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"] or {}
  finally:
    manager.close()
  return saved if isinstance(saved, dict) else {}


def _run_dir(path: str) -> str:
  """The training workdir of an Orbax path (workdir, checkpoints/ or a step directory)."""
  root, _ = checkpoints._orbax_root(path)
  return os.path.dirname(root) if os.path.basename(root.rstrip("/")) == "checkpoints" else root


def _load_orbax(path: str, overrides: Mapping[str, Any], dtype: Optional[str], attention: Optional[str],
                step: Optional[int]):
  saved = _orbax_saved_config(path, step)
  if not saved.get("model"):
    raise AskError(f"{path}: the Orbax run has no saved model config; it cannot be loaded without one")
  workdir = _run_dir(path)
  data = saved.get("data") or {}
  proc_path = os.path.join(workdir, PROCESSOR_FILE)
  if os.path.isfile(proc_path):
    settings = ProcessorSettings.from_data_config(_read_json(proc_path)).validate(proc_path)
  elif data:
    settings = ProcessorSettings.from_data_config(data).validate(f"{path} (saved data config)")
  else:
    raise AskError(f"{path}: no {PROCESSOR_FILE} and no data section in the saved config")
  tok_path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(tok_path) and data:   # runs written before the tokenizer was saved with them
    tok_path = data.get("tokenizer") or os.path.join(data.get("path", ""), TOKENIZER_FILE)
  tok = _load_tokenizer(tok_path)
  model_cfg = config_lib.build_model_config(saved["model"])
  model, info = checkpoints.load_orbax(path, model_cfg, step=step)
  cfg = model.config
  if dtype is not None and jnp.dtype(dtype) != jnp.dtype(cfg.dtype):
    # The compute dtype is static module state built from the run's config.
    raise AskError(f"{path}: --dtype {dtype} differs from the run's compute dtype {cfg.dtype}; an Orbax run is "
                   f"served in the dtype it was trained with (omit --dtype)")
  if attention:
    model = vlm.with_attention(model, attention)   # sets each attention module's implementation
  if overrides.get("method") == "stts" and model.scorer is None:
    raise AskError(f"{path}: method 'stts' needs a trained scorer, but this run was trained without one "
                   f"(model.stts.method={cfg.stts.method!r}); use --method none | heuristic | random")
  model = _variant_of(model, overrides, path)
  _check_scorer(model, (), path)
  return model, tok, settings, (), dict(info, directory=workdir)


# ----------------------------------------------------------------------------------------------
# videos and answers
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Video:
  """A decoded, sampled and preprocessed video (reused by every question about it)."""
  name: str
  indices: np.ndarray          # [T] frame indices in the file
  timestamps: np.ndarray       # [T] seconds (index / fps, float32)
  frames: np.ndarray           # [T, H, W, 3] uint8, as decoded
  patches: np.ndarray          # [T, P, patch*patch*3] uint8, resized and patchified
  info: video_lib.VideoInfo
  decode_s: float
  questions: int = 0           # questions asked so far (the decode time is reported with the first)

  @property
  def num_frames(self) -> int:
    return int(self.indices.shape[0])


@dataclasses.dataclass
class Answer:
  question: str
  text: str
  token_ids: list[int]               # generated ids (the stop token included when emitted)
  stopped: bool                      # a stop token was emitted
  num_frames: int
  frame_bucket: int
  seq_bucket: int
  method: str
  ratio: float
  vision_tokens: dict[str, int]      # kept / total LLM vision tokens (windows)
  timings_s: dict[str, float]
  keep_mask: np.ndarray              # [T, W] kept windows of the real frames
  scores: np.ndarray                 # [T, W] window scores (zeros when unpruned)

  def to_json(self) -> dict[str, Any]:
    return {"question": self.question, "answer": self.text, "token_ids": [int(t) for t in self.token_ids],
            "stopped": bool(self.stopped), "num_frames": self.num_frames, "frame_bucket": self.frame_bucket,
            "seq_bucket": self.seq_bucket, "method": self.method,
            "ratio": self.ratio if self.method != "none" else 0.0,
            "vision_tokens": dict(self.vision_tokens), "timings_s": dict(self.timings_s)}


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if b >= n:
      return b
  raise AskError(f"{n} sampled frames exceed the largest frame bucket {max(buckets)} (lower --max_frames)")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------
class Pipeline:
  """One loaded checkpoint answering questions about videos (module docstring)."""

  def __init__(self, model: vlm.Molmo2, tok: tokenizer_lib.Tokenizer, settings: ProcessorSettings, *,
               stop_ids: Sequence[int] = (), frame_buckets: Optional[Sequence[int]] = None, seq_multiple: int = 256,
               mesh: Optional[jax.sharding.Mesh] = None, rules: Sequence[tuple[str, Any]] = (),
               source: Optional[dict[str, Any]] = None, max_cached_videos: int = 4):
    cfg = model.config
    settings.check_model(cfg, "processor settings")
    self.model = model
    self.tok = tok
    self.settings = settings
    self.source = dict(source or {})
    rows, cols = preprocess.pooled_grid((settings.grid, settings.grid), settings.pool)
    try:
      self.builder = prompt_lib.PromptBuilder(tok, cfg.tokens, rows=rows, cols=cols,
                                              use_frame_special_tokens=settings.use_frame_special_tokens,
                                              video_use_col_tokens=settings.video_use_col_tokens)
    except ValueError as e:
      raise AskError(str(e)) from e
    self.windows = rows * cols
    buckets = sorted({b for b in (frame_buckets or FRAME_BUCKETS) if b < settings.max_frames} | {settings.max_frames})
    self.frame_buckets = tuple(buckets)
    self.seq_multiple = seq_multiple
    self.stop_ids = gen_lib.stop_ids_for(model, tuple(stop_ids))
    self.mesh, self.rules = mesh, tuple(rules)
    self._variants: dict[tuple[str, float], tuple[Any, Any]] = {}
    self._seen: set[tuple] = set()
    self._warned_positions = False
    self._videos: OrderedDict = OrderedDict()
    self._vision: OrderedDict = OrderedDict()
    self._max_cached = max_cached_videos

  # -- construction -----------------------------------------------------------------------------
  @classmethod
  def from_checkpoint(cls, path: str, *, method: Optional[str] = None, ratio: Union[int, float, None] = None,
                      dtype: Optional[str] = None,
                      max_frames: Optional[int] = None, max_fps: Union[int, float, None] = None,
                      attention: Optional[str] = None, step: Optional[int] = None, use_mesh: bool = True,
                      prune_at: Optional[int] = None, vit_chunk: Optional[int] = 16, **kwargs) -> "Pipeline":
    """Loads an HF Molmo2 directory or an Orbax run (module docstring). `method`, `ratio`, `prune_at`
    (the ViT block the windows are scored after) default to the checkpoint's STTS settings (an HF
    checkpoint without any: unpruned); `max_frames` / `max_fps` override its processor settings.
    `vit_chunk`: ViT rows of a video run together (`model.vit_chunk`; the same result, and at 384
    frames half the vision stage's temporaries, docs/real_scale.md); None keeps the checkpoint's."""
    path = os.fspath(path)
    if dtype not in (None, "float32", "bfloat16"):
      raise AskError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if not os.path.exists(path):
      raise AskError(f"{path}: checkpoint directory does not exist")
    if not os.path.isdir(path):
      raise AskError(f"{path}: not a directory (expected an HF Molmo2 directory or an Orbax run)")
    overrides = _stts_overrides(method, ratio, prune_at)
    if checkpoints.is_hf_dir(path):
      if step is not None:
        raise AskError("--step applies to Orbax runs, not to an HF checkpoint directory")
      model, tok, settings, stop, source = _load_hf(path, overrides, dtype, attention)
    elif os.path.isfile(os.path.join(path, "config.json")):
      raise AskError(f"{path}: has config.json but no *.safetensors weights")
    else:
      model, tok, settings, stop, source = _load_orbax(path, overrides, dtype, attention, step)
    if max_frames is not None:
      settings = dataclasses.replace(settings, max_frames=int(max_frames))
    if max_fps is not None:
      settings = dataclasses.replace(settings, max_fps=float(max_fps) if max_fps > 0 else None)
    settings = settings.validate("overrides")
    if vit_chunk is not None and model.config.vit_chunk is None:
      graphdef, state = nnx.split(model)
      model = nnx.merge(graphdef, state)
      model.config = dataclasses.replace(model.config, vit_chunk=int(vit_chunk)).validate()
    mesh, rules = (_local_mesh(model) if use_mesh else (None, ()))
    if mesh is not None:
      from stts_jax.parallel import sharding
      graphdef, state = nnx.split(model)
      model = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
    return cls(model, tok, settings, stop_ids=stop, mesh=mesh, rules=rules, source=source, **kwargs)

  # -- videos -----------------------------------------------------------------------------------
  def load_video(self, path: str) -> Video:
    """Decodes and samples `path` as the Molmo2 processor does (cached by path, size and mtime)."""
    path = os.fspath(path)
    try:
      stat = os.stat(path)
      key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, self.settings.max_frames, self.settings.max_fps)
    except OSError:
      key = None
    if key is not None and key in self._videos:
      self._videos.move_to_end(key)
      return self._videos[key]
    s = self.settings
    t0 = time.perf_counter()
    info = video_lib.probe(path, default_fps=s.max_fps or 2.0)
    indices = video_lib.sample_indices(info.total_frames, info.fps, info.duration, s.max_frames, s.max_fps)
    frames = video_lib.decode_frames(path, indices, info=info)
    patches = preprocess.preprocess_frames(frames, s.image_size, s.patch_size)
    video = Video(name=path, indices=indices, timestamps=video_lib.timestamps(indices, info.fps), frames=frames,
                  patches=patches, info=info, decode_s=time.perf_counter() - t0)
    if key is not None:
      self._videos[key] = video
      while len(self._videos) > self._max_cached:
        self._videos.popitem(last=False)
    return video

  # -- stages -----------------------------------------------------------------------------------
  def _variant(self, method: str, ratio: float, frame_bucket: int):
    """(graphdef, state) of the model under (method, ratio) for videos in `frame_bucket`: packed ViT
    rows sized for the bucket (`budget.typical_num_rows`; a video needing more takes the exact
    dense fallback), parameters shared with `self.model`."""
    key = (method, float(ratio), frame_bucket)
    if key not in self._variants:
      overrides = _stts_overrides(method, ratio, None)
      prunes = method != "none" and ratio > 0
      rows = budget.typical_num_rows(frame_bucket, self.windows, ratio) if prunes else None
      try:
        model = gen_lib.model_variant(self.model, **overrides, num_rows=rows)
      except ValueError as e:
        raise AskError(f"ask: {e}") from e
      _check_scorer(model, (), "ask")
      self._variants[key] = nnx.split(model)
    return self._variants[key]

  def _run(self, stage: str, fn, key: tuple, timings: dict[str, float], **kwargs):
    """Calls jitted `fn`; tracing, lowering and compiling (first call of a shape `key`) are timed
    apart from the stage (`jax.monitoring` compile events)."""
    before = _COMPILE_S[0]
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(**kwargs))
    wall = time.perf_counter() - t0
    compile_s = _COMPILE_S[0] - before
    self._seen.add((stage,) + key)
    if compile_s:
      timings["compile"] = timings.get("compile", 0.0) + compile_s
    timings[stage] = max(wall - compile_s, 0.0)
    return out

  def shapes_seen(self) -> dict[str, int]:
    """Distinct static shapes (method, ratio, buckets, ...) each stage has run with."""
    out = {s: 0 for s in predictor.STAGES}
    for key in self._seen:
      out[key[0]] += 1
    return out

  def _device(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    from stts_jax.parallel import sharding
    return sharding.shard_batch(arrays, self.mesh, self.rules)

  def _vision_features(self, video: Video, method: str, ratio: float, seed: int, timings: dict[str, float]):
    t = video.num_frames
    tb = _bucket(t, self.frame_buckets)
    graphdef, state = self._variant(method, ratio, tb)
    cache_key = (id(video), method, float(ratio), seed)
    hit = self._vision.get(cache_key)
    if hit is not None and hit[0] is video:
      timings["vision"] = 0.0
      return tb, hit[1]
    patches = np.zeros((1, tb) + video.patches.shape[1:], np.uint8)
    patches[0, :t] = video.patches
    frame_mask = np.zeros((1, tb), bool)
    frame_mask[0, :t] = True
    dev = self._device({"patches": patches, "frame_mask": frame_mask})
    rng = jax.random.key(seed)
    with _mesh_context(self.mesh):
      vision = self._run("vision", predictor._vision_jit, (method, float(ratio), tb), timings, graphdef=graphdef,
                         state=state, patches=dev["patches"], frame_mask=dev["frame_mask"], rng=rng,
                         example_ids=None, mesh=self.mesh, rules=self.rules)
    self._vision[cache_key] = (video, vision)
    while len(self._vision) > self._max_cached:
      self._vision.popitem(last=False)
    return tb, vision

  def _seq_bucket(self, n: int, t: int, tb: int, video: Video) -> int:
    """Room for the prompt plus the bucket's padding frames (so S' = S - dropped(T) fits every t <= T)."""
    ts_tokens = max((len(self.builder._encode(prompt_lib.timestamp_text(i, float(s))))
                     for i, s in enumerate(video.timestamps)), default=0)
    per_frame = len(self.builder.frame_body) + ts_tokens + 1
    return _round_up(n + (tb - t) * per_frame, self.seq_multiple)

  # -- asking -----------------------------------------------------------------------------------
  def ask(self, video: Any, question: str, *, options: Optional[Sequence[str]] = None,
          method: Optional[str] = None, ratio: Union[int, float, None] = None, max_new_tokens: int = 64,
          temperature: Union[int, float] = 0.0, top_p: Union[int, float] = 1.0, seed: int = 0) -> Answer:
    """Answers `question` about `video` (a `Video` or a path). `options`: multiple choice, formatted
    with the checkpoint's template. `method` / `ratio` default to the checkpoint's load settings."""
    if not isinstance(video, Video):
      video = self.load_video(video)
    cfg = self.model.config
    method = cfg.stts.method if method is None else method
    ratio = cfg.stts.ratio if ratio is None else float(ratio)
    if max_new_tokens < 1:
      raise AskError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
      raise AskError(f"--temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
      raise AskError(f"--top_p must be in (0, 1], got {top_p}")
    if not question.strip():
      raise AskError("--question is empty")
    timings: dict[str, float] = {"video_decode": video.decode_s if video.questions == 0 else 0.0}
    video.questions += 1
    t = video.num_frames
    tb, vision = self._vision_features(video, method, ratio, seed, timings)
    graphdef, state = self._variant(method, ratio, tb)
    text = prompt_lib.format_question(question, options, self.settings.mc_template)
    ids = self.builder.build(video.timestamps, text, None).input_ids
    n = int(ids.shape[0])
    if n + max_new_tokens > cfg.llm.max_position_embeddings and not self._warned_positions:
      self._warned_positions = True
      log.warning("prompt of %d tokens + %d new tokens exceeds the model's max_position_embeddings %d "
                  "(RoPE extrapolates; answers may degrade)", n, max_new_tokens, cfg.llm.max_position_embeddings)
    s = self._seq_bucket(n, t, tb, video)
    input_ids = np.full((1, s), cfg.tokens.pad, np.int32)
    input_ids[0, :n] = ids
    token_mask = np.zeros((1, s), bool)
    token_mask[0, :n] = True
    dev = self._device({"input_ids": input_ids, "token_mask": token_mask,
                        "option_ids": np.full((1, 1), -1, np.int32), "valid": np.ones(1, bool)})
    with _mesh_context(self.mesh):
      pre, _ = self._run("prefill", predictor._prefill_jit, (method, float(ratio), tb, s, max_new_tokens), timings,
                         graphdef=graphdef, state=state, input_ids=dev["input_ids"], token_mask=dev["token_mask"],
                         vision=vision, option_ids=dev["option_ids"], max_new_tokens=max_new_tokens,
                         mesh=self.mesh, rules=self.rules)
      if int(predictor.to_host(pre.num_truncated_b)[0]):
        raise AskError(f"internal: the prompt of {n} tokens was truncated in sequence bucket {s}")
      gen = self._run("decode", predictor._decode_jit,
                      (method, float(ratio), tb, s, max_new_tokens, temperature, top_p), timings,
                      graphdef=graphdef, state=state, prefill=pre.state, valid=dev["valid"],
                      rng=jax.random.fold_in(jax.random.key(seed), 1), max_new_tokens=max_new_tokens,
                      stop_ids=self.stop_ids, pad_id=cfg.tokens.pad, temperature=float(temperature),
                      top_p=float(top_p), mesh=self.mesh, rules=self.rules)
    tokens = predictor.to_host(gen.tokens_bn)[0]
    num = int(predictor.to_host(gen.num_tokens_b)[0])
    stopped = bool(predictor.to_host(gen.stopped_b)[0])
    token_ids = [int(x) for x in tokens[:num + int(stopped)]]
    timings["decode_tokens_per_s"] = (len(token_ids) - 1) / timings["decode"] if timings["decode"] > 0 and \
        len(token_ids) > 1 else 0.0
    keep = predictor.to_host(vision.keep_mask_btw)[0, :t]
    return Answer(question=question, text=self.tok.decode(token_ids[:num]), token_ids=token_ids, stopped=stopped,
                  num_frames=t, frame_bucket=tb, seq_bucket=s, method=method, ratio=float(ratio),
                  vision_tokens={"kept": int(keep.sum()), "total": int(keep.size)},
                  timings_s={k: round(float(v), 6) for k, v in timings.items()}, keep_mask=keep,
                  scores=predictor.to_host(vision.scores_btw)[0, :t])

  def kept_windows(self, num_frames: int, method: Optional[str] = None, ratio: Optional[float] = None) -> int:
    """LLM vision tokens a video of `num_frames` sampled frames keeps (static budget)."""
    cfg = self.model.config
    method = cfg.stts.method if method is None else method
    ratio = cfg.stts.ratio if ratio is None else ratio
    if method == "none" or ratio == 0:
      return num_frames * self.windows
    return budget.num_kept(num_frames, self.windows, ratio)


_COMPILE_S = [0.0]    # seconds spent tracing, lowering and compiling in this process (all threads)
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if event in _COMPILE_EVENTS:
    _COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


class _NullContext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _mesh_context(mesh):
  return jax.set_mesh(mesh) if mesh is not None else _NullContext()


def _local_mesh(model: vlm.Molmo2):
  """Several local devices: the training rules table over a ('data', 'fsdp', 'tensor') = (1, 1, n)
  mesh (batch 1: parameters split by the tensor axis); one device: no mesh."""
  n = jax.local_device_count()
  if n <= 1 or jax.process_count() > 1:
    return None, ()
  from stts_jax.parallel import mesh as mesh_lib
  from stts_jax.parallel import sharding
  from stts_jax.parallel.config import MeshConfig
  mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=-1)
  return mesh_lib.make_mesh(mesh_cfg, jax.local_devices()), sharding.make_rules(mesh_cfg)


__all__ = ["Answer", "AskError", "FRAME_BUCKETS", "Pipeline", "ProcessorSettings", "Video", "read_hf_processor",
           "save_run_files"]
