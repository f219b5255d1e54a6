"""Library entry points behind `scripts/benchmark.py`.

  benchmark(config, out_dir)            measured grid (frames x ratios) -> CSV, JSON, PNGs, checks
  abstract_benchmark(config, out_dir)   predicted speedups at real sizes from shapes only
Outputs in `out_dir`: `bench.csv` / `abstract.csv` (one row per cell), `bench.json` /
`abstract.json` (rows, raw per-part results, checks, config, versions, devices) and the plots.
"""

import dataclasses
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import ml_collections

from stts_jax import config as config_lib
from stts_jax import hostmem
from stts_jax.bench import abstract
from stts_jax.bench import config as bench_config
from stts_jax.bench import plots
from stts_jax.bench import report
from stts_jax.bench import runner
from stts_jax.parallel import mesh as mesh_lib
from stts_jax.parallel import sharding
from stts_jax.train import aot
from stts_jax.train.config import MeshConfig, TrainConfig

log = logging.getLogger(__name__)


def _sections(config: Any) -> dict[str, Any]:
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  cfgs = config_lib.build(config)   # the `bench` section is registered by importing bench.config
  cfgs.setdefault("train", TrainConfig())
  cfgs.setdefault("mesh", MeshConfig())
  cfgs.setdefault("bench", bench_config.BenchConfig())
  return cfgs


def environment() -> dict[str, Any]:
  return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
          # huge pages for XLA:CPU's per-call buffers (stts_jax/hostmem.py) change CPU timings by ~15%
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "thp": hostmem.thp_mode()}


def benchmark(config: Any, out_dir: str, *, frames: Optional[Sequence[int]] = None,
              ratios: Optional[Sequence[float]] = None, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
  """Runs the measured grid of `config` (sections model, train, bench); returns rows and checks."""
  cfgs = _sections(config)
  bench = cfgs["bench"]
  if frames is not None:
    bench = dataclasses.replace(bench, frames=tuple(frames))
  if ratios is not None:
    bench = dataclasses.replace(bench, ratios=tuple(ratios))
  bench.validate()
  os.makedirs(out_dir, exist_ok=True)
  progress(f"benchmark: frames {bench.frames}, ratios {bench.grid_ratios}, rows '{bench.rows}', "
           f"{bench.warmup} warm-up + {bench.repeats} timed calls per part; {environment()}")
  t0 = time.time()
  load = [list(os.getloadavg())]
  cells = runner.run_grid(cfgs["model"], cfgs["train"], bench, progress=progress)
  load.append(list(os.getloadavg()))
  rows = report.summary_rows(cells)
  checks = report.checks(rows, parts=bench.parts, interleaved=bench.interleave_rounds > 0)
  report.write_csv(rows, os.path.join(out_dir, "bench.csv"))
  report.write_markdown(rows, os.path.join(out_dir, "bench.md"))
  report.write_json(os.path.join(out_dir, "bench.json"), rows=rows, checks=checks, failed=report.failed(checks),
                    cells=[c.to_dict() for c in cells], bench=config_lib.to_dict(bench),
                    model=config_lib.to_dict(cfgs["model"]), environment=environment(),
                    command=" ".join([os.path.basename(sys.executable)] + sys.argv), commit=aot.git_commit(),
                    machine=aot.machine(), load_average_start_end=load, wall_s=round(time.time() - t0, 1))
  pngs = plots.write_all(rows, out_dir, title=str(cfgs.get("name", "")))
  progress(f"wrote {out_dir}/bench.csv, bench.md, bench.json, {', '.join(os.path.basename(p) for p in pngs)}")
  return {"rows": rows, "checks": checks, "cells": cells}


def abstract_benchmark(config: Any, out_dir: str, *, frames: Sequence[int] = (64, 128, 256),
                       ratios: Sequence[float] = (0.5,), row_policies: Sequence[str] = ("typical", "bound"),
                       memory: bool = False, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
  """Predicted speedups of `config`'s model at `frames` (no weights). With `memory`, the config's
  mesh over all devices is used (one video per device) and the full step is compiled for memory."""
  cfgs = _sections(config)
  mesh = mesh_lib.make_mesh(cfgs["mesh"]) if memory else runner.single_device_mesh()
  rules = sharding.make_rules(cfgs["mesh"])
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for ratio in ratios:
    rows += abstract.predict(cfgs["model"], cfgs["train"], frames=frames, ratio=ratio, row_policies=row_policies,
                             mesh=mesh, rules=rules, memory=memory, progress=progress)
  report.write_csv(rows, os.path.join(out_dir, "abstract.csv"))
  report.write_json(os.path.join(out_dir, "abstract.json"), rows=rows, paper=abstract.PAPER_SPEEDUP,
                    model=config_lib.to_dict(cfgs["model"]), environment=environment())
  png = plots.predicted_plot([r for r in rows if r["ratio"] == 0.5] or rows,
                             os.path.join(out_dir, "predicted_speedup.png"),
                             title=f"{cfgs.get('name', 'model')}: predicted speedup")
  progress(f"wrote {out_dir}/abstract.csv, abstract.json, {os.path.basename(png)}")
  return {"rows": rows}


def attention_auto(config: Any, out_dir: str, *, frames: Optional[Sequence[int]] = None,
                   ratios: Optional[Sequence[float]] = None, progress: Callable[[str], None] = log.info
                   ) -> dict[str, Any]:
  """What `model.attention` (default auto) resolves to at every call site of the measured grid's cells,
  traced from shapes (`attention_layer.auto_choices`); writes auto_choices.csv/.json to `out_dir`."""
  from stts_jax.bench import attention_layer
  cfgs = _sections(config)
  bench = cfgs["bench"]
  frames = tuple(frames or bench.frames)
  ratios = tuple(ratios if ratios is not None else bench.grid_ratios)
  progress(f"attention auto: frames {frames}, ratios {ratios}, model.attention={cfgs['model'].attention!r}")
  choices = attention_layer.auto_choices(cfgs["model"], frames, ratios, batch_size=bench.batch_size)
  summary = attention_layer.write_auto_choices(out_dir, choices, frames=list(frames), ratios=list(ratios),
                                               model_attention=cfgs["model"].attention)
  progress(f"wrote {out_dir}/auto_choices.csv, auto_choices.json")
  return summary
