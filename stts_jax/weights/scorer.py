"""The authors' STTS scorer weights <-> `WindowScorer` (issue 12).

Checkpoint layout, under `vision_backbone.image_vit.transformer.temporal_token_scorer.` (hub-style
checkpoints add a leading `model.`; keys are matched by suffix, both work). PyTorch Linear weights
are [out, in]; our kernels are [in, out], so the value transform is a transpose (biases as is).

  suffix                          shape          ours
  patch_token_pooler.wq.weight    [D, D]         q_proj.kernel (transposed)   + .bias
  patch_token_pooler.wk.weight    [D, D]         k_proj.kernel                + .bias
  patch_token_pooler.wv.weight    [D, D]         v_proj.kernel                + .bias
  patch_token_pooler.wo.weight    [D, D]         o_proj.kernel                + .bias
  mlp.w1.weight                   [F, 2D]        fc1.kernel  (input [previous window, this window])
  mlp.w2.weight                   [F, F]         fc2.kernel
  mlp.w3.weight                   [1, F]         fc3.kernel
Head h of the pooler uses output rows h*H:(h+1)*H of wq/wk/wv and input columns of wo; the number
of heads is not recoverable from shapes, hence the `num_heads` argument (16 for released models).

STTS settings of an authors' checkpoint (`stts_config_from_hf`): their ViT config section
(`vit_config` / `vision_config`) carries `prune` (bool), `prune_method` (scorer | random |
heuristic | easy), `topk` (the pruned fraction) and `prune_at`; the pooler has the ViT's head
count (`image_num_heads` / `num_attention_heads`) and the MLP width is read from `mlp.w1.weight`. A checkpoint with scorer tensors
but without those keys gets `method="stts"` with the paper defaults.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax.config import STTSConfig
from stts_jax.models.scorer import WindowScorer

SCORER_PREFIX = "vision_backbone.image_vit.transformer.temporal_token_scorer."
HUB_SCORER_PREFIX = "model." + SCORER_PREFIX

# torch suffix -> our submodule name
_LINEARS = {
    "patch_token_pooler.wq": "q_proj",
    "patch_token_pooler.wk": "k_proj",
    "patch_token_pooler.wv": "v_proj",
    "patch_token_pooler.wo": "o_proj",
    "mlp.w1": "fc1",
    "mlp.w2": "fc2",
    "mlp.w3": "fc3",
}
SUFFIXES = tuple(f"{t}.{kind}" for t in _LINEARS for kind in ("weight", "bias"))


def split_scorer_tensors(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Scorer tensors of a checkpoint by suffix (either prefix, or already bare suffixes)."""
  out: dict[str, np.ndarray] = {}
  marker = "temporal_token_scorer."
  for name, value in state_dict.items():
    suffix = name.split(marker, 1)[1] if marker in name else name
    if suffix in SUFFIXES:
      if suffix in out:
        raise ValueError(f"scorer tensor {suffix!r} appears twice in the checkpoint")
      out[suffix] = np.asarray(value)
  return out


def has_scorer(state_dict: Mapping[str, Any]) -> bool:
  """Whether any checkpoint name belongs to the scorer (values are not looked at)."""
  return any("temporal_token_scorer." in k for k in state_dict)


_AUTHOR_METHODS = {"scorer": "stts", "random": "random", "heuristic": "heuristic", "easy": "heuristic"}


def stts_config_from_hf(hf: Mapping[str, Any], has_scorer_tensors: bool,
                        base: Optional[STTSConfig] = None,
                        scorer_hidden: Optional[int] = None) -> Optional[STTSConfig]:
  """STTS settings implied by an authors'-layout `config.json` (see module docstring); None if none.

  `base` supplies the fields the checkpoint does not set (default `STTSConfig()`); `scorer_hidden`
  (the MLP width read from the checkpoint's `mlp.w1.weight`) overrides the base's."""
  base = base or STTSConfig()
  vision = hf.get("vit_config") or hf.get("vision_config") or {}
  keys = {k: vision[k] for k in ("prune", "prune_method", "topk", "prune_at") if vision.get(k) is not None}
  if not keys and not has_scorer_tensors:
    return None
  updates: dict[str, Any] = {}
  if keys.get("prune") is False:
    updates["method"] = "none"
  elif "prune_method" in keys:
    if keys["prune_method"] not in _AUTHOR_METHODS:
      raise ValueError(f"config.json: unknown prune_method {keys['prune_method']!r}; "
                       f"known: {sorted(_AUTHOR_METHODS)}")
    updates["method"] = _AUTHOR_METHODS[keys["prune_method"]]
  elif has_scorer_tensors:
    updates["method"] = "stts"
  if "topk" in keys:
    updates["ratio"] = float(keys["topk"])
  if "prune_at" in keys:
    updates["prune_at"] = int(keys["prune_at"])
  if scorer_hidden is not None:
    updates["scorer_hidden"] = int(scorer_hidden)
  heads = vision.get("image_num_heads", vision.get("num_attention_heads"))
  if heads is not None:                  # the authors' pooler uses the ViT's head count
    updates["scorer_heads"] = int(heads)
  out = dataclasses.replace(base, **updates)
  out.validate()
  return out


