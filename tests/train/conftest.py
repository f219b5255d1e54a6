"""tests/train only: a persistent XLA compilation cache in a session temp dir while each test runs.

The resume tests train the same step several times in one process (uninterrupted run, run until
SIGTERM, resumed run); each `loop.run` jits afresh, so without a cache every run recompiles the
identical program. The jit caches still count specialisations (`_cache_size()`), so the
one-compilation assertions are unaffected. The previous settings are restored after each test.
"""

import jax
import pytest
from jax._src import compilation_cache


@pytest.fixture(scope="session")
def _xla_cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(autouse=True)
def _persistent_compilation_cache(_xla_cache_dir):
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", _xla_cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for n, v in previous.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()
