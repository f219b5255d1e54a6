"""Test helper: tiny random HF Molmo2 vision tower / adapter and a local torch -> NNX weight copy.

Only for parity tests (needs torch + transformers). The real importer lives in `stts_jax/weights/`;
this mapping is deliberately small and local so tests do not depend on it.

HF key (relative to `vision_tower.` / `multi_modal_projector.`) -> NNX attribute path:
  positional_embedding                  -> positional_embedding                 (as is)
  patch_embedding.{weight,bias}         -> patch_embedding.{kernel (T), bias}
  layers.{i}.layer_norm{1,2}.{weight,bias} -> blocks[i].layer_norm{1,2}.{scale,bias}
  layers.{i}.self_attn.{q,k,v,o}_proj.* -> blocks[i].self_attn.{q,k,v,o}_proj.{kernel (T), bias}
  layers.{i}.mlp.fc{1,2}.*              -> blocks[i].mlp.fc{1,2}.{kernel (T), bias}
  image_pooling_2d.*, image_projector.* -> same names, kernel (T) / bias
(T) = transposed torch Linear weight. With scan_layers the per-layer arrays are stacked on axis 0.
"""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from stts_jax import config as config_lib


def hf_vision_config(vit: config_lib.ViTConfig, num_layers: int):
  from transformers.models.molmo2.configuration_molmo2 import Molmo2VisionConfig
  return Molmo2VisionConfig(
      hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size, num_hidden_layers=num_layers,
      num_attention_heads=vit.num_heads, num_key_value_heads=vit.num_heads, head_dim=vit.head_dim,
      layer_norm_eps=vit.layer_norm_eps, image_size=[vit.image_size, vit.image_size], patch_size=vit.patch_size,
      attn_implementation="eager")


def hf_adapter_config(adapter: config_lib.AdapterConfig, vit_hidden: int, text_hidden: int):
  from transformers.models.molmo2.configuration_molmo2 import Molmo2AdapterConfig
  return Molmo2AdapterConfig(
      vision_feature_layer=list(adapter.vit_layers), hidden_size=vit_hidden, num_attention_heads=adapter.num_heads,
      num_key_value_heads=adapter.num_heads, head_dim=adapter.head_dim, intermediate_size=adapter.intermediate_size,
      text_hidden_size=text_hidden, attn_implementation="eager")


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
  """Gives every parameter random values (HF init leaves biases at 0 and norms at 1)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.normal_(0.0, std)
      if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight"):
        p.add_(1.0)
  return module.eval()


def tiny_hf_vision(vit: config_lib.ViTConfig, num_layers: int, seed: int = 0):
  from transformers.models.molmo2.modeling_molmo2 import Molmo2VisionModel
  return randomize_(Molmo2VisionModel(hf_vision_config(vit, num_layers)), seed)


def tiny_hf_adapter(adapter: config_lib.AdapterConfig, vit_hidden: int, text_hidden: int, seed: int = 1):
  from transformers.models.molmo2.modeling_molmo2 import Molmo2Adapter
  return randomize_(Molmo2Adapter(hf_adapter_config(adapter, vit_hidden, text_hidden)), seed, std=0.15)


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().float().numpy()


def _set(var: nnx.Variable, value: np.ndarray) -> None:
  if tuple(var.shape) != value.shape:
    raise ValueError(f"shape mismatch: nnx {tuple(var.shape)} vs torch {value.shape}")
  var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))


def _copy_linear(dst, sd: dict, prefix: str, stack: list[str] | None = None) -> None:
  """Linear weight (out, in) -> kernel (in, out); `stack` = per-layer prefixes stacked on axis 0."""
  prefixes = stack if stack is not None else [prefix]
  kernel = np.stack([_np(sd[p + ".weight"]).T for p in prefixes])
  _set(dst.kernel, kernel if stack is not None else kernel[0])
  if dst.bias is not None:
    bias = np.stack([_np(sd[p + ".bias"]) for p in prefixes])
    _set(dst.bias, bias if stack is not None else bias[0])


def _copy_norm(dst, sd: dict, prefixes: list[str], stacked: bool) -> None:
  scale = np.stack([_np(sd[p + ".weight"]) for p in prefixes])
  bias = np.stack([_np(sd[p + ".bias"]) for p in prefixes])
  _set(dst.scale, scale if stacked else scale[0])
  _set(dst.bias, bias if stacked else bias[0])


def _copy_block(dst, sd: dict, prefixes: list[str], stacked: bool) -> None:
  stack = (lambda name: [f"{p}.{name}" for p in prefixes]) if stacked else (lambda name: None)
  one = (lambda name: f"{prefixes[0]}.{name}")
  _copy_norm(dst.layer_norm1, sd, [f"{p}.layer_norm1" for p in prefixes], stacked)
  _copy_norm(dst.layer_norm2, sd, [f"{p}.layer_norm2" for p in prefixes], stacked)
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    _copy_linear(getattr(dst.self_attn, proj), sd, one(f"self_attn.{proj}"), stack(f"self_attn.{proj}"))
  for fc in ("fc1", "fc2"):
    _copy_linear(getattr(dst.mlp, fc), sd, one(f"mlp.{fc}"), stack(f"mlp.{fc}"))


def load_vit_from_torch(vit, hf_vision: torch.nn.Module) -> None:
  """Copies a `Molmo2VisionModel`'s weights into a `VisionTransformer` (first vit.num_layers blocks)."""
  sd = dict(hf_vision.state_dict())
  _set(vit.positional_embedding, _np(sd["positional_embedding"]))
  _copy_linear(vit.patch_embedding, sd, "patch_embedding")
  prefixes = [f"layers.{i}" for i in range(vit.num_layers)]
  if vit.scan_layers:
    _copy_block(vit.blocks, sd, prefixes, stacked=True)
  else:
    for block, prefix in zip(vit.blocks, prefixes):
      _copy_block(block, sd, [prefix], stacked=False)


def load_adapter_from_torch(adapter, hf_adapter: torch.nn.Module) -> None:
  """Copies a `Molmo2Adapter`'s weights into an `Adapter`."""
  sd = dict(hf_adapter.state_dict())
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    _copy_linear(getattr(adapter.image_pooling_2d, proj), sd, f"image_pooling_2d.{proj}")
  for proj in ("gate_proj", "up_proj", "down_proj"):
    _copy_linear(getattr(adapter.image_projector, proj), sd, f"image_projector.{proj}")
