"""Checkpoint import/export against transformers' Molmo2 on tiny random models (fp32, eager).

Every case: build a random HF model, `save_pretrained` (hub layout), `load_molmo2`, compare logits
with HF forward on hand-built inputs (videos with >= 3 frames, an image with crops, text only). The
host-generality cases (issue 21) vary the vision side as transformers allows: kv heads < heads and
heads x head_dim != hidden in the ViT and the adapter, non-square `image_size`, patch grids the
pooling windows do not tile (5x5, 4x6, 5x6), pixel_values `[total_crops, P, I]` with images of
different crop counts; plus transformers' own image processor output, and configs it rejects.
"""

import dataclasses
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stts_jax import config as config_lib  # noqa: E402
from stts_jax import weights  # noqa: E402
from stts_jax.weights import hf_config  # noqa: E402
from stts_jax.weights import hf_molmo2  # noqa: E402
from stts_jax.weights import safetensors_io  # noqa: E402
from tests.weights import molmo2_hf_cases as cases  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4          # max abs logit difference vs HF eager fp32 (observed ~2e-6)


@pytest.fixture(scope="module", params=cases.CASES, ids=lambda c: c.name)
def case_run(request, tmp_path_factory):
  case = request.param
  hf = cases.hf_model(case)
  ckpt = str(tmp_path_factory.mktemp(case.name))
  hf.save_pretrained(ckpt)
  inputs = cases.make_inputs(case)
  return dict(case=case, hf=hf, ckpt=ckpt, inputs=inputs, ref=cases.hf_logits(hf, inputs),
              model=weights.load_molmo2(ckpt))


def _ours(model, case, inputs):
  kw = dict(inputs)
  if not case.pass_types:
    kw.pop("mm_token_type_ids")      # then derived from input_ids
  return weights.molmo2_logits(model, **kw)


def _params(model):
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_logits_match_transformers(case_run):
  valid = cases.valid_positions(case_run["inputs"])
  ours = _ours(case_run["model"], case_run["case"], case_run["inputs"])
  assert ours.shape == case_run["ref"].shape
  err = np.abs(ours - case_run["ref"])[valid].max()
  print(f"{case_run['case'].name}: max |logit diff| = {err:.2e}")
  assert err <= TOL


def test_export_import_round_trip_is_exact(case_run, tmp_path):
  model = case_run["model"]
  weights.save_molmo2(model, str(tmp_path))
  again = weights.load_molmo2(str(tmp_path))
  assert again.config == model.config
  before, after = _params(model), _params(again)
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
  # same tensor names as transformers' own save_pretrained (hub layout)
  ours = safetensors_io.open_checkpoint(str(tmp_path))
  theirs = safetensors_io.open_checkpoint(case_run["ckpt"])
  assert sorted(ours) == sorted(theirs)
  assert ours["model.transformer.wte.embedding"]().shape[0] == model.config.llm.vocab_size


def test_export_loads_in_transformers(case_run, tmp_path):
  from transformers import Molmo2ForConditionalGeneration
  weights.save_molmo2(case_run["model"], str(tmp_path))
  hf = Molmo2ForConditionalGeneration.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  got = cases.hf_logits(hf, case_run["inputs"])
  valid = cases.valid_positions(case_run["inputs"])
  np.testing.assert_allclose(got[valid], case_run["ref"][valid], atol=1e-6)


def test_vit_taps_match_transformers(case_run):
  if case_run["case"].media != "video":
    pytest.skip("one media type is enough")
  pixels = case_run["inputs"]["pixel_values_videos"]
  with torch.no_grad():
    hs = case_run["hf"].model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states
  model = case_run["model"]
  taps = nnx.jit(lambda m, x: m.vit(x, m.config.adapter.vit_layers))(model, jax.numpy.asarray(pixels))
  for layer in model.config.adapter.vit_layers:
    np.testing.assert_allclose(np.asarray(taps[layer]), hs[layer + 1].numpy(), atol=1e-4)


