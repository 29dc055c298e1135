"""Evaluation: task accuracy, format accuracy, mean reward and pass@k on held-out data."""

from palaestra.evaluation.evaluate import EvalResult, evaluate
from palaestra.evaluation.metrics import mean_pass_at_k, pass_at_k

__all__ = ["EvalResult", "evaluate", "mean_pass_at_k", "pass_at_k"]
