"""Benchmark runner: one compilation per part and cell, XLA vs analytic FLOPs, report arithmetic."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from stts_jax.bench import batches
from stts_jax.bench import costs
from stts_jax.bench import parts
from stts_jax.bench import report
from stts_jax.bench import runner
from stts_jax.bench import timing
from stts_jax.bench import xla_count
from stts_jax.bench.config import BenchConfig
from stts_jax.bench.runner import CellResult, PartResult
from stts_jax.models import video_forward
from stts_jax.testing import tiny
from stts_jax.train.config import OptimConfig, TrainConfig

FRAMES = 4
TRAIN = TrainConfig(tensorboard=False, progress_bar=False, optim=OptimConfig(learning_rate=1e-3)).validate()


def _tiny():
  return tiny.tiny_model_config(method="stts")


def test_video_batch_layout():
  cfg = _tiny()
  b = batches.video_batch(cfg, batch_size=2, num_frames=FRAMES, index=1)
  s = batches.prompt_length(FRAMES, cfg.windows_per_frame)
  assert b["patches"].shape == (2, FRAMES, cfg.vit.num_patches, cfg.vit.patch_dim)
  assert b["patches"].dtype == np.uint8 and b["patches"].std() > 5          # real frames, not blank
  assert b["input_ids"].shape == (2, s) and b["token_mask"].all()            # exactly the prompt, no padding
  assert (b["input_ids"] == cfg.tokens.image_patch).sum(1).tolist() == [FRAMES * cfg.windows_per_frame] * 2
  assert (b["input_ids"] == cfg.tokens.frame_start).sum(1).tolist() == [FRAMES] * 2
  assert b["loss_mask"].sum(1).tolist() == [2, 2]
  np.testing.assert_array_equal(b["target_ids"][:, :-1], b["input_ids"][:, 1:])
  other = batches.video_batch(cfg, batch_size=2, num_frames=FRAMES, index=2)
  assert not np.array_equal(other["patches"], b["patches"])


def test_cell_config_baseline_and_rows():
  cfg = _tiny()
  base = runner.cell_model_config(cfg, 8, 0.0, "typical")
  assert base.stts.method == "none" and not base.stts.prunes
  pruned = runner.cell_model_config(cfg, 8, 0.5, "typical")
  assert pruned.stts.method == "stts" and pruned.stts.ratio == 0.5
  assert pruned.stts.num_rows == 5                     # ceil(36 kept / 9) = 4 rows + ceil(8 / 8) spare
  assert runner.cell_model_config(cfg, 8, 0.5, "bound").stts.num_rows is None
  assert runner.cell_model_config(cfg, 8, 0.5, "min").stts.num_rows == 4
  assert runner.cell_model_config(cfg, 8, 0.5, "fit").stts.num_rows == 8          # before fitting: T
  assert runner.cell_model_config(cfg, 8, 0.5, "fit", 2).stts.num_rows == 4       # never below the minimum
  assert runner.cell_model_config(cfg, 8, 0.5, "fit", 6).stts.num_rows == 6
  assert runner.cell_model_config(cfg, 8, 0.5, "heldout", 6).stts.num_rows == 6
  assert runner.cell_model_config(cfg, 8, 0.5, "heldout", packing="always").stts.packing == "always"
  # rows reaching T: the late ViT blocks run per frame unless packing is forced
  assert runner.late_vit_path(runner.cell_model_config(cfg, 8, 0.5, "fit", 8), 8) == "per_frame"
  assert runner.late_vit_path(runner.cell_model_config(cfg, 8, 0.5, "fit", 8, packing="always"), 8) == "packed"
  assert runner.late_vit_path(runner.cell_model_config(cfg, 8, 0.5, "fit", 6), 8) == "packed"
  assert runner.late_vit_path(base, 8) == "all"
  assert BenchConfig().rows == "heldout"       # the headline never sizes rows on the timed batches


def _forward_flops(cfg, frames, seq_len):
  """XLA's count of forward_video (unrolled copy, packed branch) for one sample."""
  graphdef, state = xla_count.abstract_model_state(runner._model_fn(dataclasses.replace(cfg, scan_layers=False), 0))
  batch = batches.video_batch(cfg, batch_size=1, num_frames=frames, index=0)
  fields = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items() if k != "timestamps"}
  fwd = lambda s, b: video_forward.forward_video(nnx.merge(graphdef, s), b).logits
  return xla_count.lowered_flops(fwd, state, fields)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_analytic_forward_flops_within_10_percent_of_xla(ratio):
  cfg = runner.cell_model_config(_tiny(), FRAMES, ratio, "typical")
  seq_len = batches.prompt_length(FRAMES, cfg.windows_per_frame)
  xla = _forward_flops(cfg, FRAMES, seq_len)
  analytic = costs.forward(cfg, FRAMES, seq_len).total
  print(f"ratio {ratio}: XLA {xla:.4e}, analytic {analytic:.4e}, XLA/analytic {xla / analytic:.3f}")
  assert abs(xla / analytic - 1.0) <= 0.10


