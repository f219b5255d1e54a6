"""AOT: the step lowers and compiles from abstract shapes on the 8-device mesh and reports sizes."""

import numpy as np
import pytest
from flax import nnx

from stts_jax.parallel import sharding

from stts_jax.train import aot
from tests.train import helpers, toy_model


@pytest.mark.multidevice
def test_compile_train_step_reports_flops_and_memory():
  cfg = helpers.train_cfg()
  batch = aot.abstract_batch(helpers.MODEL_CFG, batch_size=4, num_frames=3, seq_len=64)
  assert batch["patches"].shape == (4, 3, 81, 588) and batch["patches"].dtype == np.uint8
  report = aot.compile_train_step(
      helpers.MODEL_CFG, cfg, helpers.mesh_8(), sharding.make_rules(), batch,
      model_fn=lambda c: toy_model.ToyVideoLM(c, rngs=nnx.Rngs(0)), forward=toy_model.toy_forward)
  toy = toy_model.ToyVideoLM(helpers.MODEL_CFG, rngs=nnx.Rngs(0))
  expected_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(nnx.state(toy, nnx.Param)))
  assert report.num_params == expected_params
  assert report.num_devices == 8 and report.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
  # The lm_head alone costs 2*E*V flops per token forward (x3 with backward) on B*S tokens.
  lm_head = 2 * 32 * helpers.MODEL_CFG.llm.embed_rows * 4 * 64
  assert report.flops is not None and 3 * lm_head < report.flops < 30 * lm_head
  # Params + two Adam moments, split 8 ways at most (some tensors are replicated).
  assert report.argument_bytes >= 3 * expected_params * 4 / 8
  assert report.temp_bytes > 0 and report.alias_bytes > 0
  text = report.summary()
  assert "FLOPs per step" in text and "per-device memory" in text


@pytest.mark.multidevice
def test_aot_json_report(tmp_path):
  """`write_aot_json` (scripts/train.py --aot_json): devices, mesh, micro-batch, per-device bytes as
  compiled, FLOPs, provenance; micro-batch 4 / accum 2 = 2 over the 4 batch devices (data x fsdp)."""
  import json

  from stts_jax.train import main as train_main
  cfg = helpers.train_cfg(grad_accum=2)
  batch = aot.abstract_batch(helpers.MODEL_CFG, batch_size=4, num_frames=3, seq_len=64)
  report = aot.compile_train_step(
      helpers.MODEL_CFG, cfg, helpers.mesh_8(), sharding.make_rules(), batch,
      model_fn=lambda c: toy_model.ToyVideoLM(c, rngs=nnx.Rngs(0)), forward=toy_model.toy_forward,
      count_flops=False)
  path = tmp_path / "sub" / "aot.json"
  train_main.write_aot_json(report, str(path), {"train": {"grad_accum": 2}}, ["train.py", "--aot"])
  out = json.loads(path.read_text())
  assert out["devices"]["count"] == 8 and out["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert out["batch"] == {"global": 4, "grad_accum": 2, "micro_batch": 2, "micro_batch_per_device": 0.5,
                          "batch_devices": 4}
  b = out["bytes_per_device"]
  assert b["argument"] == report.argument_bytes > 0 and b["temp"] == report.temp_bytes > 0
  assert b["argument_plus_temp"] == report.argument_bytes + report.temp_bytes
  assert out["flops"]["global"] is None and out["flops"]["compiled_per_device_scanned"] > 0
  assert out["compile_seconds"] > 0 and out["config"] == {"train": {"grad_accum": 2}}
  assert out["command"] == ["train.py", "--aot"] and len(out["git"]["commit"]) == 40
  assert out["machine"]["jax"] and "estimate" in out["memory_note"]


def test_attention_choices_are_captured_per_call_site():
  """Each attention call site's resolution (call site, shape) made while recording lands in the report."""
  import jax.numpy as jnp

  from stts_jax.models import attention as attention_lib
  mask = attention_lib.vit_rows_mask(jnp.zeros((1, 1237), jnp.int32))   # a shape no other test uses
  with attention_lib.record_choices() as choices:
    resolved = attention_lib.choose("blockwise", mask, (1, 1237, 3, 8), (1, 1237, 3, 8), backend="cpu")
  assert resolved == "blockwise"
  assert choices == [{"site": "vit_rows", "impl": "blockwise", "asked": "blockwise", "q": [1, 1237, 3, 8],
                              "k": [1, 1237, 3, 8], "backend": "cpu"}]