def test_scan_and_list_layers_load_the_same(case_run):
  if case_run["case"].name != cases.CASES[0].name:
    pytest.skip("one case is enough")
  listed = weights.load_molmo2(case_run["ckpt"], scan_layers=False)
  got = _ours(listed, case_run["case"], case_run["inputs"])
  valid = cases.valid_positions(case_run["inputs"])
  np.testing.assert_allclose(got[valid], case_run["ref"][valid], atol=TOL)


def test_blockwise_attention_matches_transformers(case_run):
  """The memory-efficient attention (models/attention.py, 16-token blocks so every sequence spans
  several) gives transformers' logits too; the two video cases cover GQA, MQA, batch 2 and padding."""
  if case_run["case"].media != "video":
    pytest.skip("the video cases carry every mask feature (vision spans, padding, batch 2)")
  model = weights.load_molmo2(case_run["ckpt"], attention="blockwise", attention_block=16)
  assert model.config.attention == "blockwise"
  valid = cases.valid_positions(case_run["inputs"])
  ours = _ours(model, case_run["case"], case_run["inputs"])
  err = np.abs(ours - case_run["ref"])[valid].max()
  print(f"{case_run['case'].name} blockwise: max |logit diff| = {err:.2e}")
  assert err <= TOL
  # and the same logits as the xla reference loaded from the same checkpoint, at every valid position
  ref = _ours(case_run["model"], case_run["case"], case_run["inputs"])
  assert case_run["model"].config.attention == "auto"
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5 * max(1.0, float(np.abs(ref[valid]).max())))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  case = cases.CASES[0]
  hf = cases.hf_model(case)
  ckpt = str(tmp_path_factory.mktemp("base"))
  hf.save_pretrained(ckpt)
  inputs = cases.make_inputs(case)
  return dict(case=case, ckpt=ckpt, inputs=inputs, ref=cases.hf_logits(hf, inputs), hf=hf)


def _copy_with(src, dst, tensors=None, config=None):
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config(cfg) if config else cfg, f)
  loaded = {k: v() for k, v in safetensors_io.open_checkpoint(src).items()}
  safetensors_io.write_checkpoint(dst, tensors(loaded) if tensors else loaded)


def _check_logits(model, base):
  valid = cases.valid_positions(base["inputs"])
  np.testing.assert_allclose(weights.molmo2_logits(model, **base["inputs"])[valid], base["ref"][valid], atol=TOL)


def test_legacy_hub_config_with_trailing_vit_blocks(base, tmp_path):
  """Hub layout: `vit_config` declaring 8 blocks, negative `vit_layers`, blocks 6-7 present but unused."""
  def legacy(cfg):
    vision = cfg.pop("vision_config")
    vit = dict(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
               num_hidden_layers=8, num_attention_heads=vision["num_attention_heads"],
               num_key_value_heads=vision["num_key_value_heads"], head_dim=vision["head_dim"],
               hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_default_input_size=[126, 126],
               image_patch_size=14, image_num_pos=81, float32_attention=True)
    adapter = dict(cfg.pop("adapter_config"))
    adapter["vit_layers"] = [5 - 8, 3 - 8]          # -> blocks [5, 3]
    adapter.pop("vision_feature_layer")
    text = dict(cfg.pop("text_config"))
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope["rope_theta"], rope_scaling=None, qkv_bias=text.pop("attention_bias"),
                layer_norm_eps=text.pop("rms_norm_eps"), use_qk_norm=True)
    return dict(cfg, vit_config=vit, adapter_config=adapter, text_config=text, image_col_id=cases.TOK.image_col)

  def extra_blocks(tensors):
    prefix = "model.vision_backbone.image_vit.transformer.resblocks."
    for name in [n for n in tensors if n.startswith(prefix + "5.")]:
      for block in (6, 7):
        tensors[name.replace(prefix + "5.", f"{prefix}{block}.")] = tensors[name]
    return tensors

  _copy_with(base["ckpt"], str(tmp_path), extra_blocks, legacy)
  model, report = weights.load_molmo2_with_report(str(tmp_path))
  assert model.config.vit.num_layers == 8 and model.config.adapter.vit_layers == (5, 3)
  assert len(report.ignored) == 2 * 16 and all(".layers.6." in n or ".layers.7." in n for n in report.ignored)
  _check_logits(model, base)
  from transformers import Molmo2Config   # transformers reads the same legacy dict the same way
  with open(os.path.join(str(tmp_path), "config.json")) as f:
    hf_cfg = Molmo2Config(**json.load(f))
  assert hf_cfg.adapter_config.vision_feature_layer == [5, 3]
  assert hf_cfg.vision_config.num_hidden_layers == 6


