"""Test setup: 8 virtual CPU devices and runtime shape checks, both before stts_jax/jax load."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jaxtyping import install_import_hook  # noqa: E402

install_import_hook("stts_jax", "beartype.beartype")

from absl import flags  # noqa: E402

# grain.DataLoader with worker processes reads absl flags.
flags.FLAGS.mark_as_parsed()


import gc  # noqa: E402

import pytest  # noqa: E402


# One module has added up to ~13k mappings; above this many, the next module starts with empty caches.
_MAX_MAPS_BEFORE_CLEARING = 25000


def _memory_maps() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:   # not Linux: no such limit to watch
    return 0


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_when_maps_run_high():
  """Every compiled XLA:CPU program holds memory mappings; one process running the whole suite passed
  the kernel's limit (vm.max_map_count, 65530 here) and crashed inside a later compile. After a module,
  if the process holds many mappings, the jit caches are dropped (tests that count compilations do so
  within their module, so this is safe; doing it after every module made the suite slower)."""
  yield
  if _memory_maps() > _MAX_MAPS_BEFORE_CLEARING:
    import jax
    jax.clear_caches()
    gc.collect()
