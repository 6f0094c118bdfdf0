r"""emoqwen-forgetting: does emotion training erase general skill? The same suite before and after, per
benchmark before / after / delta, and a bar chart.

  emoqwen-forgetting --before runs/demo/stages/stage1_align --after runs/demo/stages/stage3_video \
      --suite all --suite_config suite.json [--out forgetting_out] [--set key=value] [--batch_size 4]
  emoqwen-forgetting --before_report eval_out/a/report.json --after_report eval_out/b/report.json

With checkpoints, each is evaluated with ``emoqwen-eval``'s standard settings into ``OUT/before`` and
``OUT/after`` (report.json + report.md each). Written to ``--out`` (default ``forgetting_out``):
``forgetting.json``, ``forgetting.md`` (the table printed) and ``forgetting.png`` (headline metrics in % of
their maximum, before and after). The last line printed is the JSON list of headline rows.
"""

from __future__ import annotations

import argparse
import sys

from emoqwen_jax.cli.args import add_generation_args, parse_sets, run_command
from emoqwen_jax.eval.suites.registry import SUITES
from emoqwen_jax.runtime import storage
from emoqwen_jax.runtime.commands import command_parser


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--before", default="", help="model directory before training (e.g. after stage 1)")
    parser.add_argument("--after", default="", help="model directory after training")
    parser.add_argument("--before_report", default="", help="an existing emoqwen-eval report.json (or its folder)")
    parser.add_argument("--after_report", default="", help="an existing emoqwen-eval report.json (or its folder)")
    parser.add_argument("--suite", default="all", choices=SUITES)
    parser.add_argument("--suite_config", default="", help="suite JSON (with --before/--after)")
    parser.add_argument("--out", default="forgetting_out", help="output directory")
    parser.add_argument("--all_metrics", action="store_true", help="compare every shared metric, not only headlines")
    parser.add_argument("--batch_size", type=int, default=4,
                        help="questions in flight (the generation engine's decode slots)")
    add_generation_args(parser, max_new_tokens=0, ckpt=False)
    return parser


def run(args: argparse.Namespace) -> dict:
    from emoqwen_jax.eval.suites import forgetting
    from emoqwen_jax.eval.suites.report import read_report

    ckpts, reports = (args.before, args.after), (args.before_report, args.after_report)
    if all(ckpts) == all(reports) or any(ckpts) != all(ckpts) or any(reports) != all(reports):
        raise ValueError("give --before and --after (checkpoints), or --before_report and --after_report")
    if all(ckpts):
        from emoqwen_jax.cli.eval import evaluate
        from emoqwen_jax.eval.suites.registry import load_suite

        if not args.suite_config:
            raise ValueError("--before/--after need --suite_config (a JSON file listing the benchmarks)")
        specs, suite_sets = load_suite(args.suite_config, args.suite)
        overrides = {**suite_sets, **parse_sets(args.set)}
        for which, ckpt in zip(("before", "after"), ckpts, strict=True):
            evaluate(ckpt, specs, storage.join(args.out, which), overrides=overrides, args=args, suite=args.suite)
        reports = (storage.join(args.out, "before"), storage.join(args.out, "after"))
    result = forgetting.compare(read_report(reports[0]), read_report(reports[1]), all_metrics=args.all_metrics)
    paths = forgetting.write(result, args.out)
    print(forgetting.table(result))
    print(f"wrote {paths['markdown']}, {paths['json']} and the chart {paths['chart']}", file=sys.stderr)
    return {"rows": [r for r in result["rows"] if r["headline"]], **paths}


def main(argv: list[str] | None = None) -> int:
    return run_command("emoqwen-forgetting", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
