"""Evaluation: answer parsing, honest scores (UAR/WAR/weighted F1 with an invalid bucket), benchmark runs,
and the judge-free EMER metric, in three subpackages over a shared parser, importing one way
(suites -> general -> emotion -> parse/choice; ``tests/test_imports.py`` rules out cycles):

  parse, choice   answer spans, labels and option letters (shared)
  emotion/        benchmarks (label sets, prompts, folds), scores, report, emer, runner (the answering loop)
  general/        benchmarks (the image benchmarks' table), data (readers), scores, vqa_accuracy, demo
  suites/         registry (suite configs, run_suite), report, forgetting, evaluate (one checkpoint on specs:
                  emoqwen-eval, emoqwen-forgetting and the trainer's stage hook), stage_eval
Argument parsing lives in ``emoqwen_jax/cli``."""

from emoqwen_jax.eval.emotion.benchmarks import (
    BENCHMARKS,
    Benchmark,
    fold_paths,
    get_benchmark,
    read_labels,
    read_predictions,
)
from emoqwen_jax.eval.emotion.report import score_answers, score_files
from emoqwen_jax.eval.emotion.scores import INVALID, Scores, mean_scores, score
from emoqwen_jax.eval.parse import LabelParser, Parsed, answer_span

__all__ = [
    "BENCHMARKS", "Benchmark", "INVALID", "LabelParser", "Parsed", "Scores", "answer_span", "fold_paths",
    "get_benchmark", "mean_scores", "read_labels", "read_predictions", "score", "score_answers", "score_files",
]
