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


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_module():
  """Every compiled XLA:CPU program holds memory mappings; one process running the whole suite would
  pass the kernel's limit (vm.max_map_count, 65530 here) and crash inside a later compile. Tests that
  count compilations do so within their module, so dropping the jit caches between modules is safe."""
  yield
  import jax
  jax.clear_caches()
  gc.collect()
