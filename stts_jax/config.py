"""Typed, frozen configs for stts_jax and the one conversion point from ml_collections.

`configs/*.py: get_config(arg)` returns an `ml_collections.ConfigDict`; `build(cfg)` turns it
into frozen dataclasses (hashable, so they can be static arguments of `jax.jit`), rejecting
unknown keys and checking cross-field rules. Each module receives only its own sub-config.

Sub-configs owned by other packages (data, train, eval) live beside their code and are
registered in `_SECTIONS`; this file only knows the model.
"""

import dataclasses
import types
import typing
from typing import Any, Optional

import ml_collections


# --------------------------------------------------------------------------------------
# generic dict <-> dataclass conversion (strict: unknown keys are errors)
# --------------------------------------------------------------------------------------
def _convert(tp: Any, value: Any, where: str) -> Any:
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
      return None
    return _convert(args[0], value, where)
  if dataclasses.is_dataclass(tp):
    return from_dict(tp, value, where)
  if origin is tuple:
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, where) for v in value)
    if len(args) != len(value):
      raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
    return tuple(_convert(a, v, where) for a, v in zip(args, value))
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp in (int, float, str, bool) and not isinstance(value, tp):
    raise TypeError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
  return value


def from_dict(cls, data: Any, where: str = ""):
  """Builds dataclass `cls` from a mapping; unknown keys raise `ValueError` naming them."""
  if isinstance(data, cls):
    return data
  if isinstance(data, ml_collections.ConfigDict):
    data = data.to_dict()
  if data is None:
    data = {}
  where = where or cls.__name__
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ValueError(f"{where}: unknown config keys {unknown}; allowed: {sorted(names)}")
  kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
  return cls(**kwargs)


