"""Molmo2 `config.json` <-> `ModelConfig`.

Reads both layouts:
  * transformers (what `save_pretrained` writes): `vision_config`, `adapter_config.vision_feature_layer`,
    `text_config.rope_parameters`, `rms_norm_eps`, `attention_bias`;
  * the hub legacy keys: `vit_config` (`image_default_input_size`, `image_patch_size`, `image_num_pos`),
    `adapter_config.vit_layers`, `text_config.rope_theta` / `rope_scaling`, `layer_norm_eps`, `qkv_bias`.
Negative adapter layer indices count from the declared ViT depth: block = l % num_layers (for the
4B hub config, [-3, -9] with 27 layers -> blocks [24, 18]). `ViTConfig.num_layers` keeps the declared
depth; the model builds only blocks 0..max(taps).

Vision and adapter configs are read as transformers reads them: non-square `image_size` [height, width],
fewer kv heads than heads, `num_attention_heads * head_dim` != `hidden_size`. What transformers
rejects (or cannot run) is refused with a `ValueError` naming the field (`adapter_config.vision_feature_layer`,
`text_config.qk_norm_type`, `vision_config.image_size`, ...).

Token ids: the HF keys (`image_patch_id`, `frame_start_token_id`, ...) override
`TokenIds.for_vocab(vocab_size, ...)`. ChatML ids are Qwen's (151644/151645/151643) for a Qwen-sized
vocabulary and (V-3, V-2, V-1) otherwise (the tiny test convention). A config written by
`to_hf_config` also carries the complete `ModelConfig` under the key `stts_jax`, which wins.
"""

from typing import Any

from stts_jax import config as config_lib

STTS_KEY = "stts_jax"
_QWEN_CHAT_IDS = dict(chat_start=151644, chat_end=151645, pad=151643)
_ROPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"),
}


def _first(d: dict, *keys, default=None):
  for k in keys:
    if k in d and d[k] is not None:
      return d[k]
  return default


def _require(ok: bool, msg: str):
  if not ok:
    raise ValueError(f"Molmo2 config.json: {msg}")


def _int(d: dict, section: str, key: str, default: int, minimum: int = 1) -> int:
  """`d[key]` (or `default` when absent/None) as an int >= minimum; errors name `section.key`."""
  value = d.get(key)
  value = default if value is None else value
  _require(isinstance(value, int) and not isinstance(value, bool),
           f"{section}.{key} must be an integer, got {value!r}")
  _require(value >= minimum, f"{section}.{key} must be >= {minimum}, got {value}")
  return value


def _number(d: dict, section: str, *keys: str, default: float) -> float:
  key = next((k for k in keys if d.get(k) is not None), keys[0])
  value = d.get(key, default)
  value = default if value is None else value
  _require(isinstance(value, (int, float)) and not isinstance(value, bool),
           f"{section}.{key} must be a number, got {value!r}")
  return float(value)


