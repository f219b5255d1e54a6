"""Evaluators on hand-made eval sets with a predict_fn whose answers the test controls."""
import dataclasses
import json
import os

import numpy as np
import pytest

from stts_jax.data import default_dataset
from stts_jax.eval import data as data_lib
from stts_jax.eval import evaluators
from tests.eval import helpers

LETTERS = "ABCD"


class ScriptedPredict:
  """Answers example row r with option r % 4 unless r is in `wrong` (then (r % 4 + 1) % 4).

  Generated text per row: `texts[r]` if given, else the letter of the chosen option.
  """

  def __init__(self, tok, *, wrong=(), gen_wrong=(), texts=None):
    self.tok = tok
    self.wrong, self.gen_wrong = set(wrong), set(gen_wrong)
    self.texts = texts or {}
    self.calls = []

  def __call__(self, model, batch, *, generate, step):
    rows = np.asarray(batch["example_id"])
    self.calls.append((step, generate, rows.tolist()))
    b = rows.shape[0]
    logp = np.full((b, 4), -3.0, np.float32)
    texts = []
    for i, r in enumerate(rows):
      ans = int(r) % 4
      logp[i, (ans + 1) % 4 if r in self.wrong else ans] = -0.1
      gen = (ans + 1) % 4 if r in self.gen_wrong else ans
      texts.append(self.texts.get(int(r), LETTERS[gen]))
    out = {"option_logprobs": logp, "num_kept": np.full(b, 7), "prompt_tokens": np.full(b, 50)}
    if generate:
      ids = [self.tok.encode(t) for t in texts]
      n = max(len(x) for x in ids) + 1
      tokens = np.zeros((b, n), np.int32)
      for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
      out.update(tokens=tokens, num_tokens=np.asarray([len(x) for x in ids], np.int32))
    return out


def _data(root, **kw):
  cfg = helpers.make_mc_dataset(str(root), **kw)
  return data_lib.EvalData(cfg, default_dataset.tiny_token_ids(), "test")


def test_multiple_choice_accuracy_on_a_known_answer_pattern(tmp_path):
  data = _data(tmp_path, n=10, frames=2, size=42)
  predict = ScriptedPredict(data.tokenizer, wrong=(1, 6, 7), gen_wrong=(0,),
                            texts={3: "D. bottom right", 4: "(A)", 5: "top right", 8: "Answer: A"})
  ev = evaluators.from_name("multiple_choice", predict, data=data)
  got = dict(ev.run(model=None))
  # 10 examples, all scored; likelihood wrong on rows 1, 6, 7 -> 7/10.
  assert got["likelihood_accuracy"] == pytest.approx(0.7)
  assert got["likelihood_correct"] == 7
  # generated: row 0 wrong letter; texts of rows 3 (D), 4 (A), 5 ("top right" = B), 8 (A) all correct -> 9/10.
  assert got["generate_accuracy"] == pytest.approx(0.9)
  assert (got["scored"], got["skipped"]) == (10, 0)
  assert got["kept_tokens"] == 7 and got["prompt_tokens"] == 50
  # 10 examples in batches of 4: three passes of the data (steps 0, 1, 2), the last one padded.
  assert [c[0] for c in predict.calls] == [0, 1, 2] and predict.calls[2][2] == [8, 9, -1, -1]
  recs = {r["example_id"]: r for r in ev.details["records"]["generate"]}
  assert recs["ex3"]["prediction"] == 3 and recs["ex0"]["correct"] is False


