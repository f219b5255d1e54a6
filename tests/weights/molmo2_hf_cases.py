"""Test helper: tiny random transformers Molmo2 models and HF-style inputs built by hand.

Hand-built inputs: pixel arrays are random in [-1, 1], pooling indices follow the processor's layout
(global indices, row-major windows, -1 padding split pad // 2 before and the rest after, as
transformers' `arange_for_pooling`), token layouts follow the prompt format (timestamps, frame
markers, `<im_patch>` runs, ChatML text). `processor_image_inputs` instead runs transformers' own
Molmo2 processor on images of different crop counts (torchvision-free resize, as `tests/data/hf.py`).
"""

import dataclasses
import importlib
import os
from typing import Optional

import numpy as np
import torch

from stts_jax.testing import tiny

V = tiny.TINY_VOCAB
TOK = tiny.tiny_model_config().tokens
PATCH_DIM = 14 * 14 * 3


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  kv_heads: int = 2
  qk_norm_type: str = "qwen3"
  norm_after: bool = False
  attention_bias: bool = False
  rope: Optional[dict] = None                # HF rope_parameters (rope_theta added)
  rope_scaling_layers: Optional[list] = None
  llm_layers: int = 2
  media: str = "video"                       # video | image | text
  frames: int = 3
  batch: int = 1
  left_pad: int = 0                          # padding tokens before row 0 (batch > 1)
  pad_pool: bool = False                     # put -1 slots into the video pooling
  pass_types: bool = True                    # give mm_token_type_ids to molmo2_logits
  # vision variations (None: the tiny config's value)
  image_hw: tuple[int, int] = (126, 126)     # vision_config.image_size [height, width]
  vit_kv_heads: Optional[int] = None
  vit_heads: Optional[int] = None
  vit_head_dim: Optional[int] = None
  adapter_kv_heads: Optional[int] = None
  adapter_heads: Optional[int] = None
  adapter_head_dim: Optional[int] = None
  crops: tuple[int, ...] = (3,)              # image media: crops (1 low-res + high-res) of row b's image
  flat_pixels: bool = False                  # image media: pixel_values [total_crops, P, I] (processor layout)

  @property
  def grid_hw(self) -> tuple[int, int]:
    return self.image_hw[0] // 14, self.image_hw[1] // 14


CASES = (
    Case("qwen3_gqa_video", frames=3),
    Case("olmo_normafter_bias_mqa_linear_subset", kv_heads=1, qk_norm_type="olmo", norm_after=True,
         attention_bias=True, rope={"rope_type": "linear", "factor": 2.0}, rope_scaling_layers=[1],
         llm_layers=3, frames=4, batch=2, left_pad=5, pad_pool=True, pass_types=False),
    Case("qwen3_mha_yarn_subset_image", kv_heads=4,
         rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
               "beta_fast": 8.0, "beta_slow": 1.0},
         rope_scaling_layers=[0, 2], llm_layers=3, media="image"),
    Case("olmo_llama3_text", qk_norm_type="olmo",
         rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}, media="text", batch=2, left_pad=3),
    # Host generality (issue 21). ViT: 4 heads x 12 = 48 != 32 wide, 2 kv heads; adapter: 4 heads x 24
    # = 96, 1 kv head; a 5x5 grid under 3x3 video pooling (windows padded with -1).
    Case("vit_adapter_gqa_headdim_5x5_video", image_hw=(70, 70), vit_heads=4, vit_kv_heads=2, vit_head_dim=12,
         adapter_heads=4, adapter_kv_heads=1, adapter_head_dim=24, frames=3, batch=2, left_pad=2),
    # Non-square image_size [56, 84]: a 4x6 grid, rows padded by the 3x3 video pooling.
    Case("nonsquare_4x6_video", image_hw=(56, 84), frames=4),
    # Non-square 5x6 grid under 2x2 image pooling; two images of 3 and 2 crops, pixel_values
    # [total_crops, P, I] as the processor emits them; ViT multi-query attention (1 kv head).
    Case("nonsquare_5x6_images_flat_mqa", image_hw=(70, 84), vit_kv_heads=1, media="image", batch=2,
         crops=(3, 2), flat_pixels=True, left_pad=3),
)


