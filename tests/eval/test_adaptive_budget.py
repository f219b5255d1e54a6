"""Adaptive budget (issue 22): the bucket rule (pure, fast) and the grouped inference path."""
import json
import numpy as np
import jax.numpy as jnp
import pytest

from stts_jax import config as config_lib
from stts_jax.eval import adaptive_budget as ab
from stts_jax.eval import predictor as predictor_lib
from stts_jax.models import budget
from stts_jax.models import pruning
from tests.eval import helpers


def test_valid_buckets_at_frame_count():
  # 8 frames x 9 windows: at most 63 of 72 can go; 0.85 drops floor(61.2) = 61 -> valid.
  assert ab.valid_buckets(8, 9, (0.3, 0.5, 0.7, 0.85)) == (0.3, 0.5, 0.7, 0.85)
  # 4 frames x 9: 0.85 would be capped at 27 (floor(30.6) = 30 > 27): left out.
  assert ab.valid_buckets(4, 9, (0.85, 0.3, 0.5, 0.7)) == (0.3, 0.5, 0.7)
  # 2 frames x 1 window: 0.3 and 0.5 both drop... 0 and 1; 0.7 would need 1 too (duplicate) -> out.
  assert ab.valid_buckets(2, 1, (0.3, 0.5, 0.7)) == (0.3, 0.5)
  with pytest.raises(ValueError):
    ab.valid_buckets(1, 9, (0.3,))


@pytest.mark.parametrize("seed", range(12))
def test_chosen_bucket_keeps_every_window_above_threshold_and_is_largest(seed):
  rng = np.random.default_rng(seed)
  b, t, w = 6, int(rng.integers(2, 9)), int(rng.integers(1, 10))
  scores = rng.random((b, t, w)).round(1).astype(np.float32)   # coarse values: many ties
  frames = rng.integers(1, t + 1, size=b)
  frames[0] = t
  fm = np.arange(t)[None] < frames[:, None]
  thr = float(rng.choice([0.2, 0.5, 0.7, 0.9]))
  buckets = (0.0, 0.3, 0.5, 0.7, 0.85) if seed % 2 else ab.DEFAULT_BUCKETS
  try:
    valid = ab.valid_buckets(t, w, buckets)
  except ValueError:
    return
  rule = ab.AdaptiveRule(thr, buckets)
  ratios, sat = ab.choose_buckets(scores, fm, rule)
  above = (scores > thr) & fm[:, :, None]
  for i in range(b):
    assert ratios[i] in valid
    keep = np.asarray(pruning.budget_keep_mask_batched(jnp.asarray(scores[i:i + 1]), jnp.asarray(fm[i:i + 1]),
                                                       float(ratios[i])))[0]
    # "Never loses a kept window": every real window above the threshold is in the chosen keep mask.
    assert sat[i] == bool(np.all(keep[above[i]]))
    if 0.0 in buckets:
      assert sat[i]
    # Largest such bucket: the next valid bucket that drops more windows at this video's t loses one.
    for r in valid:
      if r > ratios[i] and budget.num_dropped(int(frames[i]), w, r) > budget.num_dropped(int(frames[i]), w,
                                                                                          float(ratios[i])):
        k2 = np.asarray(pruning.budget_keep_mask_batched(jnp.asarray(scores[i:i + 1]), jnp.asarray(fm[i:i + 1]),
                                                         r))[0]
        if sat[i]:
          assert not np.all(k2[above[i]])


def test_static_content_gets_the_largest_bucket():
  scores = np.zeros((2, 8, 9), np.float32)
  scores[1] = 1.0                                       # every window busy
  fm = np.ones((2, 8), bool)
  ratios, sat = ab.choose_buckets(scores, fm, ab.AdaptiveRule(0.5))
  assert ratios.tolist() == [0.85, 0.3] and sat.tolist() == [True, False]


