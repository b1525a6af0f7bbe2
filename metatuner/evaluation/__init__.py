"""Evaluation: batched generation, the predictor interface and the one harness every method is scored by."""

from metatuner.evaluation.harness import EvalResult, evaluate, select
from metatuner.evaluation.predictors import LMPredictor, Prediction, Predictor

__all__ = ["EvalResult", "LMPredictor", "Prediction", "Predictor", "evaluate", "select"]
