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