@pytest.mark.parametrize("seed", range(8))
def test_mass_rule_keeps_the_target_share_of_score_mass_and_is_largest(seed):
  rng = np.random.default_rng(100 + seed)
  b, t, w = 6, int(rng.integers(2, 9)), int(rng.integers(1, 10))
  scores = (rng.random((b, t, w)) ** 3).round(2).astype(np.float32)   # skewed, with ties and zeros
  scores[1] = 0.0                                                      # no mass at all
  frames = rng.integers(1, t + 1, size=b)
  frames[0] = t
  fm = np.arange(t)[None] < frames[:, None]
  m = float(rng.choice([0.5, 0.8, 0.95, 1.0]))
  try:
    valid = ab.valid_buckets(t, w, ab.DEFAULT_BUCKETS)
  except ValueError:
    return
  ratios, sat = ab.choose_buckets(scores, fm, ab.AdaptiveRule(m, kind="mass"))

  def kept_share(i, r):
    keep = np.asarray(pruning.budget_keep_mask_batched(jnp.asarray(scores[i:i + 1]), jnp.asarray(fm[i:i + 1]), r))[0]
    cand = fm[i][:, None] & (np.arange(t) > 0)[:, None] & np.ones((1, w), bool)
    total = float(scores[i][cand].astype(np.float64).sum())
    return 1.0 if total == 0 else float(scores[i][cand & keep].astype(np.float64).sum()) / total

  for i in range(b):
    assert ratios[i] in valid
    assert sat[i] == (kept_share(i, float(ratios[i])) >= m - 1e-6)
    if i == 1 or frames[i] == 1:
      assert ratios[i] == valid[-1] and sat[i]       # nothing to lose: the largest bucket
    for r in valid:
      if sat[i] and r > ratios[i] and budget.num_dropped(int(frames[i]), w, r) > budget.num_dropped(
          int(frames[i]), w, float(ratios[i])):
        assert kept_share(i, r) < m + 1e-6


def test_rule_validation():
  with pytest.raises(ValueError, match="rule must be one of"):
    ab.AdaptiveRule(0.5, kind="entropy")
  with pytest.raises(ValueError, match="score-mass fraction"):
    ab.AdaptiveRule(1.5, kind="mass")
  assert ab.rule_for("heuristic", kind="mass").threshold == ab.DEFAULT_MASS


def test_budget_config_field():
  assert config_lib.STTSConfig().budget == "fixed"
  config_lib.STTSConfig(budget="adaptive").validate()
  with pytest.raises(ValueError, match="stts.budget"):
    config_lib.STTSConfig(budget="dynamic").validate()
  with pytest.raises(ValueError):
    ab.rule_for("random")
  # training and train-step sizing refuse it before building anything
  from configs import demo
  from stts_jax.train import main as train_main
  cfg = demo.get_config("runlocal=true")
  cfg.model.stts.budget = "adaptive"
  with pytest.raises(ValueError, match="model.stts.budget='adaptive' is for inference and evaluation only"):
    train_main.train_and_evaluate(cfg, "/nonexistent/never_created")
  with pytest.raises(ValueError, match="model.stts.budget='adaptive'"):
    train_main.aot_from_config(cfg)


def test_adaptive_outputs_independent_of_batch_mates_one_compile_per_bucket(stts_model):
  model = stts_model
  cfg = model.config
  t = 4
  # 5 rows: a batch shape no other test compiles, so the compile counts below are this test's own.
  a = helpers.video_batch(cfg, [4, 4, 3, 4, 4], t, seed=1)
  other = helpers.video_batch(cfg, [4, 2, 4, 4, 3], t, seed=2)
  mates = {k: np.concatenate([a[k][:1], other[k][1:]]) for k in a}   # video 0 with other batch-mates
  scores = ab.score_videos(model, a)
  cand = np.concatenate([scores[i, 1:int(a["frame_mask"][i].sum())].ravel() for i in range(5)])
  thr = next(q for q in np.quantile(cand, np.linspace(0.2, 0.8, 13))
             if len(set(ab.choose_buckets(scores, a["frame_mask"], ab.AdaptiveRule(float(q)))[0])) >= 2)
  pred = ab.AdaptivePredictor(predictor_lib.Predictor(max_new_tokens=3), ab.AdaptiveRule(float(thr)))
  before = ab.compile_counts()
  out_a = pred(model, a, generate=True)
  mid = ab.compile_counts()
  out_m = pred(model, mates, generate=True)
  after = ab.compile_counts()
  buckets = set(out_a["bucket"].tolist()) | set(out_m["bucket"].tolist())
  n_a = len(set(out_a["bucket"].tolist()))
  assert n_a >= 2
  # one compilation per (bucket, frame count), never again; bucket passes start from the score pass
  for stage in ("vision_scored", "prefill", "decode"):
    assert mid[stage] - before[stage] == n_a
    assert after[stage] - before[stage] == len(buckets)
  assert after["vision"] == before["vision"]
  assert after["score"] - before["score"] <= 1
  # video 0: same bucket, same kept windows, same answer and option scores whatever its batch-mates.
  assert out_a["bucket"][0] == out_m["bucket"][0]
  assert np.array_equal(out_a["keep_mask"][0], out_m["keep_mask"][0])
  assert np.array_equal(out_a["tokens"][0], out_m["tokens"][0])
  np.testing.assert_allclose(out_a["option_logprobs"][0], out_m["option_logprobs"][0], atol=1e-5)
  # each video's keep mask is the fixed budget at its bucket; nothing above the threshold is lost.
  w = cfg.windows_per_frame
  for i in range(5):
    n = int(a["frame_mask"][i].sum())
    assert out_a["vision_tokens"][i] == budget.num_kept(n, w, float(out_a["bucket"][i]))
    above = (out_a["adaptive_scores"][i] > thr) & a["frame_mask"][i][:, None]
    if out_a["budget_satisfied"][i]:
      assert np.all(out_a["keep_mask"][i][above])


