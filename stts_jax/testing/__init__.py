"""Test doubles shipped with the library: tiny configs, synthetic inputs, HF model builders."""
from stts_jax.testing.tiny import tiny_model_config  # noqa: F401