def _vit_config(v: dict, section: str) -> config_lib.ViTConfig:
  """transformers' `Molmo2VisionConfig` rules: image_size [height, width] (default [378, 378]); the
  patch grid is (height // patch, width // patch) (partial patches dropped, as transformers counts
  `num_position_embeddings`); any kv head count dividing the heads; any head_dim."""
  size_key = next((k for k in ("image_size", "image_default_input_size") if v.get(k) is not None), "image_size")
  size = v.get(size_key) or [378, 378]
  _require(isinstance(size, (list, tuple)) and len(size) == 2
           and all(isinstance(x, int) and not isinstance(x, bool) for x in size),
           f"{section}.{size_key} must be a list [height, width] of integers, got {size!r}")
  patch_key = "patch_size" if v.get("patch_size") is not None else (
      "image_patch_size" if v.get("image_patch_size") is not None else "patch_size")
  patch = _int(v, section, patch_key, 14)
  rows, cols = size[0] // patch, size[1] // patch
  _require(rows >= 1 and cols >= 1, f"{section}.{size_key} {list(size)} is smaller than one {patch}-pixel patch")
  heads = _int(v, section, "num_attention_heads", 16)
  kv_heads = _int(v, section, "num_key_value_heads", heads)
  _require(heads % kv_heads == 0,
           f"{section}.num_key_value_heads {kv_heads} must divide num_attention_heads {heads}")
  _require(v.get("hidden_act", "gelu_pytorch_tanh") == "gelu_pytorch_tanh",
           f"{section}.hidden_act {v.get('hidden_act')!r} unsupported (gelu_pytorch_tanh only)")
  _require(v.get("attention_bias", True), f"{section}.attention_bias=false is unsupported")
  _require(v.get("num_channels", 3) == 3, f"{section}.num_channels {v.get('num_channels')!r} unsupported (3 only)")
  cfg = config_lib.ViTConfig(
      hidden_size=_int(v, section, "hidden_size", 1152), intermediate_size=_int(v, section, "intermediate_size", 4304),
      num_layers=_int(v, section, "num_hidden_layers", 27), num_heads=heads,
      num_kv_heads=None if kv_heads == heads else kv_heads, head_dim=_int(v, section, "head_dim", 72),
      patch_size=patch, image_size=rows * patch, image_width=None if cols == rows else cols * patch,
      layer_norm_eps=_number(v, section, "layer_norm_eps", default=1e-6))
  pos_key = "num_position_embeddings" if v.get("num_position_embeddings") is not None else "image_num_pos"
  num_pos = v.get(pos_key)
  _require(num_pos is None or num_pos == cfg.num_patches,
           f"{section}.{pos_key} {num_pos} != the {rows}x{cols} patch grid of {section}.{size_key} {list(size)}")
  return cfg


def _rope_scaling(t: dict) -> tuple[float, config_lib.RopeScaling]:
  params = dict(_first(t, "rope_parameters", "rope_scaling", default={}) or {})
  theta = float(_first(params, "rope_theta", default=_first(t, "rope_theta", default=10000.0)))
  rope_type = _first(params, "rope_type", "type", default="default")
  _require(rope_type in _ROPE_FIELDS, f"rope_type {rope_type!r} unsupported (default|linear|llama3|yarn)")
  allowed = {"rope_type", "type", "rope_theta", *_ROPE_FIELDS[rope_type]}
  if rope_type == "yarn":
    allowed.add("truncate")
  unsupported = sorted(k for k in params if k not in allowed)
  _require(not unsupported, f"rope parameters {unsupported} unsupported for rope_type {rope_type!r}")
  _require(params.get("truncate", True) is True, "yarn with truncate=false is unsupported")
  kwargs = {k: params[k] for k in _ROPE_FIELDS[rope_type] if params.get(k) is not None}
  if rope_type in ("llama3", "yarn"):
    kwargs.setdefault("original_max_position_embeddings", t.get("max_position_embeddings", 36864))
  return theta, config_lib.from_dict(config_lib.RopeScaling, {"rope_type": rope_type, **kwargs}, "rope")


def _llm_config(t: dict) -> config_lib.LLMConfig:
  _require(t.get("hidden_act", "silu") == "silu", f"text_config.hidden_act {t.get('hidden_act')!r} unsupported")
  _require(t.get("use_qk_norm", True), "text_config.use_qk_norm=false is unsupported (Molmo2 always has q/k norms)")
  _require(not t.get("tie_word_embeddings", False), "text_config.tie_word_embeddings=true is unsupported")
  qk_norm = t.get("qk_norm_type", "qwen3")
  _require(qk_norm in ("qwen3", "olmo"), f"text_config.qk_norm_type {qk_norm!r} unsupported (qwen3 | olmo)")
  heads = _int(t, "text_config", "num_attention_heads", 32)
  kv_heads = _int(t, "text_config", "num_key_value_heads", 8)
  _require(heads % kv_heads == 0,
           f"text_config.num_key_value_heads {kv_heads} must divide num_attention_heads {heads}")
  theta, scaling = _rope_scaling(t)
  layers = t.get("rope_scaling_layers")
  return config_lib.LLMConfig(
      hidden_size=_int(t, "text_config", "hidden_size", 4096),
      num_layers=_int(t, "text_config", "num_hidden_layers", 36), num_heads=heads, num_kv_heads=kv_heads,
      head_dim=_int(t, "text_config", "head_dim", 128),
      intermediate_size=_int(t, "text_config", "intermediate_size", 12288),
      vocab_size=_int(t, "text_config", "vocab_size", 151936),
      additional_vocab_size=_int(t, "text_config", "additional_vocab_size", 128, minimum=0),
      rope_theta=theta, rope_scaling=scaling,
      rope_scaling_layers=None if layers is None else tuple(int(x) for x in layers),
      qk_norm_type=qk_norm, norm_after=bool(t.get("norm_after", False)),
      rms_norm_eps=_number(t, "text_config", "rms_norm_eps", "layer_norm_eps", default=1e-6),
      attention_bias=bool(_first(t, "attention_bias", "qkv_bias", default=False)),
      max_position_embeddings=_int(t, "text_config", "max_position_embeddings", 36864))