def test_sweep_report_markdown_and_plot(tmp_path):
  from stts_jax.eval import adaptive_eval
  cam = lambda a, k, b=None: {"n": 2, "accuracy": a, "kept_windows": k, **({"mean_bucket": b} if b else {})}  # noqa: E731
  ci = {"mean": -0.01, "lo": -0.05, "hi": 0.02, "n_questions": 4, "n_pairs": 4}
  res = {"split": "val", "method": "stts", "num_examples": 4, "buckets": [0.3, 0.5], "batch_size": 2,
         "fixed": [{"ratio": 0.5, "accuracy": 0.75, "kept_windows": 36.0, "seconds_per_batch": {"vision": 0.01},
                    "by_camera": {"static": cam(1.0, 36.0), "cuts": cam(0.5, 36.0)}}],
         "adaptive": [{"threshold": 0.1, "accuracy": 0.75, "kept_windows": 30.0,
                       "seconds_per_bucket_pass": {"0.5": {"vision": 0.01, "prefill": 0.02}},
                       "by_camera": {"static": cam(1.0, 20.0, 0.7), "cuts": cam(0.5, 40.0, 0.3)}}],
         "matched": [{"fixed_ratio": 0.5, "fixed_kept": 36.0, "adaptive_threshold": 0.1, "adaptive_kept": 30.0,
                      "adaptive_minus_fixed": ci}],
         "vs_fixed_05": [{"threshold": 0.1, "kept_windows": 30.0, "fewer_windows_pct": 16.7,
                          "adaptive_minus_fixed05": ci}]}
  res["fixed"][0].update(correct={"q0": True, "q1": False}, per_example={"q0": {"vision_tokens": 36}})
  res["adaptive"][0].update(correct={"q0": False, "q1": True}, per_example={"q0": {"bucket": 0.5}})
  paths = adaptive_eval.write(res, str(tmp_path), {"provenance": {"commit": "x"}})
  md = open(tmp_path / "adaptive.md").read()
  assert "| fixed 0.5 | 75.0 | 36.0 |" in md and "-1.0 [-5.0, +2.0]" in md and "bucket 0.5" in md
  assert (tmp_path / "adaptive.png").stat().st_size > 0 and len(paths) == 4
  # per-question outcomes live in the gzipped sidecar only, and read() puts them back
  summary = json.load(open(tmp_path / "adaptive.json"))
  assert not any(k in p for part in ("fixed", "adaptive") for p in summary[part] for k in adaptive_eval.PER_EXAMPLE_KEYS)
  assert adaptive_eval.read(str(tmp_path)) == dict(res, provenance={"commit": "x"})


