"""Test helper: tiny random transformers Molmo2 models and HF-style inputs built by hand.

No HF processor (it needs torchvision): pixel arrays are random in [-1, 1], pooling indices follow the
processor's layout (global indices, row-major windows, -1 padding), token layouts follow the prompt
format (timestamps, frame markers, `<im_patch>` runs, ChatML text).
"""

import dataclasses
from typing import Optional

import numpy as np
import torch

from stts_jax.testing import tiny

V = tiny.TINY_VOCAB
TOK = tiny.tiny_model_config().tokens
GRID = 9            # 126 px / 14 px
P = GRID * GRID
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
  return Molmo2Config(
      vision_config=dict(hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
                         num_hidden_layers=vit.num_layers, num_attention_heads=vit.num_heads,
                         num_key_value_heads=vit.num_heads, head_dim=vit.head_dim,
                         image_size=[vit.image_size, vit.image_size], patch_size=vit.patch_size),
      adapter_config=dict(vision_feature_layer=list(ad.vit_layers), hidden_size=vit.hidden_size,
                          num_attention_heads=ad.num_heads, num_key_value_heads=ad.num_heads,
                          head_dim=ad.head_dim, intermediate_size=ad.intermediate_size,
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


def _video_tokens(rng, frames):
  ids = [TOK.chat_end]
  for t in range(frames):
    ids += _text(rng, 2) + [TOK.frame_start] + [TOK.image_patch] * 9 + [TOK.frame_end]
  return ids + [TOK.chat_start] + _text(rng, 5) + [TOK.chat_end, TOK.chat_start] + _text(rng, 2)


def _video_pooling(frames, offset, rng, pad):
  rows = []
  for t in range(frames):
    for wr in range(3):
      for wc in range(3):
        rows.append([offset + t * P + (3 * wr + dy) * GRID + 3 * wc + dx for dy in range(3) for dx in range(3)])
  pool = np.asarray(rows, np.int64)
  if pad:  # knock out some slots (never a whole row), as the processor does at image borders
    holes = rng.random(pool.shape) < 0.3
    holes[:, 4] = False
    pool = np.where(holes, -1, pool)
  return pool


def _image_pooling(crops):
  """Low-res view (crop 0): 9x9 padded to 10x10, 2x2 pooling -> 5x5 = 25 tokens, pad 0 before / 1 after;
  high-res: crops 1..crops-1 side by side as a 9 x 9*(crops-1) grid, padded to 10 x ..., 2x2 pooling."""
  def pool_grid(h, w, index):
    ph, pw = -(-h // 2) * 2, -(-w // 2) * 2
    rows = []
    for r in range(0, ph, 2):
      for c in range(0, pw, 2):
        rows.append([index(r + dy, c + dx) if r + dy < h and c + dx < w else -1 for dy in range(2) for dx in range(2)])
    return rows, ph // 2, pw // 2
  low, lh, lw = pool_grid(GRID, GRID, lambda r, c: r * GRID + c)
  hw = GRID * (crops - 1)
  high, hh, hw2 = pool_grid(GRID, hw, lambda r, c: (1 + c // GRID) * P + r * GRID + c % GRID)
  return np.asarray(low + high, np.int64), (lh, lw, hh, hw2)


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
  if case.media == "video":
    pools = []
    for b in range(case.batch):
      rows.append(_video_tokens(rng, case.frames))
      pools.append(_video_pooling(case.frames, b * case.frames * P, rng, case.pad_pool))
    out["pixel_values_videos"] = rng.uniform(-1, 1, (case.batch * case.frames, P, PATCH_DIM)).astype(np.float32)
    out["video_token_pooling"] = np.concatenate(pools)
    out["video_grids"] = np.asarray([[case.frames, 3, 3]] * case.batch)
  elif case.media == "image":
    crops = 3
    pool, grids = _image_pooling(crops)
    rows = [_image_tokens(rng, grids) for _ in range(case.batch)]
    out["pixel_values"] = rng.uniform(-1, 1, (case.batch, crops, P, PATCH_DIM)).astype(np.float32)
    out["image_token_pooling"] = np.concatenate([pool + b * crops * P for b in range(case.batch)])
    out["image_grids"] = np.asarray([grids] * case.batch)
    out["image_num_crops"] = np.asarray([crops] * case.batch)
  else:
    rows = [[TOK.chat_end] + _text(rng, 14) for _ in range(case.batch)]
  rows = [r + _text(rng, case.left_pad if b else 0) for b, r in enumerate(rows)]  # row 0 shorter
  width = max(len(r) for r in rows)
  ids = np.asarray([[TOK.pad] * (width - len(r)) + r for r in rows], np.int64)          # left padding
  mask = np.asarray([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
  out["input_ids"], out["attention_mask"] = ids, mask
  out["mm_token_type_ids"] = np.isin(ids, TOK.vision_type_ids).astype(np.int64)
  return out


def hf_logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
  return out.logits.float().numpy()


def valid_positions(inputs) -> np.ndarray:
  return np.asarray(inputs["attention_mask"]) != 0
