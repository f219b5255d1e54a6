"""Evaluation and inference: KV-cache generation on pruned prefills, QA metrics and evaluators,
the methods x ratios x frames comparison runner, checkpoint loading.

Generation:   generate.generate (submodule function; not re-exported: it would shadow the submodule),
              generate.model_variant, generate.prompt_only,
              decoding.prefill / decode / option_logprobs, predictor.Predictor
Metrics:      metrics.Accuracy, metrics.exact_match, metrics.normalize_answer, metrics.parse_letter
Evaluators:   evaluators.REGISTRY ("multiple_choice", "open_ended"), evaluators.from_name
Data:         data.EvalData (per-example error reporting), data.with_frames
Runs:         runner.evaluate, runner.write_results, runner.markdown, main.evaluate_from_config,
              checkpoints.load_model; config.EvalConfig (the `eval` config section)
"""

from stts_jax.eval.checkpoints import load_model
from stts_jax.eval.config import EvalConfig
from stts_jax.eval.data import EvalData
from stts_jax.eval.evaluators import REGISTRY
from stts_jax.eval.evaluators import from_name
from stts_jax.eval.generate import model_variant
from stts_jax.eval.generate import prompt_only
from stts_jax.eval.metrics import Accuracy
from stts_jax.eval.metrics import exact_match
from stts_jax.eval.metrics import normalize_answer
from stts_jax.eval.metrics import parse_letter
from stts_jax.eval.predictor import Predictor
from stts_jax.eval.runner import evaluate
from stts_jax.eval.runner import write_results

__all__ = ["Accuracy", "EvalConfig", "EvalData", "Predictor", "REGISTRY", "evaluate", "exact_match", "from_name",
           "load_model", "model_variant", "normalize_answer", "parse_letter", "prompt_only",
           "write_results"]
