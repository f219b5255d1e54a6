"""AOT: the step lowers and compiles from abstract shapes on the 8-device mesh and reports sizes."""

import numpy as np
import pytest
from flax import nnx

from stts_jax.train import aot, sharding
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