def to_dict(obj) -> dict:
  """Inverse of `from_dict` (tuples become lists so the result is JSON-friendly)."""
  def conv(v):
    if dataclasses.is_dataclass(v):
      return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, tuple):
      return [conv(x) for x in v]
    return v
  return conv(obj)


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """SigLIP-style ViT of Molmo2. Defaults: the released Molmo2-4B vision tower.

  As transformers' `Molmo2VisionConfig`: attention may have fewer kv heads than heads (grouped as
  transformers' `repeat_kv`), and `num_heads * head_dim` need not equal `hidden_size` (o_proj maps
  back). The image may be non-square (`image_width`); the ViT itself only sees P = rows * cols
  patches, the geometry lives in the pooling indices.
  """
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_layers: int = 27          # layers that exist in the checkpoint; only up to max(adapter taps) run
  num_heads: int = 16
  head_dim: int = 72
  patch_size: int = 14
  image_size: int = 378         # image height in pixels (and width, unless image_width is set)
  layer_norm_eps: float = 1e-6
  # Init only (checkpoints bring their own): std of the learned position embeddings. A from-scratch
  # model needs them comparable to the patch embeddings (~0.6 rms) to answer "where" questions
  # quickly; 0.02 (the usual ViT init) leaves position at ~3% of the signal.
  position_init_std: float = 0.02
  num_kv_heads: Optional[int] = None   # K; None: = num_heads
  image_width: Optional[int] = None    # None: square (= image_size)

  @property
  def kv_heads(self) -> int:
    """K: key/value heads (num_heads unless num_kv_heads is set)."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def image_hw(self) -> tuple[int, int]:
    """(height, width) in pixels."""
    return self.image_size, self.image_size if self.image_width is None else self.image_width

  @property
  def grid_hw(self) -> tuple[int, int]:
    """Patch grid (rows, cols): (27, 27) for 378 px / 14."""
    h, w = self.image_hw
    return h // self.patch_size, w // self.patch_size

  @property
  def grid(self) -> int:
    """Patches per side of a square grid (27 for 378 px / 14); a non-square grid is an error (use grid_hw)."""
    rows, cols = self.grid_hw
    if rows != cols:
      raise ValueError(f"vit: the patch grid is {rows}x{cols} (image {self.image_hw[0]}x{self.image_hw[1]} px), not "
                       "square; this path needs a square grid (vit.image_width unset)")
    return rows

  @property
  def num_patches(self) -> int:
    """P: patches per frame/crop (729)."""
    rows, cols = self.grid_hw
    return rows * cols

  @property
  def patch_dim(self) -> int:
    """Flattened patch length (14*14*3 = 588), order (pixel_row, pixel_col, channel)."""
    return self.patch_size * self.patch_size * 3

  def validate(self):
    for name, size in (("image_size", self.image_size), ("image_width", self.image_hw[1])):
      if size <= 0 or size % self.patch_size:
        raise ValueError(f"vit.{name} {size} not a positive multiple of patch_size {self.patch_size}")
    if self.kv_heads < 1 or self.num_heads % self.kv_heads:
      raise ValueError(f"vit.num_heads {self.num_heads} must be a multiple of vit.num_kv_heads {self.kv_heads}")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Molmo2 adapter: concat of ViT block outputs, attention pooling, SwiGLU projector."""
  vit_layers: tuple[int, ...] = (24, 18)   # 0-based ViT *block outputs*, concatenated in this order
  num_heads: int = 16                       # pooling attention (output width = vit.hidden_size)
  head_dim: int = 72
  intermediate_size: int = 9728             # projector hidden
  video_pool: tuple[int, int] = (3, 3)
  image_pool: tuple[int, int] = (2, 2)
  num_kv_heads: Optional[int] = None        # pooling attention kv heads; None: = num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def validate(self):
    if not self.vit_layers:
      raise ValueError("adapter.vit_layers must name at least one ViT block")
    if self.kv_heads < 1 or self.num_heads % self.kv_heads:
      raise ValueError(
          f"adapter.num_heads {self.num_heads} must be a multiple of adapter.num_kv_heads {self.kv_heads}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """HF `rope_parameters` subset. rope_type: default | linear | llama3 | yarn."""
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Qwen3-style decoder of Molmo2. Defaults: the released Molmo2-4B text model."""
  hidden_size: int = 2560
  num_layers: int = 36
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  intermediate_size: int = 9728
  vocab_size: int = 151936
  additional_vocab_size: int = 128
  rope_theta: float = 5e6
  rope_scaling: RopeScaling = RopeScaling()
  rope_scaling_layers: Optional[tuple[int, ...]] = None   # None: all layers use `rope_scaling`
  qk_norm_type: str = "qwen3"                              # qwen3 | olmo
  norm_after: bool = False
  rms_norm_eps: float = 1e-6
  attention_bias: bool = False
  max_position_embeddings: int = 36864

  @property
  def embed_rows(self) -> int:
    return self.vocab_size + self.additional_vocab_size

  def validate(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError("llm.num_heads must be a multiple of llm.num_kv_heads")
    if self.qk_norm_type not in ("qwen3", "olmo"):
      raise ValueError(f"llm.qk_norm_type must be 'qwen3' or 'olmo', got {self.qk_norm_type!r}")
    if self.rope_scaling.rope_type not in ("default", "linear", "llama3", "yarn"):
      raise ValueError(f"llm.rope_scaling.rope_type {self.rope_scaling.rope_type!r} unsupported")


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Special token ids. The Molmo2 vision tokens live in the additional-vocab block:
  id = vocab_size + offset (151936 + offset for the released models)."""
  image_start: int = 151936
  image_end: int = 151937
  image_patch: int = 151938
  image_col: int = 151939
  low_res_image_start: int = 151940
  image_placeholder: int = 151941
  image_low: int = 151942
  frame_start: int = 151943
  frame_end: int = 151944
  video_placeholder: int = 151945
  chat_start: int = 151644      # <|im_start|>
  chat_end: int = 151645        # <|im_end|>, also BOS for Molmo2-4B
  pad: int = 151643             # <|endoftext|>

  @classmethod
  def for_vocab(cls, vocab_size: int, chat_start: int, chat_end: int, pad: int) -> "TokenIds":
    names = ["image_start", "image_end", "image_patch", "image_col", "low_res_image_start",
             "image_placeholder", "image_low", "frame_start", "frame_end", "video_placeholder"]
    ids = {n: vocab_size + i for i, n in enumerate(names)}
    return cls(chat_start=chat_start, chat_end=chat_end, pad=pad, **ids)

  @property
  def vision_type_ids(self) -> tuple[int, ...]:
    """Ids with mm_token_type 1: they attend bidirectionally among themselves at prefill."""
    return (self.image_patch, self.image_col, self.image_start, self.low_res_image_start,
            self.frame_start, self.image_end, self.frame_end, self.image_low)


PRUNING_METHODS = ("none", "random", "heuristic", "stts")
PACKING_MODES = ("auto", "always")
BUDGET_MODES = ("fixed", "adaptive")     # stts.budget


@dataclasses.dataclass(frozen=True)
class STTSConfig:
  """Spatio-temporal token scoring (DESIGN.md section 3)."""
  method: str = "none"                   # none | random | heuristic | stts
  ratio: float = 0.5                     # fraction of a video's windows dropped
  prune_at: int = 3                      # ViT block whose output the scorer reads
  window: tuple[int, int] = (3, 3)       # patches per window (= adapter video_pool)
  scorer_hidden: int = 4304
  scorer_heads: int = 16
  # Std of the attention pooler's q/k/v/o weights at init (the authors: 0.02, sized for D = 1152).
  # The pooled output scales like std^2 * D, so narrow demo ViTs need ~1/sqrt(D) to start learning.
  pool_init_std: float = 0.02
  bias_rescale_scope: str = "window_row"  # window_row | frame
  llm_prune: bool = True                 # also drop pruned windows' tokens from the LLM sequence
  num_rows: Optional[int] = None         # packed ViT rows per video; None -> proven bound
  # Late ViT blocks (after the soft block): "auto" packs kept windows into num_rows rows only when
  # that is fewer rows than frames, else runs the frames as they are (same result, no pack/unpack);
  # "always" packs even then (kept to measure what packing costs when it saves nothing).
  packing: str = "auto"
  random_seed: int = 0                   # for method 'random'
  # "fixed": every video drops `ratio`. "adaptive" (inference/evaluation only, issue 22): a ratio
  # per video from static buckets (stts_jax/eval/adaptive_budget.py); training rejects it.
  budget: str = "fixed"

  def validate(self):
    if self.budget not in BUDGET_MODES:
      raise ValueError(f"stts.budget must be one of {BUDGET_MODES}, got {self.budget!r}")
    if self.method not in PRUNING_METHODS:
      raise ValueError(f"stts.method must be one of {PRUNING_METHODS}, got {self.method!r}")
    if not 0.0 <= self.ratio < 1.0:
      raise ValueError(f"stts.ratio must be in [0, 1), got {self.ratio}")
    if self.bias_rescale_scope not in ("window_row", "frame"):
      raise ValueError(f"stts.bias_rescale_scope must be 'window_row' or 'frame', got {self.bias_rescale_scope!r}")
    if self.prune_at < 0:
      raise ValueError("stts.prune_at must be >= 0")
    if self.packing not in PACKING_MODES:
      raise ValueError(f"stts.packing must be one of {PACKING_MODES}, got {self.packing!r}")
    if not self.pool_init_std > 0:
      raise ValueError(f"stts.pool_init_std must be > 0, got {self.pool_init_std}")

  @property
  def prunes(self) -> bool:
    return self.method != "none" and self.ratio > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vit: ViTConfig = ViTConfig()
  adapter: AdapterConfig = AdapterConfig()
  llm: LLMConfig = LLMConfig()
  stts: STTSConfig = STTSConfig()
  tokens: TokenIds = TokenIds()
  dtype: str = "float32"          # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  scan_layers: bool = True        # stack decoder/ViT layers with nnx.scan
  remat: str = "none"             # none | full | dots (jax.checkpoint policy name)
  # ViT/LLM attention implementation (models/attention.py): auto | xla | blockwise | pallas_gpu | splash.
  attention: str = "auto"
  attention_block: int = 512      # blockwise: query/key block length
  # ViT rows (frames or packed rows) of each example run together, rematerialised per chunk
  # (video_forward.run_vit_rows): less activation memory for one more ViT forward. None: all at once.
  vit_chunk: Optional[int] = None

  def validate(self):
    self.vit.validate()
    self.llm.validate()
    self.stts.validate()
    self.adapter.validate()
    for layer in self.adapter.vit_layers:
      if not 0 <= layer < self.vit.num_layers:
        raise ValueError(f"adapter.vit_layers entry {layer} outside [0, {self.vit.num_layers})")
    if self.stts.method != "none":
      self._check_stts_grid()
    if tuple(self.stts.window) != tuple(self.adapter.video_pool):
      raise ValueError("stts.window must equal adapter.video_pool (a window becomes one LLM token)")
    if self.stts.method != "none" and self.stts.prune_at + 1 >= min(self.adapter.vit_layers):
      raise ValueError(
          f"stts.prune_at={self.stts.prune_at}: the soft block prune_at+1 must come before the first "
          f"adapter tap {min(self.adapter.vit_layers)}")
    if self.dtype not in ("float32", "bfloat16") or self.param_dtype not in ("float32", "bfloat16"):
      raise ValueError("dtype/param_dtype must be float32 or bfloat16")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat must be none|full|dots, got {self.remat!r}")
    from stts_jax.models import attention as attention_lib   # no cycle: attention imports no config
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"attention must be one of {attention_lib.IMPLEMENTATIONS}, got {self.attention!r}")
    if self.vit_chunk is not None and self.vit_chunk < 1:
      raise ValueError(f"vit_chunk must be None or >= 1, got {self.vit_chunk}")
    if self.attention_block < 8 or self.attention_block % 8:
      raise ValueError(f"attention_block must be a positive multiple of 8, got {self.attention_block}")
    return self

  def _check_stts_grid(self):
    """STTS scores, prunes and packs whole windows of a square patch grid: the grid must be square and
    tile exactly into `stts.window` windows. Unpruned models (method "none") accept any grid, as
    transformers does (the pooling indices pad partial windows with -1)."""
    rows, cols = self.vit.grid_hw
    wh, ww = self.stts.window
    if rows != cols or rows % wh or cols % ww:
      raise ValueError(
          f"STTS (stts.method={self.stts.method!r}) and the windowed video path work on whole {wh}x{ww} windows "
          f"of a square patch grid, but the vit patch grid is {rows}x{cols} (image {self.vit.image_hw[0]}x"
          f"{self.vit.image_hw[1]} px, patch {self.vit.patch_size}), which does not tile into stts.window "
          f"{tuple(self.stts.window)}; such a model runs unpruned only (stts.method='none', Molmo2.__call__)")

  def with_stts(self, **overrides) -> "ModelConfig":
    """This config with `stts` fields replaced, validated.

    A `num_rows` sized for this config's ratio does not carry over to another ratio (fewer rows than a
    full video's kept windows need is a config error): unless given, it becomes None there (the
    proven bound: same tokens and outputs, only the packed ViT saves less).
    """
    if ("ratio" in overrides and "num_rows" not in overrides and self.stts.num_rows is not None
        and overrides["ratio"] != self.stts.ratio):
      overrides = dict(overrides, num_rows=None)
    return dataclasses.replace(self, stts=dataclasses.replace(self.stts, **overrides)).validate()

  @property
  def windows_per_frame(self) -> int:
    """W: LLM tokens per video frame (81); needs a square grid that tiles into stts.window."""
    self._check_stts_grid()
    return (self.vit.grid // self.stts.window[0]) * (self.vit.grid // self.stts.window[1])


def build_model_config(cfg: Any) -> ModelConfig:
  """ConfigDict/dict -> validated ModelConfig."""
  return from_dict(ModelConfig, cfg, "model").validate()


# Other sections (data, train, eval, mesh) register their dataclass here from their package.
_SECTIONS: dict[str, Any] = {"model": build_model_config}


def register_section(name: str, builder) -> None:
  _SECTIONS[name] = builder


def build(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Builds every known section of a top-level config; unknown top-level keys are errors."""
  # Importing the packages registers their sections.
  import importlib
  for mod in ("stts_jax.data.config", "stts_jax.train.config", "stts_jax.eval.config"):
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:
      if e.name != mod:
        raise
  d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  unknown = sorted(set(d) - set(_SECTIONS) - {"name", "seed", "workdir"})
  if unknown:
    raise ValueError(f"unknown top-level config sections {unknown}; known: {sorted(_SECTIONS)}")
  out = {k: _SECTIONS[k](d.get(k, {})) for k in _SECTIONS if k in d or k == "model"}
  for k in ("name", "seed", "workdir"):
    if k in d:
      out[k] = d[k]
  return out
