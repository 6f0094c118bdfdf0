r"""emoqwen-eval: answer a benchmark's questions with a checkpoint, write the predictions, score them.

  emoqwen-eval --ckpt C --benchmark dfew --labels DFEW/test/set_1.csv --video_root DFEW/clips [--folds]
  emoqwen-eval --ckpt C --benchmark mer2023 --labels MER2023/labels.csv --video_root MER2023/test3
  emoqwen-eval --ckpt C --benchmark emer --labels EMER/descriptions.csv --video_root MER2023/test3
  emoqwen-eval --ckpt C --benchmark pope --root POPE --image_root coco/val2014 [--yes_no_rule official]
  emoqwen-eval --ckpt C --benchmark mmbench --root MMBench --circular
  emoqwen-eval --ckpt C --suite general|emotion|all --suite_config suite.json

Every model gets the same standard settings (``emoqwen_jax.eval.emotion.benchmarks`` for videos,
``emoqwen_jax.eval.general.benchmarks`` for images): the benchmark's prompt, greedy decoding, frames at 3 fps and the
default pixel budgets; ``--set`` changes them (the run then says so, and the report records it). ``--folds``
finds the five fold files from the one given (set_1 → set_1…5, or ``{fold}`` in the path) and reports the
mean over folds. Outputs under ``--out`` (default ``eval_out/<benchmark>`` or ``eval_out/suite_<suite>``):
the predictions JSONL of each benchmark (with ``.confusion.png``/``.invalid.csv`` for emotion labels),
``report.json`` + ``report.md`` (every metric, invalid rates, sample counts, settings, prompts) and, for one
benchmark, ``run.json``. The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import os
import sys

from emoqwen_jax.cli.args import add_generation_args, parse_sets, run_command
from emoqwen_jax.eval.general.benchmarks import GENERAL_BENCHMARKS
from emoqwen_jax.eval.suites.evaluate import evaluate as run_evaluation
from emoqwen_jax.eval.suites.registry import EMOTION_BENCHMARKS, SUITES
from emoqwen_jax.runtime import storage
from emoqwen_jax.runtime.commands import command_parser

BENCHMARK_CHOICES = (*EMOTION_BENCHMARKS, *GENERAL_BENCHMARKS)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    add_generation_args(parser, max_new_tokens=0)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--benchmark", choices=BENCHMARK_CHOICES, help="one benchmark")
    what.add_argument("--suite", choices=SUITES, help="the benchmarks of --suite_config's lists")
    parser.add_argument("--suite_config", default="", help="suite JSON (see emoqwen_jax/eval/suites/registry.py)")
    parser.add_argument("--labels", default="", help="emotion: label CSV (EMER: reference descriptions)")
    parser.add_argument("--video_root", default="", help="emotion: directory the clip names are relative to")
    parser.add_argument("--folds", action="store_true", help="emotion: run all five folds and report the mean")
    parser.add_argument("--classes", default="", help="class names in the label file's id order (see emoqwen-score)")
    parser.add_argument("--text_column", default="", help="EMER: the reference-description column")
    parser.add_argument("--root", default="", help="general: the benchmark's folder (published layout)")
    parser.add_argument("--image_root", default="", help="POPE: the COCO val2014 image folder")
    parser.add_argument("--circular", action="store_true", help="MMBench: circular evaluation over rotated options")
    parser.add_argument("--yes_no_rule", default="", choices=("", "strict", "official"),
                        help="POPE: how yes/no answers are read: strict (default; unclear answers are invalid) or "
                             "official (POPE's script: yes unless the first sentence has no/not)")
    parser.add_argument("--limit", type=int, default=0, help="general: only the first N questions (0 = all)")
    parser.add_argument("--out", default="", help="output directory")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="questions in flight (the generation engine's decode slots)")
    return parser


def spec_from_args(args: argparse.Namespace) -> dict:
    """The one-benchmark spec the flags describe (the suite-config form)."""
    if args.benchmark in GENERAL_BENCHMARKS:
        if args.labels or args.video_root or args.folds:
            raise ValueError(f"{args.benchmark} is an image benchmark: give --root, not --labels/--video_root/--folds")
        if args.yes_no_rule and args.benchmark != "pope":
            raise ValueError(f"--yes_no_rule applies to pope, not {args.benchmark}")
        spec = {"benchmark": args.benchmark, "root": args.root, "image_root": args.image_root,
                "circular": args.circular if args.benchmark == "mmbench" else None, "limit": args.limit,
                "yes_no_rule": args.yes_no_rule}
        return {k: v for k, v in spec.items() if v not in ("", None, 0, False)}
    if args.yes_no_rule:
        raise ValueError(f"--yes_no_rule applies to pope, not {args.benchmark}")
    if not args.labels or not args.video_root:
        raise ValueError(f"{args.benchmark} needs --labels and --video_root")
    spec = {"benchmark": args.benchmark, "labels": args.labels, "video_root": args.video_root,
            "folds": args.folds, "classes": args.classes, "text_column": args.text_column}
    return {k: v for k, v in spec.items() if v not in ("", False)}


def evaluate(ckpt: str, specs: list[dict], out_dir: str, *, overrides: dict, args: argparse.Namespace,
             suite: str = "") -> dict:
    """``emoqwen_jax.eval.suites.evaluate.evaluate`` with the generation flags of ``args`` (notes departures from
    the standard settings on stderr)."""
    if overrides:
        print(f"note: --set {overrides} departs from the standard settings; scores are not comparable with "
              f"standard runs", file=sys.stderr)
    return run_evaluation(ckpt, specs, out_dir, overrides=overrides, suite=suite, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          batch_size=args.batch_size, dtype=args.dtype,
                          warn=lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))


def summary_of(report: dict) -> dict:
    """{benchmark: {headline metric: value, n, invalid_rate}} — the line printed for a suite."""
    return {name: {r["headline"]: r[r["headline"]], "n": r["n"], "invalid_rate": r.get("invalid_rate")}
            for name, r in report["benchmarks"].items()}


def run(args: argparse.Namespace) -> dict:
    from emoqwen_jax.eval.suites.registry import load_suite

    overrides = parse_sets(args.set)
    if args.suite:
        if not args.suite_config:
            raise ValueError("--suite needs --suite_config (a JSON file listing the benchmarks)")
        specs, suite_sets = load_suite(args.suite_config, args.suite)
        out_dir = args.out or os.path.join("eval_out", f"suite_{args.suite}")
        report = evaluate(args.ckpt, specs, out_dir, overrides={**suite_sets, **overrides}, args=args,
                          suite=args.suite)
        print(f"report: {storage.join(out_dir, 'report.json')} and report.md", file=sys.stderr)
        return summary_of(report)
    spec = spec_from_args(args)
    out_dir = args.out or os.path.join("eval_out", args.benchmark)
    report = evaluate(args.ckpt, [spec], out_dir, overrides=overrides, args=args)
    result = report["benchmarks"][args.benchmark]
    storage.write_json(storage.join(out_dir, "run.json"), {"settings": report["settings"], "result": result},
                       indent=2)
    return {k: v for k, v in result.items() if k not in ("files", "kind", "benchmark")}


def main(argv: list[str] | None = None) -> int:
    return run_command("emoqwen-eval", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
