"""Sharded training of Molmo2 + STTS.

  config      TrainConfig / OptimConfig (section `train`; MeshConfig is re-exported from stts_jax.parallel)
  optim       make_tx / make_optimizer: clip, AdamW warmup+cosine, scorer LR, freeze regexes
  step        TrainState (model, optimizer, counters), train_step (loss, accumulation, non-finite skip)
  loss        answer-only cross-entropy: gathered answer positions, exact chunked fallback, vocab-sharded
  loop        init_state (sharded init), make_step_fn (jit with shardings + donation), run (the loop)
  checkpoint  Checkpointer: one Orbax manager with items state / data_iter / config
  aot         compile_train_step: lower + compile from abstract shapes, FLOPs and per-device memory;
              report_json (scripts/train.py --aot_json)
  aot_table   the before/after AOT memory table of the authors' recipe (scripts/aot_table.py)
  distributed initialize (flags or cluster env), configure_logging, barrier, Supervisor (fail-fast)
  launch      launch(command, num_processes, devices_per_process): N local processes, supervised
  main        init_distributed, train_and_evaluate(config, workdir), aot_from_config(config)
Import the submodules directly (`from stts_jax.train import loop`). Mesh construction and the
logical-axis rules live in `stts_jax.parallel` (shared with eval, inference and the benchmark).
"""

__all__ = ["aot", "aot_table", "checkpoint", "config", "distributed", "launch", "loop", "loss", "main", "optim", "step"]