def test_operating_point_rule_and_the_committed_val_choices():
  """`operating_point`: of the points >= 25 % fewer windows than fixed 0.5, the highest lower bound;
  ties at 0.1 points go to the higher mean, then the smaller value; none qualifying -> None. On the
  committed val sweeps it gives the operating points docs/adaptive_budget.md reports."""
  import os
  from stts_jax.eval import adaptive_eval
  ci = lambda m, lo: {"mean": m, "lo": lo, "hi": m + 0.01}  # noqa: E731
  row = lambda t, fewer, m, lo: {"threshold": t, "kept_windows": 36 * (1 - fewer / 100),  # noqa: E731
                                 "fewer_windows_pct": fewer, "adaptive_minus_fixed05": ci(m, lo)}
  rows = [row(0.1, 20.0, 0.0, 0.0), row(0.2, 30.0, -0.01, -0.0301), row(0.3, 40.0, -0.005, -0.0299),
          row(0.4, 50.0, -0.005, -0.03), row(0.5, 60.0, -0.02, -0.05)]
  assert adaptive_eval.operating_point({"vs_fixed_05": rows})["threshold"] == 0.3   # 0.1: too few fewer windows
  assert adaptive_eval.operating_point({"vs_fixed_05": rows[:1]}) is None
  assert adaptive_eval.operating_point({"vs_fixed_05": rows}, min_fewer_pct=10.0)["threshold"] == 0.1
  root = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results", "adaptive_budget")
  for name, want in (("val_default_mixed_aux3", 0.045), ("val_hard_mixed_aux3", 0.03),
                     ("val_default_mixed_answer", 0.3), ("val_recolour_mixed_answer_mass", 0.1),
                     ("val_recolour_mixed600_aux0", 0.9995), ("val_recolour_mixed600_1600steps_aux0", 0.9995),
                     ("val_default_mixed_buckets6", 0.045), ("val_hard_mixed_buckets6", 0.055),
                     ("val_recolour_mixed1600_mass_3seeds", 0.3)):
    with open(os.path.join(root, name, "adaptive.json")) as f:
      assert adaptive_eval.operating_point(json.load(f))["threshold"] == want, name


