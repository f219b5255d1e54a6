import ml_collections
import pytest

from stts_jax import config as config_lib
from stts_jax.data import config as data_config
from stts_jax.testing import tiny


def test_data_section_is_registered_and_strict():
  out = config_lib.build(ml_collections.ConfigDict({"data": {
      "path": "/x", "max_frames": 8, "image_size": 126, "seq_len": 256, "pool": [3, 3],
      "eval_splits": ["val", "test"]}}))
  cfg = out["data"]
  assert isinstance(cfg, data_config.DataConfig)
  assert cfg.pool == (3, 3) and cfg.eval_splits == ("val", "test") and cfg.windows_per_frame == 9
  assert cfg.tokenizer_path == "/x/tokenizer.json" and cfg.per_process_batch(2) == 4
  cfg.check_model(tiny.tiny_model_config())
  with pytest.raises(ValueError, match="unknown config keys"):
    config_lib.build(ml_collections.ConfigDict({"data": {"frames": 8}}))


@pytest.mark.parametrize("kw,problem", [
    ({"format": "csv"}, "data.format"), ({"on_error": "ignore"}, "data.on_error"),
    ({"image_size": 100}, "not divisible"), ({"seq_len": 100, "max_frames": 64}, "cannot hold"),
    ({"max_fps": 0.0}, "max_fps")])
def test_validation_errors(kw, problem):
  with pytest.raises(ValueError, match=problem):
    data_config.build_data_config(kw)


def test_model_mismatch_and_batch_split():
  cfg = data_config.build_data_config({"image_size": 378})
  with pytest.raises(ValueError, match="model vit"):
    cfg.check_model(tiny.tiny_model_config())
  with pytest.raises(ValueError, match="not divisible by process_count"):
    cfg.per_process_batch(3)