def test_sharded_checkpoint_and_internal_names(base, tmp_path):
  tensors = {k: v() for k, v in safetensors_io.open_checkpoint(base["ckpt"]).items()}
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  from safetensors.numpy import save_file
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
  weight_map = {k: s for s, keys in shards.items() for k in keys}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  shutil.copy(os.path.join(base["ckpt"], "config.json"), tmp_path / "config.json")
  _check_logits(weights.load_molmo2(str(tmp_path)), base)
  # transformers' internal names (a raw state_dict) load too
  internal = tmp_path / "internal"
  state = {k: v.numpy() for k, v in base["hf"].state_dict().items()}
  _copy_with(base["ckpt"], str(internal), lambda _: state)
  _check_logits(weights.load_molmo2(str(internal)), base)


def test_missing_unexpected_and_scorer_tensors(base, tmp_path):
  drop = "model.transformer.blocks.1.mlp.ff_out.weight"
  _copy_with(base["ckpt"], str(tmp_path / "a"), lambda t: {k: v for k, v in t.items() if k != drop})
  with pytest.raises(ValueError, match=r"missing from the checkpoint: \['model.language_model.layers.1.mlp"):
    weights.load_molmo2(str(tmp_path / "a"))
  _copy_with(base["ckpt"], str(tmp_path / "b"), lambda t: {**t, "model.transformer.extra.weight": t[drop]})
  with pytest.raises(ValueError, match=r"unexpected tensors: \['model.transformer.extra.weight'\]"):
    weights.load_molmo2(str(tmp_path / "b"))
  scorer_name = hf_molmo2.HUB_SCORER_PREFIX + "mlp.w3.weight"
  _copy_with(base["ckpt"], str(tmp_path / "c"), lambda t: {**t, scorer_name: np.ones((1, 4), np.float32)})
  model, report = weights.load_molmo2_with_report(str(tmp_path / "c"))
  assert model.scorer is None and list(report.scorer_tensors) == [scorer_name]   # kept aside, no error
  with pytest.raises(ValueError, match="config.json.*rope_type 'dynamic'"):
    hf_config.from_hf_config({"vision_config": {}, "text_config": {"rope_parameters": {"rope_type": "dynamic"}}})


def test_bfloat16_load(base):
  model = weights.load_molmo2(base["ckpt"], dtype=jax.numpy.bfloat16)
  assert model.llm.layers.mlp.up_proj.kernel.get_value().dtype == jax.numpy.bfloat16
  valid = cases.valid_positions(base["inputs"])
  got = weights.molmo2_logits(model, **base["inputs"])
  assert np.abs(got - base["ref"])[valid].max() < 0.5      # bf16 weights and activations


def test_config_round_trip_without_stts_key():
  from stts_jax.testing.tiny import tiny_model_config
  model_cfg = tiny_model_config()
  hf = hf_config.to_hf_config(model_cfg)
  assert hf_config.from_hf_config(hf) == model_cfg
  hf.pop(hf_config.STTS_KEY)     # transformers keys only: same model, explicit rope layers, default STTS
  expect = dataclasses.replace(model_cfg, llm=dataclasses.replace(model_cfg.llm, rope_scaling_layers=(0, 1)),
                               stts=config_lib.STTSConfig())
  assert hf_config.from_hf_config(hf) == expect


