"""Shared parallelism infrastructure for training, evaluation, inference and benchmarks: the mesh
section (`config`), mesh construction (`mesh`) and the logical-axis rules table with the
state/batch shardings it gives (`sharding`)."""

__all__ = ["config", "mesh", "sharding"]
