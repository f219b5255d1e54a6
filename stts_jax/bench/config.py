"""The `bench` section of a top-level config (`configs/bench_cpu.py`), registered on import."""

import dataclasses

from stts_jax import config as config_lib

PARTS = ("vision", "prefill", "decode", "overhead", "train")
ROW_POLICIES = ("heldout", "typical", "fit", "bound", "min")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What `stts_jax.bench.runner.run_grid` measures.

  frames x ratios: the grid; ratio 0 is the unpruned baseline of each frame count (method "none",
    no scorer) and is added when missing. Speedup = baseline time / pruned time.
  rows: packed ViT rows per video for pruned cells, sized without seeing the timed batches unless
    "fit": "heldout" (default; the fewest rows `heldout_batches` other batches - other clips, strides
    and starts - fit in, measured from their keep masks before compiling: a calibration a user can do
    on their own videos), "typical" (`budget.typical_num_rows`: the minimum plus T/8 spare rows), "fit"
    (fitted on the timed batches themselves: the best case, every timed call packed), "bound" (the
    proven worst-case bound, close to T at ratio 0.5) or "min". A timed batch that needs more rows
    than compiled takes the exact dense fallback; the results report how often (`*_fallback_rate`).
  compare_packing: for every pruned cell whose rows reach T (packing cannot save ViT work, so the
    model runs its late ViT blocks per frame, `stts.packing="auto"`), also measure the same cell with
    `stts.packing="always"` (packed anyway), timed in the same interleaved rounds. Those extra cells
    are reported (`variant` "packing=always") and left out of the checks.
  num_batches: distinct batches per cell (different clips and keep patterns), rotated through the
    timed calls of one compiled function.
  decode_tokens: decoder steps timed per decode call (time per token = call time / decode_tokens).
  repeats / min_seconds: at least `repeats` timed calls per part, more (up to 100) until a part has
    run `min_seconds` timed: a 25 ms prefill gets 80 calls where a 1 s train step gets 3, so
    the cheap parts' medians are not left to a handful of noisy samples.
  xla_flops: also lower an unrolled copy of every part for XLA's FLOP count (no compilation).
  interleave_rounds: after all cells of one frame count are compiled and measured, time them again
    in this many rounds, each round calling every (cell, part) in turn, and report those timings:
    load that comes and goes then hits the unpruned and the pruned cells alike, where cells timed
    one after the other drift apart on a shared machine. 0: keep the per-cell timings.
  """
  frames: tuple[int, ...] = (8, 16, 32, 64)
  ratios: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7)
  batch_size: int = 1
  warmup: int = 1
  repeats: int = 3
  min_seconds: float = 0.0
  num_batches: int = 2
  decode_tokens: int = 16
  timestamp_tokens: int = 3
  text_tokens: int = 24
  rows: str = "heldout"
  heldout_batches: int = 6
  compare_packing: bool = False
  parts: tuple[str, ...] = PARTS
  xla_flops: bool = True
  interleave_rounds: int = 0
  seed: int = 0

  def validate(self) -> "BenchConfig":
    if not self.frames or min(self.frames) < 1:
      raise ValueError(f"bench.frames must be positive frame counts, got {self.frames}")
    if any(not 0.0 <= r < 1.0 for r in self.ratios):
      raise ValueError(f"bench.ratios must be in [0, 1), got {self.ratios}")
    if self.rows not in ROW_POLICIES:
      raise ValueError(f"bench.rows must be one of {ROW_POLICIES}, got {self.rows!r}")
    unknown = sorted(set(self.parts) - set(PARTS))
    if unknown:
      raise ValueError(f"bench.parts: unknown {unknown}; known {PARTS}")
    if "decode" in self.parts and "prefill" not in self.parts:
      raise ValueError("bench.parts: 'decode' needs 'prefill' (it decodes from the prefill's cache)")
    if self.interleave_rounds < 0:
      raise ValueError(f"bench.interleave_rounds must be >= 0, got {self.interleave_rounds}")
    if self.batch_size < 1 or self.num_batches < 1 or self.decode_tokens < 1 or self.heldout_batches < 1:
      raise ValueError("bench.batch_size, num_batches, heldout_batches and decode_tokens must be >= 1")
    if self.warmup < 0 or self.repeats < 1:
      raise ValueError("bench.warmup must be >= 0 and bench.repeats >= 1")
    return self

  @property
  def grid_ratios(self) -> tuple[float, ...]:
    """Ratios with the baseline 0 first."""
    return (0.0,) + tuple(r for r in self.ratios if r != 0.0)


def build_bench_config(cfg) -> BenchConfig:
  return config_lib.from_dict(BenchConfig, cfg, "bench").validate()


config_lib.register_section("bench", build_bench_config)
