"""Shared tiny STTS model (built once per session: its initialisation compiles)."""
import pytest
from flax import nnx

from stts_jax.models import vlm
from stts_jax.testing import tiny


@pytest.fixture(scope="session")
def stts_model():
  cfg = tiny.tiny_model_config(method="stts", ratio=0.5)
  return nnx.jit(lambda: vlm.Molmo2(cfg, rngs=nnx.Rngs(0)))()