def hf_config(case: Case):
  from transformers import Molmo2Config
  cfg = tiny.tiny_model_config()
  vit, ad, llm = cfg.vit, cfg.adapter, cfg.llm
  rope = {"rope_type": "default", **(case.rope or {}), "rope_theta": llm.rope_theta}
  text = dict(hidden_size=llm.hidden_size, num_hidden_layers=case.llm_layers, num_attention_heads=llm.num_heads,
              num_key_value_heads=case.kv_heads, head_dim=llm.head_dim, intermediate_size=llm.intermediate_size,
              vocab_size=V, additional_vocab_size=llm.additional_vocab_size, qk_norm_type=case.qk_norm_type,
              norm_after=case.norm_after, attention_bias=case.attention_bias, rope_parameters=rope,
              max_position_embeddings=128)
  if case.rope_scaling_layers is not None:
    text["rope_scaling_layers"] = case.rope_scaling_layers
  vit_heads, ad_heads = case.vit_heads or vit.num_heads, case.adapter_heads or ad.num_heads
  return Molmo2Config(
      vision_config=dict(hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
                         num_hidden_layers=vit.num_layers, num_attention_heads=vit_heads,
                         num_key_value_heads=case.vit_kv_heads or vit_heads,
                         head_dim=case.vit_head_dim or vit.head_dim,
                         image_size=list(case.image_hw), patch_size=vit.patch_size),
      adapter_config=dict(vision_feature_layer=list(ad.vit_layers), hidden_size=vit.hidden_size,
                          num_attention_heads=ad_heads, num_key_value_heads=case.adapter_kv_heads or ad_heads,
                          head_dim=case.adapter_head_dim or ad.head_dim, intermediate_size=ad.intermediate_size,
                          text_hidden_size=llm.hidden_size),
      text_config=text, image_start_token_id=TOK.image_start, image_end_token_id=TOK.image_end,
      image_patch_id=TOK.image_patch, low_res_image_start_token_id=TOK.low_res_image_start,
      frame_start_token_id=TOK.frame_start, frame_end_token_id=TOK.frame_end)


def hf_model(case: Case, seed: int = 0):
  """Random-weight transformers Molmo2 (eager fp32). Every parameter random (norms around 1)."""
  from transformers import Molmo2ForConditionalGeneration
  cfg = hf_config(case)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = Molmo2ForConditionalGeneration(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = 0.5 if "embed_tokens" in name else 0.1
      p.normal_(0.0, std)
      if "norm" in name and name.endswith("weight"):
        p.add_(1.0)
  return model.eval()


def _text(rng, n):
  return list(rng.integers(0, V - 3, size=n))


def pool_windows(index_grid: np.ndarray, pool_h: int, pool_w: int) -> tuple[np.ndarray, int, int]:
  """[h, w] patch-index grid (-1: none) -> pooling rows [rows*cols, pool_h*pool_w] and (rows, cols): padded
  with -1 to whole windows, pad // 2 before and the rest after in each axis (the processor's rule)."""
  h, w = index_grid.shape
  ph, pw = -h % pool_h, -w % pool_w
  grid = np.pad(index_grid, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), constant_values=-1)
  rows, cols = grid.shape[0] // pool_h, grid.shape[1] // pool_w
  return grid.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, -1), rows, cols


def _video_tokens(rng, frames, tokens_per_frame):
  ids = [TOK.chat_end]
  for t in range(frames):
    ids += _text(rng, 2) + [TOK.frame_start] + [TOK.image_patch] * tokens_per_frame + [TOK.frame_end]
  return ids + [TOK.chat_start] + _text(rng, 5) + [TOK.chat_end, TOK.chat_start] + _text(rng, 2)


def _video_pooling(frames, offset, rng, pad, grid_hw):
  gh, gw = grid_hw
  frame, _, _ = pool_windows(np.arange(gh * gw).reshape(gh, gw), 3, 3)
  pool = np.concatenate([np.where(frame >= 0, frame + offset + t * gh * gw, -1) for t in range(frames)])
  if pad:  # knock out some slots (never a whole row), as the processor does at image borders
    holes = rng.random(pool.shape) < 0.3
    holes[:, 4] = False
    pool = np.where(holes, -1, pool)
  return pool


