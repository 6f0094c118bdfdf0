"""Evaluation: answer parsing, honest scores (UAR/WAR/weighted F1 with an invalid bucket), benchmark runs,
and the judge-free EMER metric."""

from emoqwen_jax.eval.benchmarks import BENCHMARKS, Benchmark, fold_paths, get_benchmark, read_labels, read_predictions
from emoqwen_jax.eval.parse import LabelParser, Parsed, answer_span
from emoqwen_jax.eval.report import score_answers, score_files
from emoqwen_jax.eval.scores import INVALID, Scores, mean_scores, score

__all__ = [
    "BENCHMARKS", "Benchmark", "INVALID", "LabelParser", "Parsed", "Scores", "answer_span", "fold_paths",
    "get_benchmark", "mean_scores", "read_labels", "read_predictions", "score", "score_answers", "score_files",
]