def _adapter_config(a: dict, vit: config_lib.ViTConfig, llm: config_lib.LLMConfig,
                    vit_section: str) -> config_lib.AdapterConfig:
  key = "vision_feature_layer" if a.get("vision_feature_layer") is not None else (
      "vit_layers" if a.get("vit_layers") is not None else "vision_feature_layer")
  layers = a.get(key) or [24, 18]
  _require(isinstance(layers, (list, tuple)) and layers
           and all(isinstance(x, int) and not isinstance(x, bool) for x in layers),
           f"adapter_config.{key} must be a non-empty list of integers, got {layers!r}")
  _require(all(-vit.num_layers <= layer < vit.num_layers for layer in layers),
           f"adapter_config.{key} {list(layers)} must index the {vit.num_layers} layers of {vit_section}")
  _require(a.get("hidden_size", vit.hidden_size) == vit.hidden_size,
           f"adapter_config.hidden_size {a.get('hidden_size')} != {vit_section}.hidden_size {vit.hidden_size}")
  _require(a.get("text_hidden_size", llm.hidden_size) == llm.hidden_size,
           f"adapter_config.text_hidden_size {a.get('text_hidden_size')} != text_config.hidden_size "
           f"{llm.hidden_size}")
  _require(a.get("hidden_act", "silu") == "silu", f"adapter_config.hidden_act {a.get('hidden_act')!r} unsupported")
  _require(not a.get("mlp_bias", False), "adapter_config.mlp_bias=true is unsupported")
  _require(a.get("attention_bias", True), "adapter_config.attention_bias=false is unsupported")
  heads = _int(a, "adapter_config", "num_attention_heads", 16)
  kv_heads = _int(a, "adapter_config", "num_key_value_heads", heads)
  _require(heads % kv_heads == 0,
           f"adapter_config.num_key_value_heads {kv_heads} must divide num_attention_heads {heads}")
  return config_lib.AdapterConfig(
      vit_layers=tuple(int(layer) % vit.num_layers for layer in layers), num_heads=heads,
      num_kv_heads=None if kv_heads == heads else kv_heads, head_dim=_int(a, "adapter_config", "head_dim", 72),
      intermediate_size=_int(a, "adapter_config", "intermediate_size", 9728))


def _token_ids(hf: dict, vocab_size: int) -> config_lib.TokenIds:
  chat = _QWEN_CHAT_IDS if vocab_size > _QWEN_CHAT_IDS["chat_end"] else dict(
      chat_start=vocab_size - 3, chat_end=vocab_size - 2, pad=vocab_size - 1)
  ids = config_lib.to_dict(config_lib.TokenIds.for_vocab(vocab_size, **chat))
  for field, key in (("image_start", "image_start_token_id"), ("image_end", "image_end_token_id"),
                     ("image_patch", "image_patch_id"), ("image_col", "image_col_id"),
                     ("low_res_image_start", "low_res_image_start_token_id"),
                     ("image_low", "image_low_res_id"), ("frame_start", "frame_start_token_id"),
                     ("frame_end", "frame_end_token_id")):
    if hf.get(key) is not None:
      ids[field] = int(hf[key])
  return config_lib.from_dict(config_lib.TokenIds, ids, "tokens")


