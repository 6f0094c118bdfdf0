r"""emoqwen-score: score model answers against a benchmark's own label file.

  emoqwen-score --benchmark dfew --predictions preds/set_1.jsonl --labels DFEW/set_1.csv
  emoqwen-score --benchmark mer2023 --predictions preds/mer.jsonl --labels MER2023/labels.csv
  emoqwen-score --benchmark mafw --predictions p.jsonl --labels set_1.csv --classes happiness,sadness,...
  emoqwen-score --benchmark emer --predictions emer.jsonl --labels EMER/descriptions.csv

Predictions: JSONL lines ``{"id": …, "response": "…"}``. Labels: DFEW/MAFW ``video_name,label`` (numeric
ids or names), MER ``name,discrete``; EMER a CSV with ``name`` and a reference description column.
The last line printed is a JSON object: ``n, uar, war, weighted_f1, accuracy, invalid_rate,
per_class_recall`` (EMER: the word-overlap metrics); ``P.confusion.png`` and ``P.invalid.csv`` are written
beside the predictions. Bad input (a missing file, an id that is not in the labels) exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from emoqwen_jax.cli.args import run_command
from emoqwen_jax.runtime.commands import command_parser

BENCHMARK_CHOICES = ("dfew", "mafw", "mer2023", "mer2024", "emer")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--benchmark", required=True, choices=BENCHMARK_CHOICES)
    parser.add_argument("--predictions", required=True, help="JSONL of {id, response}")
    parser.add_argument("--labels", required=True, help="the benchmark's label CSV")
    parser.add_argument("--classes", default="",
                        help="comma-separated class names in the label file's id order, when it differs from the "
                             "benchmark's standard order (see docs/evaluation.md)")
    parser.add_argument("--text_column", default="",
                        help="EMER: the reference-description column (default: the first of english, "
                             "description, reason)")
    return parser


def run(args: argparse.Namespace) -> dict:
    if args.benchmark == "emer":
        from emoqwen_jax.eval.emotion.emer import score_emer_files

        return score_emer_files(args.predictions, args.labels, text_column=args.text_column or None)
    from emoqwen_jax.eval.emotion.benchmarks import get_benchmark
    from emoqwen_jax.eval.emotion.report import score_files

    classes = [c for c in args.classes.split(",") if c.strip()] or None
    scores, paths = score_files(get_benchmark(args.benchmark), args.predictions, args.labels, classes)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return scores.summary()


def main(argv: list[str] | None = None) -> int:
    return run_command("emoqwen-score", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
