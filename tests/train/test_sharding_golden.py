"""Model parameter PartitionSpecs under the default rules match tests/golden/train_sharding.json."""

import json

import pytest

from tests.golden import make_train_sharding_golden as golden


@pytest.mark.multidevice
def test_param_specs_match_golden():
  with open(golden.GOLDEN) as f:
    expected = json.load(f)
  current = golden.current_specs()
  for config in expected:
    assert sorted(current[config]) == sorted(expected[config]), f"{config}: parameter set changed"
    diff = {k: (expected[config][k], current[config][k]) for k in expected[config]
            if expected[config][k] != current[config][k]}
    assert not diff, f"{config}: specs changed (regenerate with {golden.__file__}): {diff}"
  big = current["molmo2_4b_stts"]
  # Spot checks of the rules on the real sizes.
  assert big["llm/embed_tokens/embedding"]["spec"] == "(('tensor', 'fsdp'), None)"
  assert big["llm/lm_head/kernel"]["spec"] == "('fsdp', 'tensor')"
  assert big["llm/layers/mlp/gate_proj/kernel"]["spec"] == "(None, 'fsdp', 'tensor')"
  assert big["vit/blocks/self_attn/q_proj/kernel"]["spec"] == "(None, 'fsdp', 'tensor')"
  assert big["llm/layers/input_layernorm/scale"]["spec"] == "(None, None)"