def test_scorer_fresh_init_and_round_trip(base, tmp_path, monkeypatch):
  """With a scorer attached: released-style checkpoints (no scorer) load with a fresh scorer; an
  export carries the scorer in the authors' layout and loads back exactly."""
  from stts_jax.models import scorer as scorer_lib
  from stts_jax.models import vlm
  original = vlm.Molmo2.__init__

  def init_with_scorer(self, cfg, *, rngs):
    original(self, cfg, rngs=rngs)
    if self.scorer is None and cfg.stts.method == "stts":
      self.scorer = scorer_lib.WindowScorer(cfg.vit.hidden_size, cfg.stts, rngs=rngs)
  monkeypatch.setattr(vlm.Molmo2, "__init__", init_with_scorer)
  stts = config_lib.STTSConfig(method="stts", prune_at=1, scorer_hidden=64, scorer_heads=2)
  model, report = weights.load_molmo2_with_report(base["ckpt"], stts=stts)
  assert sorted(report.fresh) == sorted(f"scorer.{m}.{p}" for m in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "fc1", "fc2", "fc3") for p in ("kernel", "bias"))
  fc1 = np.asarray(model.scorer.fc1.kernel.get_value())
  assert fc1.shape == (64, 64) and 0 < fc1.std() < 1
  _check_logits(model, base)                     # the host model is untouched
  weights.save_molmo2(model, str(tmp_path))
  names = list(safetensors_io.open_checkpoint(str(tmp_path)))
  assert sum(n.startswith(hf_molmo2.HUB_SCORER_PREFIX) for n in names) == 14
  again, report2 = weights.load_molmo2_with_report(str(tmp_path))
  assert report2.fresh == [] and again.config.stts == stts
  after = _params(again)
  for path, value in _params(model).items():
    np.testing.assert_array_equal(after[path], value, err_msg=str(path))


# ----------------------------------------------------------------------------------------------
# host generality (issue 21)
# ----------------------------------------------------------------------------------------------
def test_stts_refuses_a_grid_only_when_asked_to_prune(case_run):
  """Loaded unpruned above; STTS (any pruning method) refuses grids it cannot cut into its windows."""
  model, case = case_run["model"], case_run["case"]
  rows, cols = model.config.vit.grid_hw
  if rows == cols and rows % 3 == 0:
    pytest.skip("the grid tiles into 3x3 windows")
  assert model.config.stts.method == "none"
  for method in ("stts", "heuristic", "random"):
    stts = config_lib.STTSConfig(method=method, prune_at=1, scorer_hidden=64, scorer_heads=2)
    with pytest.raises(ValueError, match=rf"patch grid is {rows}x{cols} .*does not tile into stts.window \(3, 3\)"):
      weights.load_molmo2(case_run["ckpt"], stts=stts)
  with pytest.raises(ValueError, match="does not tile into stts.window"):
    model.config.windows_per_frame      # the windowed video path needs whole windows too


def test_pool_windows_is_transformers_arange_for_pooling():
  """The hand-built pooling indices pad partial windows exactly as the processor does."""
  ip = pytest.importorskip("transformers.models.molmo2.image_processing_molmo2")
  for h, w, ph, pw in ((5, 5, 3, 3), (4, 6, 3, 3), (5, 6, 2, 2), (9, 9, 2, 2), (9, 9, 3, 3), (7, 4, 3, 2)):
    grid = np.arange(h * w).reshape(h, w)
    ours = cases.pool_windows(grid, ph, pw)
    theirs = ip.arange_for_pooling(torch.from_numpy(grid), ph, pw)
    np.testing.assert_array_equal(ours[0], theirs[0].numpy())
    assert ours[1:] == theirs[1:]


