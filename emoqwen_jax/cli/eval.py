r"""emoqwen-eval: answer a benchmark's clips with a checkpoint, write the predictions, score them.

  emoqwen-eval --ckpt C --benchmark dfew --labels DFEW/test/set_1.csv --video_root DFEW/clips
  emoqwen-eval --ckpt C --benchmark dfew --labels DFEW/test/set_1.csv --video_root DFEW/clips --folds
  emoqwen-eval --ckpt C --benchmark mer2023 --labels MER2023/labels.csv --video_root MER2023/test3
  emoqwen-eval --ckpt C --benchmark emer --labels EMER/descriptions.csv --video_root MER2023/test3

Every model gets the same standard settings (``emoqwen_jax.eval.benchmarks``): the benchmark's prompt,
greedy decoding, frames at 3 fps and the default pixel budget; ``--set`` changes them (the run then says
so, and run.json records it). ``--folds`` finds the five fold files from the one given (set_1 → set_1…5,
or ``{fold}`` in the path) and reports the mean over folds. Outputs under ``--out`` (default
``eval_out/<benchmark>``): ``<labels name>.jsonl`` (``fold<k>.jsonl`` with --folds) with the answers,
``.confusion.png`` and ``.invalid.csv`` beside each, ``run.json`` with the settings and the scores. The last
line printed is the JSON summary (with --folds: the fold means and each fold's scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from emoqwen_jax.eval.commands import add_generation_args, parse_sets, run_command

BENCHMARK_CHOICES = ("dfew", "mafw", "mer2023", "mer2024", "emer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emoqwen-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(parser, max_new_tokens=0)
    parser.add_argument("--benchmark", required=True, choices=BENCHMARK_CHOICES)
    parser.add_argument("--labels", required=True, help="label CSV (EMER: reference descriptions)")
    parser.add_argument("--video_root", required=True, help="directory the clip names are relative to")
    parser.add_argument("--folds", action="store_true", help="run all five folds and report the mean")
    parser.add_argument("--out", default="", help="output directory (default eval_out/<benchmark>)")
    parser.add_argument("--batch_size", type=int, default=4, help="clips per generate call")
    parser.add_argument("--classes", default="", help="class names in the label file's id order (see emoqwen-score)")
    parser.add_argument("--text_column", default="", help="EMER: the reference-description column")
    return parser


def run(args: argparse.Namespace) -> dict:
    from emoqwen_jax.eval import benchmarks, runner
    from emoqwen_jax.eval.scores import mean_scores
    from emoqwen_jax.infer.session import Session

    is_emer = args.benchmark == "emer"
    if args.folds and (is_emer or not benchmarks.get_benchmark(args.benchmark).has_folds):
        raise ValueError(f"--folds: {args.benchmark} has no folds")
    label_files = benchmarks.fold_paths(args.labels) if args.folds else [args.labels]
    for path in label_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--labels {path} does not exist")
    user_sets = parse_sets(args.set)
    if user_sets:
        print(f"note: --set {user_sets} departs from the standard {args.benchmark} settings; scores are not "
              f"comparable with standard runs", file=sys.stderr)
    session = Session.from_checkpoint(args.ckpt, {**benchmarks.EVAL_DATA, **user_sets}, dtype=args.dtype)
    default_tokens = benchmarks.EMER_MAX_NEW_TOKENS if is_emer else benchmarks.EVAL_MAX_NEW_TOKENS
    sampling = session.sampling(args.max_new_tokens or default_tokens, args.temperature, args.top_p, args.top_k)
    out_dir = args.out or os.path.join("eval_out", args.benchmark)
    os.makedirs(out_dir, exist_ok=True)
    common = dict(sampling=sampling, batch_size=args.batch_size, seed=args.seed)
    settings = {"ckpt": os.path.abspath(args.ckpt), "benchmark": args.benchmark, "labels": label_files,
                "video_root": os.path.abspath(args.video_root), "sampling": dataclasses.asdict(sampling),
                "data": {k: session.data[k] for k in (*benchmarks.EVAL_DATA, "system_prompt", "faces",
                                                      "tokenizer_vocab_size")},
                "overrides": user_sets}
    if is_emer:
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(args.labels))[0] + ".jsonl")
        summary = runner.run_emer(session, args.labels, args.video_root, out, text_column=args.text_column or None,
                                  **common)
        result = {k: summary[k] for k in ("n", "precision", "recall", "f1", "missing", "no_reference_emotion")}
    else:
        bench = benchmarks.get_benchmark(args.benchmark)
        classes = [c for c in args.classes.split(",") if c.strip()] or None
        folds, files = [], []
        for k, labels in enumerate(label_files, start=1):
            name = f"fold{k}" if args.folds else os.path.splitext(os.path.basename(labels))[0]
            scores, written = runner.run_benchmark(session, bench, labels, args.video_root,
                                                   os.path.join(out_dir, name + ".jsonl"), classes=classes, **common)
            print(f"{name}: {json.dumps(scores.summary())}", file=sys.stderr)
            folds.append(scores)
            files.append(written)
        result = mean_scores(folds) if args.folds else folds[0].summary()
        summary = {"files": files}
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump({"settings": settings, "result": result, **{k: v for k, v in summary.items() if k not in result}},
                  f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    return run_command("emoqwen-eval", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
