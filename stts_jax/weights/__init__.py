"""HF / authors' checkpoint import and export, and an HF-input-compatible logits entry point."""

from stts_jax.weights.hf_inputs import molmo2_logits
from stts_jax.weights.hf_molmo2 import LoadReport
from stts_jax.weights.hf_molmo2 import build_from_tensors
from stts_jax.weights.hf_molmo2 import export_tensors
from stts_jax.weights.hf_molmo2 import load_molmo2
from stts_jax.weights.hf_molmo2 import load_molmo2_with_report
from stts_jax.weights.hf_molmo2 import save_molmo2
from stts_jax.weights.scorer import scorer_from_torch
from stts_jax.weights.scorer import scorer_to_torch

__all__ = ["LoadReport", "build_from_tensors", "export_tensors", "load_molmo2", "load_molmo2_with_report",
           "molmo2_logits", "save_molmo2", "scorer_from_torch", "scorer_to_torch"]
