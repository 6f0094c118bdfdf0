"""Evaluation: answer parsing, honest scores (UAR/WAR/weighted F1 with an invalid bucket), benchmark runs,
and the judge-free EMER metric. Three parts over a shared answering loop, importing one way
(suites -> general -> emotion's readers; ``tests/test_imports.py`` rules out cycles):

  shared   runner (batched generation over requests), parse (answer spans and labels), choice (letters)
  emotion  benchmarks (label sets, prompts, folds), scores, report, emer
  general  general (the image benchmarks' table), vl_data (readers), vl_scores, vqa_accuracy, demo_general
  suites   suites (suite configs, run_suite), suite_report, forgetting, evaluate (one checkpoint on specs:
           emoqwen-eval, emoqwen-forgetting and the trainer's stage hook), stage_eval
Argument parsing lives in ``emoqwen_jax/cli``."""

from emoqwen_jax.eval.benchmarks import BENCHMARKS, Benchmark, fold_paths, get_benchmark, read_labels, read_predictions
from emoqwen_jax.eval.parse import LabelParser, Parsed, answer_span
from emoqwen_jax.eval.report import score_answers, score_files
from emoqwen_jax.eval.scores import INVALID, Scores, mean_scores, score

__all__ = [
    "BENCHMARKS", "Benchmark", "INVALID", "LabelParser", "Parsed", "Scores", "answer_span", "fold_paths",
    "get_benchmark", "mean_scores", "read_labels", "read_predictions", "score", "score_answers", "score_files",
]