def test_corrupt_missing_and_bad_lines_are_reported_and_excluded(tmp_path):
  data_cfg = helpers.make_mc_dataset(str(tmp_path), n=8, frames=2, size=42, corrupt=(2,), missing=(5,))
  with open(os.path.join(tmp_path, "test.jsonl"), "a") as f:
    f.write("{not json\n")
    f.write(json.dumps({"id": "bad", "video": "x.mp4", "question": "q"}) + "\n")
  data = data_lib.EvalData(data_cfg, default_dataset.tiny_token_ids(), "test")
  predict = ScriptedPredict(data.tokenizer, wrong=(1, 2))
  ev = evaluators.from_name("multiple_choice", predict, data=data, modes=("likelihood",))
  got = dict(ev.run(model=None))
  # Scored: rows 0, 1, 3, 4, 6, 7 (row 2 corrupt, row 5 missing); wrong: row 1 -> 5/6.
  assert got["likelihood_accuracy"] == pytest.approx(5 / 6)
  assert (got["scored"], got["skipped"]) == (6, 4)
  skipped = {s["example_id"]: s["error"] for s in ev.details["skipped_examples"]}
  assert set(skipped) == {"ex2", "ex5", f"{tmp_path}/test.jsonl:9", f"{tmp_path}/test.jsonl:10"}
  assert "cannot open as a video" in skipped["ex2"]
  assert "file not found" in skipped["ex5"]
  assert "invalid JSON" in skipped[f"{tmp_path}/test.jsonl:9"]
  assert "missing required field" in skipped[f"{tmp_path}/test.jsonl:10"]
  # The predict_fn never had to score the bad rows, and generation was not requested.
  assert all(gen is False for _, gen, _ in predict.calls)


def test_bad_video_raises_with_on_error_raise(tmp_path):
  data_cfg = helpers.make_mc_dataset(str(tmp_path), n=3, frames=2, size=42, missing=(1,), on_error="raise")
  data = data_lib.EvalData(data_cfg, default_dataset.tiny_token_ids(), "test")
  ev = evaluators.from_name("multiple_choice", ScriptedPredict(data.tokenizer), data=data)
  with pytest.raises(Exception, match="ex1.*file not found"):
    dict(ev.run(model=None))


def test_open_ended_exact_match(tmp_path):
  data = _data(tmp_path, n=6, frames=2, size=42, open_ended=True)
  # Answers: top left, top right, bottom left, bottom right, top left, top right; 2 texts right after
  # normalisation (case, punctuation, article).
  texts = {0: "top left.", 1: "the top  right", 2: "bottom left left", 3: "top left", 4: "", 5: "bottom right"}
  ev = evaluators.from_name("open_ended", ScriptedPredict(data.tokenizer, texts=texts), data=data)
  got = dict(ev.run(model=None))
  assert got["exact_match_accuracy"] == pytest.approx(2 / 6)
  assert (got["scored"], got["skipped"]) == (6, 0)


def test_unknown_evaluator_and_modes(tmp_path):
  data = _data(tmp_path, n=1, frames=2, size=42)
  with pytest.raises(ValueError, match="unknown evaluator"):
    evaluators.from_name("nope", None, data=data)
  with pytest.raises(ValueError, match="modes"):
    evaluators.MultipleChoice(ScriptedPredict(data.tokenizer), data=data, modes=("letters",))


def test_tfds_split_gives_the_same_results_as_its_manifest(tmp_path):
  from stts_jax.data import tfds_builder
  manifest_cfg = helpers.make_mc_dataset(str(tmp_path), n=7, frames=2, size=42, corrupt=(4,))
  tfds_builder.build({"test": str(tmp_path / "test.jsonl")}, str(tmp_path / "tfds"))
  got = {}
  for fmt in ("manifest", "tfds"):
    cfg = dataclasses.replace(manifest_cfg, format=fmt)
    data = data_lib.EvalData(cfg, default_dataset.tiny_token_ids(), "test")
    ev = evaluators.from_name("multiple_choice", ScriptedPredict(data.tokenizer, wrong=(2,), gen_wrong=(5,)),
                              data=data)
    metrics = dict(ev.run(model=None))
    scored = sorted((r["example_id"], r["correct"]) for r in ev.details["records"]["generate"]
                    if r["status"] == "scored")
    got[fmt] = (metrics, scored, [s["example_id"] for s in ev.details["skipped_examples"]])
  assert got["tfds"] == got["manifest"]
  assert got["tfds"][0]["likelihood_accuracy"] == pytest.approx(5 / 6)
  assert got["tfds"][2] == ["ex4"]