def test_taken_branch_counts_the_packed_path_not_the_fallback():
  cfg = runner.cell_model_config(_tiny(), FRAMES, 0.5, "min")
  seq_len = batches.prompt_length(FRAMES, cfg.windows_per_frame)
  graphdef, state = xla_count.abstract_model_state(runner._model_fn(dataclasses.replace(cfg, scan_layers=False), 0))
  shapes = (jax.ShapeDtypeStruct((1, FRAMES, cfg.vit.num_patches, cfg.vit.patch_dim), np.uint8),
            jax.ShapeDtypeStruct((1, FRAMES), np.bool_))
  fn = parts.vision_fn(graphdef, parts.num_slots(cfg, FRAMES))
  packed = xla_count.lowered_flops(fn, state, *shapes)
  raw = xla_count.lowered_flops(fn, state, *shapes, taken_branch=False)      # XLA: max of both branches
  expected = costs.vision(costs.forward(cfg, FRAMES, seq_len))
  # XLA counts a cond as its costlier branch. The dense fallback runs its frames in a `lax.map` of
  # `num_rows`-frame chunks whose body XLA counts once, so it reads about the packed path's size: the
  # taken-branch count can only be <= the raw one, and it must match the analytic packed estimate.
  assert raw >= packed
  assert abs(packed / expected - 1.0) <= 0.10


def test_one_compilation_per_part_across_batches_with_different_keep_patterns():
  cfg = _tiny()
  bench = BenchConfig(frames=(FRAMES,), ratios=(0.5,), parts=("vision",), warmup=0, repeats=2, num_batches=3,
                      xla_flops=False).validate()
  bench = dataclasses.replace(bench, rows="fit")
  cell = runner.run_cell(cfg, TRAIN, bench, FRAMES, 0.5)
  assert cell.num_rows == max(cell.rows_needed) and all(cell.packed)     # "fit": every batch packs
  part = cell.parts["vision"]
  assert part.compiles == 1                               # measured with a compile listener
  assert len(part.timing.seconds) == 2                    # timed calls rotate through the batches ...
  assert cell.keep_patterns == 3                          # ... whose keep masks all differ
  assert cell.kept_windows == FRAMES * 9 - 18 and cell.llm_len == cell.seq_len - 18
  assert len(cell.packed) == 3 and len(cell.rows_needed) == 3


@pytest.mark.slow   # benchmark cells with and without packing
def test_heldout_rows_come_from_other_batches_and_compare_packing_adds_the_packed_cell():
  cfg = _tiny()
  bench = BenchConfig(frames=(FRAMES,), ratios=(0.3,), parts=("vision",), warmup=0, repeats=1, num_batches=2,
                      xla_flops=False, rows="heldout", heldout_batches=2, compare_packing=True,
                      interleave_rounds=1).validate()
  cells = runner.run_grid(cfg, TRAIN, bench, progress=lambda _: None)
  pruned = runner.cell_model_config(cfg, FRAMES, 0.3, "fit")
  graphdef, state = runner._init_model(runner._model_fn(pruned, bench.seed), bench.seed)
  held = [batches.video_batch(pruned, batch_size=1, num_frames=FRAMES, index=i) for i in (2, 3)]
  cell = cells[1]
  assert cell.rows_policy == "heldout" and cell.num_rows == runner.fitted_rows(pruned, graphdef, state, held, FRAMES)
  # at ratio 0.3 every frame keeps more than half its windows: as many rows as frames, so the model
  # runs the late blocks per frame, and the comparison cell packs them anyway
  assert cell.num_rows == FRAMES and cell.late_vit == "per_frame" and cell.variant == ""
  assert [(c.ratio, c.late_vit, c.variant) for c in cells] == [
      (0.0, "all", ""), (0.3, "per_frame", ""), (0.3, "packed", "packing=always")]
  rows = report.summary_rows(cells)
  assert rows[2]["variant"] == "packing=always" and rows[2]["vision_speedup"] > 0
  assert [c["variant"] for c in report.checks(rows, parts=("vision",))["fallback"]["cells"]] == ["", "packing=always"]


