"""`DataConfig`: the `data` section of a top-level config (registered with stts_jax.config)."""

import dataclasses
from typing import Any, Optional

from stts_jax import config as config_lib

FORMATS = ("manifest", "tfds", "arrays")
ON_ERROR = ("raise", "skip")

DEFAULT_MC_TEMPLATE = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data lives, how videos are sampled/preprocessed, and the static batch shapes.

  A batch has static shapes (B, T, S) = (batch_size / process_count, max_frames, seq_len).
  """
  path: str = ""                    # dataset directory (manifests, tokenizer, arrays, tfds)
  format: str = "manifest"          # manifest: {path}/{split}.jsonl + video files
                                    # tfds: ArrayRecord built by tfds_builder (encoded video bytes)
                                    # arrays: manifest + pre-decoded frames {path}/{split}_frames.npy
  train_split: str = "train"
  eval_splits: tuple[str, ...] = ("val",)
  tokenizer: str = ""               # tokenizer.json; "" -> {path}/tokenizer.json
  # video sampling + preprocessing (Molmo2 defaults)
  max_frames: int = 64              # T: frames per example (padded), also the sampling cap
  max_fps: Optional[float] = 2.0
  image_size: int = 378
  patch_size: int = 14
  pool: tuple[int, int] = (3, 3)    # patches per pooled LLM token (rows, cols)
  use_frame_special_tokens: bool = True   # <frame_start>/<frame_end> (False: <im_start>/<im_end>)
  video_use_col_tokens: bool = False
  mc_template: str = DEFAULT_MC_TEMPLATE
  max_options: int = 6              # K of the `option_ids` [B, K] eval field
  seq_len: int = 6144               # S
  # batching / order
  batch_size: int = 8               # global; each process gets batch_size / process_count
  shuffle_seed: int = 0
  num_epochs: Optional[int] = None  # training: None repeats forever
  num_workers: int = 0              # Grain worker processes (0: in-process)
  num_threads: int = 2              # Grain read threads per process/worker
  prefetch_buffer: int = 4
  on_error: str = "skip"            # skip: bad example -> empty slot (valid=False), counted + logged
                                    # (data errors only: a bug in our processing code always raises)
  max_skipped_fraction: float = 0.05  # more skipped examples (or unreadable manifest lines) than this
                                    # fraction of those read stops training (checked every log_every
                                    # steps, after >= 20 examples) and evaluation (after each cell),
                                    # listing the files; 1.0 never stops
  seek_gap: int = 96                # decode: seek when the next wanted frame is this far ahead
  # Example packing of the training stream (stts_jax/data/example_packing.py, docs/example_packing.md):
  # whole examples share rows, placed by their *pruned* LLM length; batch_size then counts packed rows.
  # seq_len / max_frames stay the longest single example (unpruned); the row sizes are separate.
  pack_examples: bool = False
  pack_seq_len: int = 0             # pruned LLM tokens per packed row; 0 -> seq_len
  pack_max_frames: int = 0          # frame budget per packed row (the ViT's frames); 0 -> max_frames
  pack_max_videos: int = 8          # most examples per packed row
  pack_lookahead: int = 8           # examples that may wait for a later step (first fit over the stream)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def windows_per_frame(self) -> int:
    """W: pooled LLM tokens per frame (ceil division, padded windows count)."""
    return -(-self.grid // self.pool[0]) * -(-self.grid // self.pool[1])

  @property
  def packed_seq_len(self) -> int:
    """Pruned LLM tokens per packed row."""
    return self.pack_seq_len or self.seq_len

  @property
  def packed_max_frames(self) -> int:
    """Frame budget per packed row."""
    return self.pack_max_frames or self.max_frames

  @property
  def tokenizer_path(self) -> str:
    return self.tokenizer or (f"{self.path}/tokenizer.json" if self.path else "")

  def per_process_batch(self, process_count: int) -> int:
    if self.batch_size % process_count:
      raise ValueError(f"data.batch_size {self.batch_size} is not divisible by process_count {process_count}")
    return self.batch_size // process_count

  def validate(self) -> "DataConfig":
    if self.format not in FORMATS:
      raise ValueError(f"data.format must be one of {FORMATS}, got {self.format!r}")
    if self.on_error not in ON_ERROR:
      raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {self.on_error!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"data.image_size {self.image_size} not divisible by data.patch_size {self.patch_size}")
    for name in ("max_frames", "seq_len", "batch_size", "max_options"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 <= self.max_skipped_fraction <= 1.0:
      raise ValueError(f"data.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
    if self.max_fps is not None and self.max_fps <= 0:
      raise ValueError(f"data.max_fps must be positive or None, got {self.max_fps}")
    if min(self.num_workers, self.num_threads, self.prefetch_buffer) < 0:
      raise ValueError("data.num_workers / num_threads / prefetch_buffer must be >= 0")
    if self.pack_seq_len < 0 or self.pack_max_videos < 1 or self.pack_lookahead < 0:
      raise ValueError("data.pack_seq_len must be >= 0, pack_max_videos >= 1, pack_lookahead >= 0")
    if self.pack_max_frames and self.pack_max_frames < self.max_frames:
      raise ValueError(f"data.pack_max_frames {self.pack_max_frames} < max_frames {self.max_frames}: the "
                       f"longest example could never be packed")
    min_len = 1 + self.max_frames * (self.windows_per_frame + 2)
    if self.seq_len < min_len:
      raise ValueError(f"data.seq_len {self.seq_len} cannot hold {self.max_frames} frames of "
                       f"{self.windows_per_frame} tokens (needs > {min_len})")
    return self

  def check_model(self, model_cfg: config_lib.ModelConfig) -> None:
    """Cross-checks against the model: image/patch size and tokens per frame must agree."""
    if (self.image_size, self.patch_size) != (model_cfg.vit.image_size, model_cfg.vit.patch_size):
      raise ValueError(f"data image_size/patch_size ({self.image_size}, {self.patch_size}) != model vit "
                       f"({model_cfg.vit.image_size}, {model_cfg.vit.patch_size})")
    if tuple(self.pool) != tuple(model_cfg.adapter.video_pool):
      raise ValueError(f"data.pool {self.pool} != model adapter.video_pool {model_cfg.adapter.video_pool}")


def build_data_config(cfg: Any) -> DataConfig:
  return config_lib.from_dict(DataConfig, cfg, "data").validate()


config_lib.register_section("data", build_data_config)

__all__ = ["DataConfig", "build_data_config", "FORMATS", "DEFAULT_MC_TEMPLATE"]