def _image_pooling(crops, grid_hw):
  """Crop 0 = the low-res view, 2x2 pooling over its grid; crops 1..crops-1 = high-res crops side by side
  (one gh x gw*(crops-1) grid), 2x2 pooling. Indices local to this image; grids (lh, lw, hh, hw)."""
  gh, gw = grid_hw
  p = gh * gw
  low, lh, lw = pool_windows(np.arange(p).reshape(gh, gw), 2, 2)
  r, c = np.meshgrid(np.arange(gh), np.arange(gw * (crops - 1)), indexing="ij")
  high, hh, hw = pool_windows((1 + c // gw) * p + r * gw + c % gw, 2, 2)
  return np.concatenate([low, high]).astype(np.int64), (lh, lw, hh, hw)


def _image_tokens(rng, grids):
  lh, lw, hh, hw = grids
  ids = [TOK.chat_end, TOK.low_res_image_start]
  ids += ([TOK.image_patch] * lw + [TOK.image_col]) * lh + [TOK.image_end, TOK.image_start]
  ids += ([TOK.image_patch] * hw + [TOK.image_col]) * hh + [TOK.image_end]
  return ids + [TOK.chat_start] + _text(rng, 6)


def make_inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
  """HF forward inputs (numpy) for `case`; left padding on row 0 when `left_pad`."""
  rng = np.random.default_rng(seed)
  rows, out = [], {}
  gh, gw = case.grid_hw
  p = gh * gw
  if case.media == "video":
    pools = []
    for b in range(case.batch):
      rows.append(_video_tokens(rng, case.frames, -(-gh // 3) * -(-gw // 3)))
      pools.append(_video_pooling(case.frames, b * case.frames * p, rng, case.pad_pool, case.grid_hw))
    out["pixel_values_videos"] = rng.uniform(-1, 1, (case.batch * case.frames, p, PATCH_DIM)).astype(np.float32)
    out["video_token_pooling"] = np.concatenate(pools)
    out["video_grids"] = np.asarray([[case.frames, -(-gh // 3), -(-gw // 3)]] * case.batch)
  elif case.media == "image":
    crops = [case.crops[b % len(case.crops)] for b in range(case.batch)]
    if not case.flat_pixels and len(set(crops)) > 1:
      raise ValueError(f"{case.name}: [images, crops, P, I] needs one crop count")
    pools, grids, offset = [], [], 0
    for n in crops:
      pool, grid = _image_pooling(n, case.grid_hw)
      pools.append(np.where(pool >= 0, pool + offset, -1))
      grids.append(grid)
      rows.append(_image_tokens(rng, grid))
      offset += n * p
    pixels = rng.uniform(-1, 1, (sum(crops), p, PATCH_DIM)).astype(np.float32)
    out["pixel_values"] = pixels if case.flat_pixels else pixels.reshape(case.batch, crops[0], p, PATCH_DIM)
    out["image_token_pooling"] = np.concatenate(pools)
    out["image_grids"] = np.asarray(grids)
    out["image_num_crops"] = np.asarray(crops)
  else:
    rows = [[TOK.chat_end] + _text(rng, 14) for _ in range(case.batch)]
  rows = [r + _text(rng, case.left_pad if b else 0) for b, r in enumerate(rows)]  # row 0 shorter
  width = max(len(r) for r in rows)
  ids = np.asarray([[TOK.pad] * (width - len(r)) + r for r in rows], np.int64)          # left padding
  mask = np.asarray([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
  out["input_ids"], out["attention_mask"] = ids, mask
  out["mm_token_type_ids"] = np.isin(ids, TOK.vision_type_ids).astype(np.int64)
  return out


def image_processor(**kwargs):
  """transformers' `Molmo2ImageProcessor` with its torchvision calls replaced (test only): bilinear
  `F.interpolate` (antialias off, as Molmo2 resizes), (x - mean) / std, and no grayscale/RGBA
  conversion (inputs are RGB). Tiling, crops, patchify and pooling indices are transformers' code."""
  from tests.data import hf
  ip = importlib.import_module("transformers.models.molmo2.image_processing_molmo2")

  class _ImageProcessor(ip.Molmo2ImageProcessor):
    resize = hf.torch_resize
    normalize = hf.torch_normalize

    def convert_to_rgb(self, image, input_data_format=None):
      assert image.shape[0] == 3, image.shape
      return image

  return _ImageProcessor(**kwargs)


# (height, width) of each image -> 3, 4 and 2 crops at 126 px crops, max_crops 4, overlap margins [1, 1].
PROCESSOR_IMAGES = (((100, 150), (250, 120)), ((60, 60),))


def processor_image_inputs(directory: str, seed: int = 0) -> dict[str, np.ndarray]:
  """transformers' Molmo2Processor (tiny tokenizer, tiny 126 px crops) on a batch of two prompts: row 0
  with two images, row 1 with one, each image a different crop count. Returns every array it emits
  (input_ids, attention_mask, mm_token_type_ids, pixel_values [total_crops, P, I],
  image_token_pooling, image_grids, image_num_crops)."""
  from stts_jax.data import default_dataset
  from tests.data import hf
  path = os.path.join(directory, "tokenizer.json")
  default_dataset.build_tokenizer(TOK).save(path)
  proc = hf.processor(path)
  proc.image_processor = image_processor(size={"height": 126, "width": 126}, max_crops=4, overlap_margins=[1, 1])
  rng = np.random.default_rng(seed)
  images = [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in row] for row in PROCESSOR_IMAGES]
  text = ["<|image|>" * len(row) + "what is it" for row in PROCESSOR_IMAGES]
  out = proc(text=text, images=images, return_tensors="np", padding=True)
  return {k: np.asarray(v) for k, v in out.items()}


def hf_logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
  return out.logits.float().numpy()


def valid_positions(inputs) -> np.ndarray:
  return np.asarray(inputs["attention_mask"]) != 0