@pytest.mark.slow
def test_interleaved_rounds_retime_every_cell_without_recompiling():
  """interleave_rounds: cells of a frame count are re-timed in rounds; each part's timing becomes the
  pooled round calls (count = rounds x its per-round share), with no new compilation."""
  bench = BenchConfig(frames=(FRAMES,), ratios=(0.5,), parts=("vision", "train"), warmup=1, repeats=4,
                      num_batches=2, xla_flops=False, interleave_rounds=2).validate()
  seen = []
  with timing.CompileCounter() as cc:
    cells = runner.run_grid(_tiny(), TRAIN, bench, progress=seen.append)
  compiles_in_grid = cc.count
  assert [c.ratio for c in cells] == [0.0, 0.5]
  for c in cells:
    assert set(c.parts) == {"vision", "train"}
    for p in c.parts.values():
      assert p.compiles == 1 and p.timing.warmup == 0
      assert len(p.timing.seconds) == 4 and min(p.timing.seconds) > 0   # 2 rounds x 4 / 2 calls
  assert any("interleaved (2 rounds)" in line for line in seen)
  # the rounds themselves compiled nothing: a second pass over the same timers adds no compilation
  timers = [{}, {}]
  again = [runner.run_cell(_tiny(), TRAIN, bench, FRAMES, r, timers[i]) for i, r in enumerate((0.0, 0.5))]
  assert all(set(t) == {"vision", "train"} for t in timers)
  with timing.CompileCounter() as cc2:
    runner.interleave(again, timers, 1)
  assert cc2.count == 0 and compiles_in_grid > 0
  assert len(again[1].parts["train"].timing.seconds) == 4
  # train steps counted (1 warm-up + 4 first pass + 4 in the grid's 2 rounds), none fell back ...
  assert [(c.train_steps, c.train_fallback_steps) for c in cells] == [(9, 0), (9, 0)]
  # ... because the timed step has every learning rate at 0: the weights the rows were fitted to stay
  steps = timers[1]["train"]
  before = [np.asarray(x) for x in jax.tree.leaves(steps.state["model"])]   # copies: the state is donated
  steps(0)
  after = [np.asarray(x) for x in jax.tree.leaves(steps.state["model"])]
  assert len(before) > 10 and all(np.array_equal(a, b) for a, b in zip(before, after))
  assert float(steps.outputs[-1]) == 0.0
  with pytest.raises(ValueError, match="interleave_rounds"):
    BenchConfig(interleave_rounds=-1).validate()


@pytest.mark.slow
def test_run_cell_all_parts_compile_once_and_report():
  bench = BenchConfig(frames=(FRAMES,), ratios=(0.5,), warmup=0, repeats=1, num_batches=2, decode_tokens=2,
                      xla_flops=True).validate()
  cells = [runner.run_cell(_tiny(), TRAIN, bench, FRAMES, r) for r in (0.0, 0.5)]
  assert set(cells[1].parts) == {"vision", "prefill", "decode", "overhead", "train"}
  assert all(p.compiles == 1 for c in cells for p in c.parts.values())
  rows = report.summary_rows(cells)
  chk = report.checks(rows)
  assert chk["one_compile_per_part"]["ok"]
  devs = {(r["ratio"], k): r[k] for r in rows for k in r if k.endswith("_xla_over_analytic") and r[k] is not None}
  assert chk["xla_vs_analytic"]["ok"], devs
  assert abs(rows[1]["overhead_xla_over_analytic"] - 1.0) < 0.15      # scorer matmuls dominate even here