def test_processor_images_with_different_crop_counts(base, tmp_path):
  """transformers' Molmo2Processor output as is: three images of 3, 4 and 2 crops (two in row 0, one in
  row 1), pixel_values [total_crops, P, 588], global pooling indices, its input_ids and mm_token_type_ids."""
  inputs = cases.processor_image_inputs(str(tmp_path))
  assert inputs["pixel_values"].ndim == 3 and inputs["image_num_crops"].tolist() == [3, 4, 2]
  assert inputs["pixel_values"].shape[0] == inputs["image_num_crops"].sum()
  ref = cases.hf_logits(base["hf"], inputs)
  ours = weights.molmo2_logits(weights.load_molmo2(base["ckpt"]), **inputs)
  valid = cases.valid_positions(inputs)
  err = np.abs(ours - ref)[valid].max()
  print(f"processor images (crops 3, 4, 2): max |logit diff| = {err:.2e}")
  assert err <= TOL


def _hf_dict(**sections):
  """A transformers-layout config dict of the base case with `sections` merged into its sub-configs."""
  d = cases.hf_config(cases.CASES[0]).to_dict()
  for key, update in sections.items():
    d[key] = {**d[key], **update} if isinstance(d.get(key), dict) else update
  return d


# (sub-config updates, the field our error must name, whether transformers rejects the config itself)
_BAD_CONFIGS = (
    (dict(adapter_config={"vision_feature_layer": [6, 3]}), "adapter_config.vision_feature_layer", True),
    (dict(text_config={"qk_norm_type": "rms"}), "text_config.qk_norm_type", True),
    (dict(text_config={"additional_vocab_size": -1}), "text_config.additional_vocab_size", True),
    (dict(vision_config={"image_size": 126}), "vision_config.image_size", True),
    (dict(vision_config={"hidden_size": "32"}), "vision_config.hidden_size", True),
    (dict(adapter_config={"num_attention_heads": 4, "num_key_value_heads": 3}),
     "adapter_config.num_key_value_heads", False),      # transformers builds it, its forward fails
    (dict(vision_config={"num_attention_heads": 2, "num_key_value_heads": 4}),
     "vision_config.num_key_value_heads", False),
)


@pytest.mark.parametrize("update,field,hf_rejects", _BAD_CONFIGS, ids=[b[1] for b in _BAD_CONFIGS])
def test_rejected_configs_name_the_field(update, field, hf_rejects):
  from transformers import Molmo2Config
  d = _hf_dict(**update)
  if hf_rejects:
    with pytest.raises(Exception, match=field.split(".")[-1]):
      Molmo2Config(**d)
  with pytest.raises(ValueError, match=rf"config.json: .*{re.escape(field)}"):
    hf_config.from_hf_config(d)


def test_vision_config_variations_read_as_transformers():
  """Non-square image_size, kv heads, any head_dim: read, and written back the same for transformers."""
  from transformers import Molmo2Config
  case = cases.CASES[[c.name for c in cases.CASES].index("nonsquare_5x6_images_flat_mqa")]
  d = cases.hf_config(case).to_dict()
  cfg = hf_config.from_hf_config(d)
  assert cfg.vit.grid_hw == (5, 6) and cfg.vit.num_patches == 30 and cfg.vit.kv_heads == 1
  with pytest.raises(ValueError, match="5x6.*not square"):
    cfg.vit.grid
  back = Molmo2Config(**{k: v for k, v in hf_config.to_hf_config(cfg).items() if k != hf_config.STTS_KEY})
  assert back.vision_config.image_size == [70, 84] and back.vision_config.num_key_value_heads == 1
  assert back.vision_config.num_position_embeddings == 30
  # transformers floors image_size to whole patches when it counts positions; so do we
  floored = hf_config.from_hf_config(_hf_dict(vision_config={"image_size": [130, 140], "num_position_embeddings": None}))
  assert floored.vit.grid_hw == (9, 10) and floored.vit.image_hw == (126, 140)
