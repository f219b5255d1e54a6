"""Eval data errors: only bad data is skipped (a bug crashes); too many skipped examples stop the run."""
import numpy as np
import pytest

from stts_jax.data import default_dataset, pipeline, preprocess
from stts_jax.eval import config as eval_config
from stts_jax.eval import data as data_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.eval import runner
from stts_jax.models import vlm
from stts_jax.testing import tiny
from tests.eval import helpers


class _ConfigOnly(vlm.Molmo2):
  """What `run_cell` needs of a model when the predictor is scripted: its config, no parameters."""

  def __init__(self):    # no super().__init__: nothing to build or compile
    self.config = tiny.tiny_model_config()
    self.scorer = None


class _RightAnswers(predictor_lib.Predictor):
  """The `Predictor` surface `run_cell` uses; picks option `example_id % 4` (always right)."""

  def __init__(self):    # no super().__init__: nothing is compiled
    self.reset_times()

  def reset_times(self):
    self.times = {s: [] for s in predictor_lib.STAGES}

  def __call__(self, model, batch, *, generate, step):
    del model, generate, step
    rows = np.asarray(batch["example_id"])
    logp = np.full((rows.shape[0], 4), -3.0, np.float32)
    logp[np.arange(rows.shape[0]), rows % 4] = -0.1
    self.times["vision"].append(0.0)
    return {"option_logprobs": logp}


def _data(root, **kw):
  cfg = helpers.make_mc_dataset(str(root), frames=2, size=42, **kw)
  return data_lib.EvalData(cfg, default_dataset.tiny_token_ids(), "test")


def _run_cell(data):
  ecfg = eval_config.EvalConfig(methods=("none",), mc_modes=("likelihood",), warmup=0).validate()
  cell = runner.CellResult("none", 0.0, 2)
  return runner.run_cell(_ConfigOnly(), data, ecfg, _RightAnswers(), cell, progress=False)


def test_a_bug_in_our_own_transform_crashes_the_eval(tmp_path, monkeypatch):
  data = _data(tmp_path, n=4, corrupt=(1,))

  def bug(*args, **kwargs):
    raise ValueError("bug in our own code")
  monkeypatch.setattr(preprocess, "preprocess_frames", bug)
  with pytest.raises(ValueError, match="bug in our own code") as err:
    next(data.batches())
  assert not isinstance(err.value, pipeline.DataError)


def test_too_many_bad_videos_stop_the_eval_with_the_list_of_files(tmp_path):
  data = _data(tmp_path, n=20, corrupt=(0, 7), missing=(13,))           # 3 of 20 bad: 15% > 5%
  with pytest.raises(pipeline.TooManySkippedError,
                     match=r"(?s)eval none@0x2f: split 'test': 3 of 20 examples skipped \(15\.0%\).*"
                           r"'ex0' \(video .*videos/v0\.mp4\): .*cannot open.*"
                           r"'ex7' \(video .*videos/v7\.mp4\).*"
                           r"'ex13' \(video .*videos/missing13\.mp4\): .*file not found"):
    _run_cell(data)


def test_below_the_limit_the_eval_runs_and_counts_the_skipped(tmp_path):
  data = _data(tmp_path, n=20, corrupt=(0, 7), missing=(13,), max_skipped_fraction=0.2)
  cell = _run_cell(data)
  assert cell.metrics["multiple_choice/scored"] == 17 and cell.metrics["multiple_choice/skipped"] == 3
  assert cell.metrics["multiple_choice/likelihood_accuracy"] == 1.0
  assert [s["example_id"] for s in cell.skipped_examples] == ["ex0", "ex7", "ex13"]
  assert data.last_pass[0] == 20 and len(data.last_pass[1]) == 3
  small = _data(tmp_path / "small", n=6, corrupt=(2,))                   # 1 of 6 but < 20 examples: no verdict
  assert _run_cell(small).metrics["multiple_choice/skipped"] == 1