def checkpoint_stts_config(hf: Mapping[str, Any], loaders: Mapping[str, Any],
                           base: Optional[STTSConfig] = None) -> Optional[STTSConfig]:
  """`stts_config_from_hf` for a checkpoint given as {name: zero-argument loader}.

  Only a complete set of scorer tensors counts as a scorer (a partial set is left to the caller,
  which keeps it aside); its MLP width is read from `mlp.w1.weight`."""
  suffixes = {k.split("temporal_token_scorer.", 1)[1] for k in loaders if "temporal_token_scorer." in k}
  complete = set(SUFFIXES) <= suffixes
  w1 = [k for k in loaders if k.endswith("temporal_token_scorer.mlp.w1.weight")]
  hidden = int(np.shape(loaders[w1[0]]())[0]) if complete else None
  return stts_config_from_hf(hf, complete, base, scorer_hidden=hidden)


def scorer_from_torch(state_dict: Mapping[str, np.ndarray], num_heads: int, *,
                      cfg: Optional[STTSConfig] = None, dtype=jnp.float32,
                      param_dtype=jnp.float32) -> WindowScorer:
  """Builds a `WindowScorer` from the authors' tensors (numpy arrays, names with either prefix).

  Sizes come from the shapes; `cfg` (optional) supplies the other STTS settings."""
  tensors = split_scorer_tensors(state_dict)
  missing = sorted(set(SUFFIXES) - set(tensors))
  if missing:
    raise KeyError(f"scorer weights incomplete, missing {missing}")
  d = tensors["patch_token_pooler.wq.weight"].shape[1]
  f = tensors["mlp.w1.weight"].shape[0]
  expect = {"patch_token_pooler.wq.weight": (d, d), "patch_token_pooler.wk.weight": (d, d),
            "patch_token_pooler.wv.weight": (d, d), "patch_token_pooler.wo.weight": (d, d),
            "mlp.w1.weight": (f, 2 * d), "mlp.w2.weight": (f, f), "mlp.w3.weight": (1, f)}
  for name, shape in expect.items():
    if tensors[name].shape != shape:
      raise ValueError(f"scorer tensor {name} has shape {tensors[name].shape}, expected {shape}")
    bias = name[:-len("weight")] + "bias"
    if tensors[bias].shape != (shape[0],):
      raise ValueError(f"scorer tensor {bias} has shape {tensors[bias].shape}, expected {(shape[0],)}")
  cfg = dataclasses.replace(cfg or STTSConfig(method="stts"), scorer_hidden=f, scorer_heads=num_heads)
  scorer = nnx.eval_shape(lambda: WindowScorer(d, cfg, dtype=dtype, param_dtype=param_dtype,
                                               rngs=nnx.Rngs(0)))
  for torch_name, ours in _LINEARS.items():
    linear = getattr(scorer, ours)
    kernel = np.ascontiguousarray(tensors[f"{torch_name}.weight"].T)
    linear.kernel.set_value(jnp.asarray(kernel, dtype=param_dtype))
    linear.bias.set_value(jnp.asarray(tensors[f"{torch_name}.bias"], dtype=param_dtype))
  return scorer


def scorer_to_torch(scorer: WindowScorer, prefix: str = SCORER_PREFIX) -> dict[str, np.ndarray]:
  """Inverse of `scorer_from_torch`: the authors' names (with `prefix`) -> numpy arrays [out, in]."""
  out = {}
  for torch_name, ours in _LINEARS.items():
    linear = getattr(scorer, ours)
    out[f"{prefix}{torch_name}.weight"] = np.ascontiguousarray(np.asarray(linear.kernel.get_value()).T)
    out[f"{prefix}{torch_name}.bias"] = np.asarray(linear.bias.get_value())
  return out
