"""Molmo2 HF checkpoint <-> `stts_jax.models.vlm.Molmo2`: pure name mapping plus value transforms.

Three name spaces:
  hub       what `save_pretrained` and the released checkpoints store: `model.transformer.*`
            (fused `att_proj` = [q; k; v] rows, fused `ff_proj` = [up; gate] rows, `wte.embedding` +
            `wte.new_embedding`), `model.vision_backbone.image_vit.*`, `...image_pooling_2d.w{q,k,v,o}`,
            `...image_projector.w1 (gate) / w3 (up) / w2 (down)`, `lm_head.weight`;
  internal  transformers' module names (`model.language_model.*`, `model.vision_tower.*`,
            `model.multi_modal_projector.*`, `lm_head.*`), one tensor per module, torch layout;
  canonical our parameter paths with per-layer indices (`llm.layers.3.self_attn.q_proj.kernel`);
            stacked (scanned) layers are split/stacked on axis 0 when reading/writing the model.
Value transforms: torch Linear `[out, in]` <-> our kernel `[in, out]` (transpose); norms `weight` <->
`scale`; embeddings and `positional_embedding` as they are. Loading accepts hub and internal names.

Tensors whose name contains `temporal_token_scorer.` belong to the STTS scorer. When the model has a
scorer (`model.scorer` is not None) and `stts_jax.weights.scorer` exists, they are converted by its
`scorer_from_torch(tensors, num_heads, cfg=, dtype=, param_dtype=)`; otherwise they are kept aside
(`LoadReport.scorer_tensors`). Scorer parameters the checkpoint lacks get a fresh initialisation (the
released Molmo2 checkpoints have no scorer). Export writes the scorer through `scorer_to_torch`
under the hub prefix `model.vision_backbone.image_vit.transformer.temporal_token_scorer.`.
"""

import dataclasses
import importlib
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.models import vlm
from stts_jax.weights import hf_config
from stts_jax.weights import safetensors_io

log = logging.getLogger(__name__)