def _part(name, seconds, flops, per_call=1):
  t = timing.Timing(name, (seconds * per_call,), warmup=0)
  return PartResult(name, t, per_call, 1, 0.0, flops, flops, flops, timing.MemoryStats(1, 0, 2, 0, 0))


def _cell(frames, ratio, secs, flops, variant=""):
  return CellResult(frames=frames, ratio=ratio, method="stts" if ratio else "none", batch_size=1, seq_len=100,
                    llm_len=80, num_rows=None, rows_needed=[3] if ratio else [], packed=[True] if ratio else [],
                    kept_windows=10, keep_patterns=1, parts={k: _part(k, secs[k], flops[k]) for k in secs},
                    late_vit="packed" if ratio else "all", variant=variant)


def test_report_speedups_efficiency_overhead_and_checks():
  base = {"vision": 1.0, "prefill": 1.0, "train": 4.0}
  fl = {"vision": 10.0, "prefill": 10.0, "train": 40.0}
  cells = [
      _cell(8, 0.0, base, fl),
      _cell(8, 0.5, {"vision": 0.8, "prefill": 0.5, "train": 2.5, "overhead": 0.05},
            {"vision": 7.0, "prefill": 5.0, "train": 25.0, "overhead": 1.0}),
      _cell(16, 0.0, {k: 2 * v for k, v in base.items()}, {k: 2 * v for k, v in fl.items()}),
      _cell(16, 0.5, {"vision": 1.5, "prefill": 0.8, "train": 4.0, "overhead": 0.2},
            {"vision": 14.0, "prefill": 8.0, "train": 40.0, "overhead": 2.0}),
  ]
  rows = report.summary_rows(cells)
  r8, r16 = rows[1], rows[3]
  assert r8["train_speedup"] == pytest.approx(4.0 / 2.5)
  assert r8["train_flops_ratio"] == pytest.approx(40 / 25)
  assert r8["train_efficiency"] == pytest.approx(1.0)
  assert r8["ttft_speedup"] == pytest.approx(2.0 / 1.3)
  assert r8["ttft_flops_ratio"] == pytest.approx(20 / 12)
  assert r8["overhead_share"] == pytest.approx(0.05 / 2.5)
  assert r16["overhead_share"] == pytest.approx(0.05)
  parts = ("vision", "prefill", "overhead", "train")
  chk = report.checks(rows, parts=parts)
  assert chk["train_efficiency"]["ok"]                       # 1.0 and 8/4 / (80/40) = 1.0
  assert chk["train_speedup_grows"]["values"] == pytest.approx([1.6, 2.0])
  assert chk["train_speedup_grows"]["ok"]
  assert not chk["overhead_share_at_largest_frames"]["ok"]   # 5% > 3% at 16 frames
  assert chk["one_compile_per_part"]["ok"] and chk["never_slower"]["ok"]
  assert report.failed(chk) == ["overhead_share_at_largest_frames"]
  assert chk["fallback"]["ok"] is None and all(c["train_fallback_rate"] == 0 for c in chk["fallback"]["cells"])
  cells[3].train_steps, cells[3].train_fallback_steps = 8, 2   # two timed train steps ran the dense ViT
  rows = report.summary_rows(cells)
  assert rows[3]["train_fallback_steps"] == 2 and rows[3]["train_fallback_rate"] == 0.25
  assert report.checks(rows, parts=parts)["fallback"]["cells"][1]["train_fallback_rate"] == 0.25
  # every pruned cell and ratio must stay within 3% of unpruned: a slower cell at another ratio fails
  slow = cells + [_cell(8, 0.3, {"vision": 1.0, "prefill": 0.9, "train": 4.4, "overhead": 0.05},
                            {"vision": 9.0, "prefill": 9.0, "train": 36.0, "overhead": 1.0})]
  never = report.checks(report.summary_rows(slow), parts=parts)["never_slower"]
  assert not never["ok"] and any(c["ratio"] == 0.3 and c["train_speedup"] < 0.97 for c in never["cells"])
  # not interleaved: the claim cannot be trusted, so it fails
  assert not report.checks(rows, parts=parts, interleaved=False)["never_slower"]["ok"]
  # a comparison cell (compare_packing) is reported but never checked
  extra = cells + [_cell(16, 0.5, {"vision": 9.0, "prefill": 9.0, "train": 40.0, "overhead": 0.2},
                         {"vision": 14.0, "prefill": 8.0, "train": 40.0, "overhead": 2.0}, variant="packing=always")]
  extra_rows = report.summary_rows(extra)
  assert extra_rows[-1]["train_speedup"] == pytest.approx(8 / 40)
  assert report.checks(extra_rows, parts=parts)["never_slower"]["ok"]