def from_hf_config(hf: dict, dtype: str = "float32") -> config_lib.ModelConfig:
  """`config.json` dict -> validated `ModelConfig` (compute and parameter dtype = `dtype`)."""
  if STTS_KEY in hf:
    d = dict(hf[STTS_KEY])
    d.update(dtype=dtype, param_dtype=dtype)
    return config_lib.build_model_config(d)
  section = "vision_config" if hf.get("vision_config") is not None else "vit_config"
  vision = hf.get(section)
  _require(vision is not None, "no vision_config / vit_config section")
  _require("text_config" in hf, "no text_config section")
  vit = _vit_config(vision, section)
  llm = _llm_config(hf["text_config"])
  adapter = _adapter_config(hf.get("adapter_config") or {}, vit, llm, section)
  return config_lib.ModelConfig(vit=vit, adapter=adapter, llm=llm, tokens=_token_ids(hf, llm.vocab_size),
                                dtype=dtype, param_dtype=dtype).validate()


def _rope_parameters(llm: config_lib.LLMConfig) -> dict:
  s = llm.rope_scaling
  out = {"rope_type": s.rope_type, "rope_theta": llm.rope_theta}
  out.update({k: getattr(s, k) for k in _ROPE_FIELDS[s.rope_type]})
  return out


def to_hf_config(cfg: config_lib.ModelConfig) -> dict[str, Any]:
  """`ModelConfig` -> transformers-layout `config.json` dict (plus the full config under `stts_jax`).

  The vision section declares only the built blocks (0..max(taps)), as transformers does for the hub.
  """
  vit, ad, llm, tok = cfg.vit, cfg.adapter, cfg.llm, cfg.tokens
  vision_config = dict(
      model_type="molmo2_vision", hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
      num_hidden_layers=max(ad.vit_layers) + 1, num_attention_heads=vit.num_heads,
      num_key_value_heads=vit.kv_heads, head_dim=vit.head_dim, hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=vit.layer_norm_eps, image_size=list(vit.image_hw), patch_size=vit.patch_size,
      num_position_embeddings=vit.num_patches, attention_bias=True)
  adapter_config = dict(
      model_type="molmo2_adapter", vision_feature_layer=list(ad.vit_layers), hidden_size=vit.hidden_size,
      num_attention_heads=ad.num_heads, num_key_value_heads=ad.kv_heads, head_dim=ad.head_dim,
      intermediate_size=ad.intermediate_size, text_hidden_size=llm.hidden_size, hidden_act="silu",
      mlp_bias=False, attention_bias=True)
  layers = llm.rope_scaling_layers
  text_config = dict(
      model_type="molmo2_text", hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
      intermediate_size=llm.intermediate_size, vocab_size=llm.vocab_size,
      additional_vocab_size=llm.additional_vocab_size, attention_bias=llm.attention_bias,
      qk_norm_type=llm.qk_norm_type, norm_after=llm.norm_after, rms_norm_eps=llm.rms_norm_eps,
      max_position_embeddings=llm.max_position_embeddings, rope_parameters=_rope_parameters(llm),
      rope_scaling_layers=list(range(llm.num_layers)) if layers is None else list(layers),
      hidden_act="silu", tie_word_embeddings=False)
  return dict(
      architectures=["Molmo2ForConditionalGeneration"], model_type="molmo2", vision_config=vision_config,
      adapter_config=adapter_config, text_config=text_config, image_start_token_id=tok.image_start,
      image_end_token_id=tok.image_end, image_patch_id=tok.image_patch,
      low_res_image_start_token_id=tok.low_res_image_start, frame_start_token_id=tok.frame_start,
      frame_end_token_id=tok.frame_end, tie_word_embeddings=False, dtype=cfg.param_dtype,
      **{STTS_KEY: config_lib.to_dict(cfg)})