def _seed_sweep(rng, kept_adaptive, n_q=40):
  """A sweep results dict (the layout of `adaptive_eval.sweep`) with random per-question outcomes."""
  ids = [f"q{i}" for i in range(n_q)]

  def point(key, val, kept, bucket=None):
    correct = {q: bool(rng.random() < 0.8) for q in ids}
    cams = {c: {"n": n_q // 2, "accuracy": float(rng.random()), "kept_windows": kept,
                **({"mean_bucket": bucket, "buckets": {f"{bucket:g}": n_q // 2}} if bucket else {})}
            for c in ("static", "cuts")}
    return {key: val, "accuracy": float(np.mean(list(correct.values()))), "kept_windows": kept, "scored": n_q,
            "ms_per_video": float(rng.uniform(5, 10)), "by_camera": cams, "correct": correct}
  return {"split": "test", "method": "stts", "rule": "threshold", "metric": "multiple_choice/likelihood_accuracy",
          "buckets": [0.3, 0.5, 0.7], "thresholds": [0.02, 0.05], "num_examples": n_q, "batch_size": 4,
          "fixed": [point("ratio", 0.3, 51.0), point("ratio", 0.5, 36.0)],
          "adaptive": [point("threshold", 0.02, kept_adaptive[0], 0.5), point("threshold", 0.05, kept_adaptive[1], 0.7)]}


def test_pool_over_seeds_means_matched_points_and_pooled_bootstrap(tmp_path):
  from stts_jax.eval import adaptive_eval
  from stts_jax.experiments import stats
  rng = np.random.default_rng(0)
  # seed 0 alone would match fixed 0.5 with threshold 0.02 (35 <= 36); the seed mean (37) is above 36,
  # so the pooled match is threshold 0.05
  runs = [_seed_sweep(rng, (35.0, 20.0)), _seed_sweep(rng, (39.0, 24.0))]
  res = adaptive_eval.pool(runs, [0, 1], resamples=2000)
  assert res["seeds"] == [0, 1] and res["num_examples"] == 40
  f05 = res["fixed"][1]
  assert f05["accuracy"] == pytest.approx((runs[0]["fixed"][1]["accuracy"] + runs[1]["fixed"][1]["accuracy"]) / 2)
  assert res["adaptive"][0]["kept_windows"] == 37.0 and res["adaptive"][0]["by_camera"]["static"]["buckets"] == {"0.5": 40}
  m05 = next(m for m in res["matched"] if m["fixed_ratio"] == 0.5)
  assert m05["adaptive_threshold"] == 0.05 and m05["adaptive_kept"] == 22.0
  want = stats.paired_bootstrap([r["adaptive"][1]["correct"] for r in runs], [r["fixed"][1]["correct"] for r in runs],
                                [0, 1], resamples=2000)
  assert m05["adaptive_minus_fixed"] == want["pooled"] and m05["adaptive_minus_fixed_per_seed"] == want["per_seed"]
  assert [v["threshold"] for v in res["vs_fixed_05"]] == [0.02, 0.05]
  assert res["vs_fixed_05"][1]["fewer_windows_pct"] == pytest.approx(100 * (1 - 22.0 / 36.0))
  adaptive_eval.write(res, str(tmp_path))
  md = open(tmp_path / "adaptive.md").read()
  assert "Seeds [0, 1] pooled" in md and "| per seed |" in md
  assert "nan" not in md and "Seconds per pass" not in md      # no pass timings pooled
  # the operating point is chosen on val sweeps only
  assert "Operating point" not in md
  assert "Operating point (`adaptive_eval.operating_point`" in adaptive_eval.markdown(dict(res, split="val"))
  assert (tmp_path / "adaptive.png").stat().st_size > 0


def test_pool_refuses_sweeps_of_different_comparisons():
  from stts_jax.eval import adaptive_eval
  rng = np.random.default_rng(1)
  a, b = _seed_sweep(rng, (35.0, 20.0)), _seed_sweep(rng, (35.0, 20.0))
  b["thresholds"] = [0.02, 0.06]
  with pytest.raises(ValueError, match="'thresholds'"):
    adaptive_eval.pool([a, b], [0, 1])
  b = _seed_sweep(rng, (35.0, 20.0))
  del b["adaptive"][0]["correct"]
  with pytest.raises(ValueError, match="per-question outcomes"):
    adaptive_eval.pool([a, b], [0, 1])
  with pytest.raises(ValueError, match="2 sweeps for 1 seeds"):
    adaptive_eval.pool([a, a], [0])


def test_grouped_passes_match_per_batch_results_and_fill_bucket_passes(stts_model):
  model = stts_model
  cfg = model.config
  t, b = 4, 6   # 6 rows: a batch shape no other test compiles, so the compile counts are this test's own
  batches = []
  for k, frames in enumerate(([4, 4, 3, 4, 2, 4], [4, 3, 4, 4, 4, 1], [4, 4, 2, 4, 4, 4])):
    batch = helpers.video_batch(cfg, frames, t, seed=10 + k)
    batch["example_id"] = np.arange(b) + b * k
    batch["skipped"] = np.zeros(b, bool)
    batches.append(batch)
  batches[1]["valid"][3], batches[1]["skipped"][3] = False, True   # a row the pipeline skipped
  batches[2]["valid"][4:] = False                                  # the last batch's padding
  scores = np.concatenate([ab.score_videos(model, x) for x in batches])
  fm = np.concatenate([x["frame_mask"] for x in batches])
  cand = np.concatenate([scores[i, 1:int(fm[i].sum())].ravel() for i in range(len(fm))])
  thr = next(float(q) for q in np.quantile(cand, np.linspace(0.2, 0.8, 13))
             if len(set(ab.choose_buckets(scores, fm, ab.AdaptiveRule(float(q)))[0])) >= 2)
  rule = ab.AdaptiveRule(thr)
  per_batch = ab.AdaptivePredictor(predictor_lib.Predictor(max_new_tokens=3), rule)
  expected = {}
  for x in batches:
    out = per_batch(model, x, generate=True)
    for i in np.flatnonzero(x["valid"]):
      expected[int(x["example_id"][i])] = {k: v[i] for k, v in out.items() if np.ndim(v) >= 1 and len(v) == b}
  grouped = ab.AdaptivePredictor(predictor_lib.Predictor(max_new_tokens=3), rule, group_batches=True)
  before = ab.compile_counts()
  passes = list(grouped.grouped_passes(model, iter(batches), generate=True))
  after = ab.compile_counts()
  # one bookkeeping pass per input batch (no predictions, every row invalid, the skipped row kept)
  book = [(x, p) for x, p, consumed in passes if consumed]
  assert len(book) == 3 and all(not p and not x["valid"].any() for x, p in book)
  assert book[1][0]["skipped"][3]
  got, per_bucket = {}, {}
  for x, p, consumed in passes:
    if consumed:
      continue
    assert len(set(p["bucket"].tolist())) == 1 and x["patches"].shape == batches[0]["patches"].shape
    per_bucket.setdefault(float(p["bucket"][0]), []).append(int(x["valid"].sum()))
    for i in np.flatnonzero(x["valid"]):
      assert int(x["example_id"][i]) not in got
      got[int(x["example_id"][i])] = {k: v[i] for k, v in p.items() if np.ndim(v) >= 1 and len(v) == b}
  # every valid video exactly once, with the results it gets in its own batch
  assert set(got) == set(expected) and len(got) == 15
  for q, e in expected.items():
    assert got[q]["bucket"] == e["bucket"] and got[q]["vision_tokens"] == e["vision_tokens"]
    assert np.array_equal(got[q]["keep_mask"], e["keep_mask"]) and np.array_equal(got[q]["tokens"], e["tokens"])
    np.testing.assert_allclose(got[q]["option_logprobs"], e["option_logprobs"], atol=1e-5)
  # bucket passes are full but for each bucket's last one: ceil(n_b / B) passes per bucket
  assert len(per_bucket) >= 2
  for counts in per_bucket.values():
    assert all(c == b for c in counts[:-1]) and 1 <= counts[-1] <= b
    assert len(counts) == -(-sum(counts) // b)
  for stage in predictor_lib.STAGES + ("vision_scored",):
    assert after[stage] - before[stage] == 0       # per-batch calls above compiled every bucket already
  assert after["score"] == before["score"]
  assert after["rows"] - before["rows"] <= 2       # the row split and stack, once for this batch shape
  again = ab.AdaptivePredictor(predictor_lib.Predictor(max_new_tokens=3), rule, group_batches=True)
  list(again.grouped_passes(model, iter(batches), generate=True))
  assert ab.compile_counts() == after
  assert len(grouped.score_times) == 3 and grouped.total_seconds() > 0
  assert sum(len(ts["vision"]) for ts in grouped.bucket_times.values()) == sum(len(c) for c in per_bucket.values())


@pytest.mark.slow   # two full sweeps
def test_sweep_grouped_and_per_batch_agree_per_question(tmp_path, stts_model):
  from stts_jax.data import default_dataset
  from stts_jax.eval import adaptive_eval
  from stts_jax.eval.config import EvalConfig
  data_cfg = helpers.make_mc_dataset(str(tmp_path), n=9, frames=4, size=126, corrupt=(4,))
  eval_cfg = EvalConfig(split="test", ratios=(0.3, 0.5), mc_modes=("likelihood",), max_new_tokens=2).validate()
  assert stts_model.config.tokens == default_dataset.tiny_token_ids()
  kw = dict(method="stts", thresholds=(0.3, 0.5, 0.55, 0.7), resamples=200)
  grouped = adaptive_eval.sweep(stts_model, data_cfg, eval_cfg, **kw)
  per_batch = adaptive_eval.sweep(stts_model, data_cfg, eval_cfg, group_batches=False, **kw)
  assert grouped["group_batches"] and not per_batch["group_batches"]
  assert grouped["num_examples"] == 9 and all(p["scored"] == 8 for p in grouped["adaptive"])
  for g, p in zip(grouped["adaptive"], per_batch["adaptive"]):
    assert g["correct"] == p["correct"] and g["per_example"] == p["per_example"]
    assert g["kept_windows"] == p["kept_windows"] and g["ms_per_video"] > 0
    # grouping never needs more bucket passes than one per (batch, bucket present)
    assert sum(g["bucket_passes"].values()) <= sum(p["bucket_passes"].values())
    assert not any(g["compilations"].values())   # the warm-up compiled every bucket
  assert any(len(set(q["bucket"] for q in p["per_example"].values())) >= 2 for p in grouped["adaptive"])
  assert all(f["ms_per_video"] > 0 for f in grouped["fixed"])
  md = adaptive_eval.markdown(grouped)
  assert "ms / video" in md and "grouped by bucket across batches" in md


@pytest.mark.slow   # both bucket paths compiled per bucket
def test_bucket_passes_from_the_score_pass_equal_passes_from_the_patches(stts_model):
  """Reusing the score pass's ViT (up to the soft block) changes no output: against bucket passes
  that start from the patches, and against a plain fixed-ratio call at each video's bucket. Bucket
  0.0 (unpruned) starts from the patches either way."""
  from stts_jax.eval import generate as gen_lib
  model = stts_model
  t = 4
  a = helpers.video_batch(model.config, [4, 4, 3, 4, 2, 4, 4], t, seed=3)   # 7 rows: this test's own shape
  a["option_ids"] = np.tile(np.arange(30, 34, dtype=np.int32), (7, 1))
  scores = ab.score_videos(model, a)
  cand = np.concatenate([scores[i, 1:int(a["frame_mask"][i].sum())].ravel() for i in range(7)])
  buckets = (0.0, 0.3, 0.5, 0.7)
  thr = next(float(q) for q in np.quantile(cand, np.linspace(0.1, 0.9, 17))
             if len(set(ab.choose_buckets(scores, a["frame_mask"], ab.AdaptiveRule(float(q), buckets))[0])) >= 3)
  rule = ab.AdaptiveRule(thr, buckets)
  reuse = ab.AdaptivePredictor(predictor_lib.Predictor(max_new_tokens=3), rule)
  plain = ab.AdaptivePredictor(predictor_lib.Predictor(max_new_tokens=3), rule, reuse_scored=False)
  out_r, out_p = reuse(model, a), plain(model, a)
  assert len(set(out_r["bucket"].tolist())) >= 3
  for k in ("bucket", "keep_mask", "tokens", "num_kept", "vision_tokens", "budget_satisfied", "adaptive_scores"):
    assert np.array_equal(out_r[k], out_p[k]), k
  np.testing.assert_allclose(out_r["option_logprobs"], out_p["option_logprobs"], atol=1e-5)
  np.testing.assert_allclose(out_r["scores"], out_p["scores"], atol=1e-6)
  # pruned buckets: a gather stage plus the rest of the ViT; bucket 0.0 runs the full vision stage
  assert all(("gather" in ts) == (r > 0) for r, ts in reuse.bucket_times.items())
  assert not any("gather" in ts for ts in plain.bucket_times.values())
  fixed = predictor_lib.Predictor(max_new_tokens=3)
  for r in sorted(set(out_r["bucket"].tolist())):
    rows = out_r["bucket"] == r
    ref = fixed(gen_lib.model_variant(model, ratio=r, budget="fixed"), a, generate=True)
    assert np.array_equal(out_r["keep_mask"][rows], ref["keep_mask"][rows])
    assert np.array_equal(out_r["tokens"][rows], ref["tokens"][rows])
    np.testing.assert_allclose(out_r["option_logprobs"][rows], ref["option_logprobs"][rows], atol=1e-5)


@pytest.mark.slow   # every bucket compiled twice (mesh and single device)
@pytest.mark.multidevice
def test_data_parallel_adaptive_passes_equal_single_device(stts_model):
  """On a data-parallel mesh (4 of the 8 virtual devices) the score pass, the buckets and every bucket
  pass, per batch and grouped across batches, give each video the single-device results; a
  second sharded run compiles nothing new."""
  import jax
  from stts_jax.parallel import mesh as mesh_lib
  from stts_jax.parallel import sharding
  from stts_jax.parallel.config import MeshConfig
  model = stts_model
  t, b = 4, 8
  batches = []
  for k, frames in enumerate(([4, 4, 3, 4, 2, 4, 1, 4], [4, 3, 4, 4, 4, 1, 2, 4])):
    batch = helpers.video_batch(model.config, frames, t, seed=20 + k)
    batch["example_id"] = np.arange(b) + b * k
    batch["option_ids"] = np.tile(np.arange(30, 34, dtype=np.int32), (b, 1))
    batches.append(batch)
  batches[1]["valid"][6:] = False
  scores = np.concatenate([ab.score_videos(model, x) for x in batches])
  fm = np.concatenate([x["frame_mask"] for x in batches])
  cand = np.concatenate([scores[i, 1:int(fm[i].sum())].ravel() for i in range(len(fm))])
  rule = next(ab.AdaptiveRule(float(q)) for q in np.quantile(cand, np.linspace(0.2, 0.8, 13))
              if len(set(ab.choose_buckets(scores, fm, ab.AdaptiveRule(float(q)))[0])) >= 2)
  mesh_cfg = MeshConfig(data=-1, fsdp=1, tensor=1)
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:4])
  sharded = lambda **kw: ab.AdaptivePredictor(   # noqa: E731
      predictor_lib.Predictor(max_new_tokens=3, mesh=mesh, rules=sharding.make_rules(mesh_cfg)), rule, **kw)
  single = lambda **kw: ab.AdaptivePredictor(predictor_lib.Predictor(max_new_tokens=3), rule, **kw)   # noqa: E731
  keys = ("bucket", "keep_mask", "tokens", "num_kept", "vision_tokens", "budget_satisfied")

  def by_example(pred, grouped):
    out = {}
    if grouped:
      passes = [(x, p) for x, p, consumed in pred.grouped_passes(model, iter(batches)) if not consumed]
    else:
      passes = [(x, pred(model, x, step=i)) for i, x in enumerate(batches)]
    for x, p in passes:
      for i in np.flatnonzero(x["valid"]):
        out[int(x["example_id"][i])] = {k: p[k][i] for k in keys + ("option_logprobs", "adaptive_scores")}
    return out

  for grouped in (False, True):
    ref = by_example(single(group_batches=grouped), grouped)
    got = by_example(sharded(group_batches=grouped), grouped)
    assert set(got) == set(ref) and len(got) == 14
    assert len({float(r["bucket"]) for r in ref.values()}) >= 2
    for q in ref:
      for k in keys:
        assert np.array_equal(got[q][k], ref[q][k]), (grouped, q, k)
      np.testing.assert_allclose(got[q]["option_logprobs"], ref[q]["option_logprobs"], atol=1e-5)
      np.testing.assert_allclose(got[q]["adaptive_scores"], ref[q]["adaptive_scores"], atol=1e-6)
  before = ab.compile_counts()
  by_example(sharded(group_batches=True), True)
  by_example(sharded(group_batches=False), False)
  assert ab.compile_counts() == before


def test_adaptive_refuses_several_processes(monkeypatch):
  import jax
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="--budget adaptive runs in one process"):
    ab.AdaptivePredictor(predictor_lib.Predictor(max_new_tokens=3), ab.AdaptiveRule(0.5))


@pytest.mark.slow   # two sweeps, every bucket compiled on the mesh and on one device
@pytest.mark.multidevice
def test_sweep_on_a_mesh_equals_single_device_per_question(tmp_path, stts_model):
  import jax
  from stts_jax.eval import adaptive_eval
  from stts_jax.eval.config import EvalConfig
  from stts_jax.parallel import mesh as mesh_lib
  from stts_jax.parallel import sharding
  from stts_jax.parallel.config import MeshConfig
  data_cfg = helpers.make_mc_dataset(str(tmp_path), n=7, frames=4, size=126, corrupt=(2,))
  eval_cfg = EvalConfig(split="test", ratios=(0.5,), mc_modes=("likelihood",), max_new_tokens=2).validate()
  kw = dict(method="stts", thresholds=(0.3, 0.55), resamples=50)
  mesh_cfg = MeshConfig(data=-1, fsdp=1, tensor=1)
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:2])
  single = adaptive_eval.sweep(stts_model, data_cfg, eval_cfg, **kw)
  sharded = adaptive_eval.sweep(stts_model, data_cfg, eval_cfg, mesh=mesh, rules=sharding.make_rules(mesh_cfg), **kw)
  assert single["mesh"] is None and sharded["mesh"]["data"] == 2
  for s, p in zip(single["fixed"] + single["adaptive"], sharded["fixed"] + sharded["adaptive"]):
    assert s["scored"] == p["scored"] == 6
    assert s["correct"] == p["correct"] and s["per_example"] == p["per_example"]