def test_markdown_table_lists_every_cell_with_its_numbers():
  base = {"vision": 1.0, "prefill": 1.0, "train": 4.0}
  fl = {"vision": 10.0, "prefill": 10.0, "train": 40.0}
  cells = [_cell(8, 0.0, base, fl),
           _cell(8, 0.5, {"vision": 0.8, "prefill": 0.5, "train": 2.5, "overhead": 0.05},
                 {"vision": 7.0, "prefill": 5.0, "train": 25.0, "overhead": 1.0}),
           _cell(8, 0.5, {"vision": 0.9, "prefill": 0.5, "train": 5.0, "overhead": 0.05},
                 {"vision": 7.0, "prefill": 5.0, "train": 25.0, "overhead": 1.0}, variant="packing=always")]
  table = report.markdown_table(report.summary_rows(cells)).splitlines()
  assert len(table) == 2 + len(cells)
  assert all(line.count("|") == table[0].count("|") for line in table)
  pruned = table[3].split(" | ")
  assert pruned[6:10] == ["2500.0", "1.60x", "1.60x", "1.00"]        # train ms, speedup, FLOP ratio, efficiency
  assert "packing=always" in table[4] and "0.80x" in table[4]           # a slower cell is shown, not dropped


def test_a_check_whose_values_are_missing_fails():
  base = {"vision": 1.0, "prefill": 1.0, "train": 4.0}
  fl = {"vision": 10.0, "prefill": 10.0, "train": 40.0}
  cells = [_cell(8, 0.0, base, fl), _cell(8, 0.3, {"vision": 0.9, "prefill": 0.9}, {"vision": 9.0, "prefill": 9.0})]
  chk = report.checks(report.summary_rows(cells), parts=("vision", "prefill", "train"))
  assert chk["train_efficiency"]["ok"] is False and "ratio 0.5" in chk["train_efficiency"]["missing"]
  assert chk["never_slower"]["ok"] is False                # the train step was asked for, not measured
  assert "train_efficiency" in report.failed(chk) and "never_slower" in report.failed(chk)
  # parts that were not asked for make no claim
  only_vision = report.checks(report.summary_rows(cells), parts=("vision",))
  assert "train_efficiency" not in only_vision and "never_slower" not in only_vision


def test_bench_config_validation():
  with pytest.raises(ValueError, match="rows"):
    BenchConfig(rows="some").validate()
  with pytest.raises(ValueError, match="ratios"):
    BenchConfig(ratios=(1.0,)).validate()
  with pytest.raises(ValueError, match="decode"):
    BenchConfig(parts=("decode",)).validate()
  assert BenchConfig(ratios=(0.5, 0.3)).grid_ratios == (0.0, 0.5, 0.3)


def test_bench_cpu_config_builds_with_its_bench_section():
  from configs import bench_cpu
  from stts_jax.bench import main as bench_main
  cfgs = bench_main._sections(bench_cpu.get_config("frames=8;32,ratios=0;0.5,rows=typical"))
  assert cfgs["bench"].frames == (8, 32) and cfgs["bench"].ratios == (0.0, 0.5)
  assert cfgs["bench"].rows == "typical" and cfgs["model"].stts.method == "stts"
  assert cfgs["model"].windows_per_frame == 16 and cfgs["model"].stts.prune_at == 2
  local = bench_main._sections(bench_cpu.get_config("runlocal=true"))["bench"]
  assert local.frames == (4, 8) and local.repeats == 1 and local.interleave_rounds == 0
  assert cfgs["bench"].interleave_rounds == 5
  # Molmo2-4B-like split of the work: ViT about half of the forward at 8 frames, less at 64.
  m = cfgs["model"]
  shares = [costs.forward(m, t, batches.prompt_length(t, 16)) for t in (8, 64)]
  assert 0.45 < shares[0].vit / shares[0].total < 0.6 and shares[1].vit / shares[1].total < shares[0].vit / shares[0].total