SCORER_MARKER = "temporal_token_scorer."
HUB_SCORER_PREFIX = "model.vision_backbone.image_vit.transformer." + SCORER_MARKER
_RES = "model.vision_backbone.image_vit.transformer.resblocks.{i}."
_VT = "model.vision_tower.layers.{i}."
_LM = "model.language_model.layers.{i}."
_TB = "model.transformer.blocks.{i}."
_PP = "model.multi_modal_projector.image_projector."
# (hub template, internal template). {i}: layer index, {n}: projection letter, {s}: weight | bias.
_RENAMES = (
    ("model.transformer.ln_f.weight", "model.language_model.norm.weight"),
    (_TB + "attn_norm.weight", _LM + "input_layernorm.weight"),
    (_TB + "ff_norm.weight", _LM + "post_attention_layernorm.weight"),
    (_TB + "self_attn.attn_out.weight", _LM + "self_attn.o_proj.weight"),
    (_TB + "self_attn.{n}_norm.weight", _LM + "self_attn.{n}_norm.weight"),
    (_TB + "mlp.ff_out.weight", _LM + "mlp.down_proj.weight"),
    ("model.vision_backbone.image_vit.positional_embedding", "model.vision_tower.positional_embedding"),
    ("model.vision_backbone.image_vit.patch_embedding.{s}", "model.vision_tower.patch_embedding.{s}"),
    (_RES + "attention.w{n}.{s}", _VT + "self_attn.{n}_proj.{s}"),
    (_RES + "attention_norm.{s}", _VT + "layer_norm1.{s}"),
    (_RES + "ffn_norm.{s}", _VT + "layer_norm2.{s}"),
    (_RES + "feed_forward.w1.{s}", _VT + "mlp.fc1.{s}"),
    (_RES + "feed_forward.w2.{s}", _VT + "mlp.fc2.{s}"),
    ("model.vision_backbone.image_pooling_2d.w{n}.{s}", "model.multi_modal_projector.image_pooling_2d.{n}_proj.{s}"),
    ("model.vision_backbone.image_projector.w1.weight", _PP + "gate_proj.weight"),
    ("model.vision_backbone.image_projector.w2.weight", _PP + "down_proj.weight"),
    ("model.vision_backbone.image_projector.w3.weight", _PP + "up_proj.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
_ATT_PROJ = _TB + "self_attn.att_proj.{s}"
_FF_PROJ = _TB + "mlp.ff_proj.weight"
_WTE = ("model.transformer.wte.embedding", "model.transformer.wte.new_embedding")
_EMBED = "model.language_model.embed_tokens.weight"
# (internal prefix, canonical prefix), most specific first.
_PREFIXES = (
    ("model.vision_tower.layers.{i}.", "vit.blocks.{i}."),
    ("model.vision_tower.", "vit."),
    ("model.multi_modal_projector.", "adapter."),
    ("lm_head.", "llm.lm_head."),
    ("model.language_model.", "llm."),
)
_INTERNAL_ROOTS = tuple(p for p, _ in _PREFIXES)
_STACKS = (("vit", "blocks"), ("llm", "layers"))
_GROUPS = {"i": r"(?P<i>\d+)", "n": r"(?P<n>[qkvo])", "s": r"(?P<s>weight|bias)", "rest": r"(?P<rest>.+)"}
Loader = Callable[[], np.ndarray]


def _pattern(template: str) -> re.Pattern:
  regex = re.escape(template)
  for key, group in _GROUPS.items():
    regex = regex.replace(re.escape("{" + key + "}"), group)
  return re.compile(regex)


def _match(template: str, name: str) -> Optional[dict]:
  m = _pattern(template).fullmatch(name)
  return None if m is None else m.groupdict()


# ----------------------------------------------------------------------------------------------
# hub <-> internal
# ----------------------------------------------------------------------------------------------
def hub_to_internal(loaders: dict[str, Loader], llm: config_lib.LLMConfig
                    ) -> tuple[dict[str, Loader], dict[str, Loader], list[str]]:
  """-> (internal-name loaders, scorer-tensor loaders, unrecognised names). Internal names pass through."""
  out: dict[str, Loader] = {}
  scorer: dict[str, Loader] = {}
  unknown: list[str] = []
  q_rows, kv_rows = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
  qkv_bounds = (("q", 0, q_rows), ("k", q_rows, q_rows + kv_rows), ("v", q_rows + kv_rows, q_rows + 2 * kv_rows))
  f_rows = llm.intermediate_size
  for name, load in loaders.items():
    if SCORER_MARKER in name:
      scorer[name] = load
    elif name in _WTE:
      continue
    elif (g := _match(_ATT_PROJ, name)) is not None:
      for proj, lo, hi in qkv_bounds:
        out[_LM.format(**g) + f"self_attn.{proj}_proj.{g['s']}"] = _rows(load, name, lo, hi, q_rows + 2 * kv_rows)
    elif (g := _match(_FF_PROJ, name)) is not None:
      out[_LM.format(**g) + "mlp.up_proj.weight"] = _rows(load, name, 0, f_rows, 2 * f_rows)
      out[_LM.format(**g) + "mlp.gate_proj.weight"] = _rows(load, name, f_rows, 2 * f_rows, 2 * f_rows)
    elif (hit := _rename(name, from_hub=True)) is not None:
      out[hit] = load
    elif name.startswith(_INTERNAL_ROOTS):
      out[name] = load
    else:
      unknown.append(name)
  if _WTE[0] in loaders:
    parts = [loaders[n] for n in _WTE if n in loaders]
    out[_EMBED] = lambda: np.concatenate([p() for p in parts], axis=0)
  return out, scorer, unknown


def _rows(load: Loader, name: str, lo: int, hi: int, total: int) -> Loader:
  """Loader of rows [lo, hi) of a fused tensor that must have exactly `total` rows."""
  def rows():
    value = load()
    if value.shape[0] != total:
      raise ValueError(f"{name}: {value.shape[0]} rows, the config implies {total}")
    return value[lo:hi]
  return rows


def _rename(name: str, *, from_hub: bool) -> Optional[str]:
  for hub, internal in _RENAMES:
    src, dst = (hub, internal) if from_hub else (internal, hub)
    if (g := _match(src, name)) is not None:
      return dst.format(**g)
  return None


def internal_to_hub(tensors: dict[str, np.ndarray], llm: config_lib.LLMConfig) -> dict[str, np.ndarray]:
  """Inverse of `hub_to_internal`: fuses att_proj = [q; k; v] and ff_proj = [up; gate], splits the
  embedding into `wte.embedding` (vocab_size rows) and `wte.new_embedding` (the additional rows)."""
  out: dict[str, np.ndarray] = {}
  for name, value in tensors.items():
    if name == _EMBED:
      out[_WTE[0]], out[_WTE[1]] = value[:llm.vocab_size], value[llm.vocab_size:]
    elif (g := _match(_LM + "self_attn.{n}_proj.{s}", name)) is not None and g["n"] != "o":
      if g["n"] == "q":
        parts = [tensors[_LM.format(**g) + f"self_attn.{p}_proj.{g['s']}"] for p in "qkv"]
        out[_ATT_PROJ.format(**g)] = np.concatenate(parts, axis=0)
    elif (g := _match(_LM + "mlp.up_proj.weight", name)) is not None:
      out[_FF_PROJ.format(**g)] = np.concatenate([value, tensors[_LM.format(**g) + "mlp.gate_proj.weight"]], axis=0)
    elif _match(_LM + "mlp.gate_proj.weight", name) is not None:
      continue
    elif (hit := _rename(name, from_hub=False)) is not None:
      out[hit] = value
    else:
      raise ValueError(f"no checkpoint name for tensor {name!r}")
  return out


# ----------------------------------------------------------------------------------------------
# internal <-> canonical (our parameter paths)
# ----------------------------------------------------------------------------------------------
def canonical_to_internal(name: str) -> tuple[str, bool]:
  """Our parameter path -> (internal name, transpose?). Kernels are transposed; `scale`/`embedding`
  leaves are torch `weight`s."""
  for internal_prefix, prefix in _PREFIXES:
    if (g := _match(prefix + "{rest}", name)) is not None:
      base, _, leaf = g["rest"].rpartition(".")
      torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
      return internal_prefix.format(**g) + (base + "." if base else "") + torch_leaf, leaf == "kernel"
  raise ValueError(f"parameter {name!r} has no checkpoint name")


def model_leaves(state: nnx.State) -> list[tuple[tuple, nnx.Variable, list[str], bool]]:
  """(path, variable, canonical names, stacked) per parameter; a stacked (scanned) parameter has one
  name per layer along axis 0."""
  leaves = []
  for path, var in nnx.to_flat_state(state):
    head = tuple(path[:2])
    if head in _STACKS and not isinstance(path[2], int):
      rest = ".".join(map(str, path[2:]))
      names = [f"{head[0]}.{head[1]}.{i}.{rest}" for i in range(var.get_value().shape[0])]
      leaves.append((path, var, names, True))
    else:
      leaves.append((path, var, [".".join(map(str, path))], False))
  return leaves


def _scorer_module():
  try:
    return importlib.import_module("stts_jax.weights.scorer")
  except ModuleNotFoundError as e:
    if e.name != "stts_jax.weights.scorer":
      raise
    return None


def _import_scorer(cfg: config_lib.ModelConfig, loaders: dict[str, Loader]) -> dict[str, np.ndarray]:
  """Scorer checkpoint tensors -> {canonical name: array}; {} when no scorer importer exists."""
  module = _scorer_module()
  if module is None:
    return {}
  dtype = jnp.dtype(cfg.param_dtype)
  scorer = module.scorer_from_torch({k: f() for k, f in loaders.items()}, cfg.stts.scorer_heads, cfg=cfg.stts,
                                    dtype=jnp.dtype(cfg.dtype), param_dtype=dtype)
  return {"scorer." + ".".join(map(str, path)): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(nnx.state(scorer, nnx.Param))}


# ----------------------------------------------------------------------------------------------
# load / save
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadReport:
  """What `build_from_tensors` did besides loading: checkpoint tensors it skipped (ViT blocks beyond
  the deepest adapter tap), scorer tensors kept aside (no importer), parameters freshly initialised."""
  ignored: list[str]
  scorer_tensors: dict[str, Loader]
  fresh: list[str]


def _fresh_values(cfg: config_lib.ModelConfig, paths: list[tuple], seed: int) -> dict[tuple, jax.Array]:
  """Initialises only `paths` of a new model (jit drops the rest of the initialisation)."""
  keys = ["/".join(map(str, p)) for p in paths]

  def init():
    flat = dict(nnx.to_flat_state(nnx.state(vlm.Molmo2(cfg, rngs=nnx.Rngs(seed)), nnx.Param)))
    return {k: flat[p].get_value() for k, p in zip(keys, paths)}

  values = jax.jit(init)()
  return {p: values[k] for k, p in zip(keys, paths)}


def build_from_tensors(cfg: config_lib.ModelConfig, loaders: dict[str, Loader], *, seed: int = 0
                       ) -> tuple[vlm.Molmo2, LoadReport]:
  """Builds `Molmo2(cfg)` with every parameter taken from `loaders` (hub or internal names).

  Raises ValueError listing missing parameters, unexpected tensors and shape mismatches.
  """
  abstract = nnx.eval_shape(lambda: vlm.Molmo2(cfg, rngs=nnx.Rngs(seed)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if nnx.to_flat_state(rest):
    raise ValueError(f"Molmo2 has non-parameter state the loader cannot fill: {list(nnx.to_flat_state(rest))}")
  internal, scorer_loaders, unknown = hub_to_internal(loaders, cfg.llm)
  scorer_values = _import_scorer(cfg, scorer_loaders) if abstract.scorer is not None and scorer_loaders else {}
  if scorer_loaders and not scorer_values:
    log.warning("%d scorer tensors kept aside (model without scorer or no scorer importer)", len(scorer_loaders))
  used, missing, bad_shapes, fresh_paths, new_flat = set(), [], [], [], []

  def lookup(name):
    if name.startswith("scorer."):
      if name not in scorer_values:
        missing.append(name)
      used.add(name)
      return scorer_values.get(name)
    internal_name, transpose = canonical_to_internal(name)
    if internal_name not in internal:
      missing.append(internal_name)
      return None
    used.add(internal_name)
    value = internal[internal_name]()
    return value.T if transpose else value

  for path, var, names, stacked in model_leaves(params):
    if path[0] == "scorer" and not scorer_values:
      fresh_paths.append(path)          # no scorer in the checkpoint: fresh initialisation
      continue
    values = [lookup(name) for name in names]
    if any(v is None for v in values):
      continue
    value = np.stack(values) if stacked else values[0]
    expected = var.get_value().shape
    if tuple(value.shape) != tuple(expected):
      bad_shapes.append(f"{'.'.join(map(str, path))}: checkpoint {tuple(value.shape)} vs model {tuple(expected)}")
      continue
    new_flat.append((path, var.replace(jnp.asarray(value, dtype=var.get_value().dtype))))
  built_vit = max(cfg.adapter.vit_layers) + 1
  ignored, unexpected = [], list(unknown) + sorted(set(scorer_values) - used)
  for name in sorted(set(internal) - used):
    m = re.match(r"model\.vision_tower\.layers\.(\d+)\.", name)
    (ignored if m and int(m.group(1)) >= built_vit else unexpected).append(name)
  problems = []
  if missing:
    problems.append(f"missing from the checkpoint: {sorted(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {sorted(unexpected)}")
  if bad_shapes:
    problems.append(f"shape mismatches: {bad_shapes}")
  if problems:
    raise ValueError("Molmo2 checkpoint does not match the config:\n  " + "\n  ".join(problems))
  if ignored:
    log.info("ignored %d tensors of ViT blocks >= %d (never run): %s", len(ignored), built_vit, ignored[:4])
  if fresh_paths:
    log.warning("freshly initialised %d scorer parameters (not in the checkpoint)", len(fresh_paths))
    fresh, abstract_vars = _fresh_values(cfg, fresh_paths, seed), dict(nnx.to_flat_state(params))
    new_flat += [(p, abstract_vars[p].replace(fresh[p])) for p in fresh_paths]
  model = nnx.merge(graphdef, nnx.from_flat_state(new_flat))
  report = LoadReport(ignored=ignored, scorer_tensors={} if scorer_values else scorer_loaders,
                      fresh=[".".join(map(str, p)) for p in fresh_paths])
  return model, report


def load_molmo2_with_report(checkpoint_dir: str, dtype=jnp.float32, **config_updates
                            ) -> tuple[vlm.Molmo2, LoadReport]:
  """`load_molmo2` that also returns the `LoadReport`."""
  with open(os.path.join(checkpoint_dir, "config.json")) as f:
    hf = json.load(f)
  cfg = hf_config.from_hf_config(hf, dtype=jnp.dtype(dtype).name)
  loaders = safetensors_io.open_checkpoint(checkpoint_dir)
  module = _scorer_module()
  if module is not None and "stts" not in config_updates and hf_config.STTS_KEY not in hf:
    # STTS (issue 12): an authors' checkpoint brings its scorer and STTS settings.
    stts = module.checkpoint_stts_config(hf, loaders, cfg.stts)
    if stts is not None:
      cfg = dataclasses.replace(cfg, stts=stts).validate()
  if config_updates:
    cfg = dataclasses.replace(cfg, **config_updates).validate()
  return build_from_tensors(cfg, loaders)


def load_molmo2(checkpoint_dir: str, dtype=jnp.float32, **config_updates) -> vlm.Molmo2:
  """Local Molmo2 checkpoint directory (config.json + safetensors, sharded or not) -> `Molmo2`.

  dtype: compute and parameter dtype (float32 or bfloat16). config_updates: top-level `ModelConfig`
  fields to replace before building (e.g. `stts=STTSConfig(method="stts")`, `scan_layers=False`).
  """
  return load_molmo2_with_report(checkpoint_dir, dtype, **config_updates)[0]


def export_tensors(model: vlm.Molmo2) -> dict[str, np.ndarray]:
  """All parameters under hub checkpoint names (torch layouts), the inverse of `build_from_tensors`."""
  internal: dict[str, np.ndarray] = {}
  for path, var, names, stacked in model_leaves(nnx.state(model, nnx.Param)):
    if path[0] == "scorer":
      continue
    value = np.asarray(var.get_value())
    for name, v in zip(names, list(value) if stacked else [value]):
      internal_name, transpose = canonical_to_internal(name)
      internal[internal_name] = v.T if transpose else v
  tensors = internal_to_hub(internal, model.config.llm)
  if model.scorer is not None:
    module = _scorer_module()
    if module is None:
      raise ValueError("model has a scorer but stts_jax.weights.scorer (its exporter) is not available")
    tensors.update(module.scorer_to_torch(model.scorer, prefix=HUB_SCORER_PREFIX))
  return tensors


def save_molmo2(model: vlm.Molmo2, checkpoint_dir: str) -> None:
  """Writes `config.json` (transformers layout + the full ModelConfig) and `model.safetensors` (hub names)."""
  os.makedirs(checkpoint_dir, exist_ok=True)
  with open(os.path.join(checkpoint_dir, "config.json"), "w") as f:
    json.dump(hf_config.to_hf_config(model.config), f, indent=2, sort_keys=True)
  safetensors_io.write_checkpoint(checkpoint_dir, export_tensors(model))
