r"""emoqwen-train: Emotion-Qwen's training stages on a device mesh (the supervised stages, and RL stages:
``stages.<name>.kind = 'rl'``, docs/rl.md).

  emoqwen-train --config=configs/emotion_qwen.py:demo --config.workdir=runs/demo
  emoqwen-train --config=configs/emotion_qwen.py:7b --config.workdir=/ckpt/run1 \
      --config.init_from=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.stages.stage1_align.mixture="({'manifest': '/data/align.jsonl', 'data_root': '/data'},)" ...

7b has no default data: every stage to run needs its mixture (configs/README.md). Starting again in a workdir
that has checkpoints resumes from the latest one (mid-stage). SIGTERM saves a checkpoint and exits cleanly.
Stages with an ``eval_suite`` are scored on their final weights (the demo preset scores held-out demo clips as
DFEW); the last line printed is a JSON summary whose ``eval`` holds the final stage's scores:
``{"<benchmark>": {"uar", "war", "invalid_rate", "n"}}``, and ``eval_by_stage`` every evaluated stage's:
``{"<stage>": {"<benchmark>": {...}}}``.
"""

from __future__ import annotations

import json

from absl import flags as absl_flags
from absl import logging

from emoqwen_jax.cli.args import add_config_arg, parse_config_args
from emoqwen_jax.runtime.commands import command_parser


def build_parser():
    parser = command_parser(__doc__)
    add_config_arg(parser, "configs/emotion_qwen.py:demo")
    parser.add_argument("--workdir", default="", help="overrides config.workdir")
    return parser


def main(argv: list[str] | None = None) -> None:
    from emoqwen_jax.runtime.malloc import tune_malloc

    parser = build_parser()
    args = parse_config_args(parser, argv)
    config = args.config
    if args.workdir:
        config.workdir = args.workdir
    if not config.workdir:
        parser.error("set --config.workdir=DIR (or --workdir=DIR): checkpoints, metrics and plots go there")
    tune_malloc()  # before JAX allocates: XLA:CPU's per-step scratch buffer stays mapped (runtime/malloc.py)
    absl_flags.FLAGS.mark_as_parsed()  # orbax and grain log through absl, which wants parsed flags (the defaults)
    logging.set_verbosity(logging.WARNING)
    run(config)


def run(config) -> None:
    """Trains ``config``'s stages and prints the summary lines."""
    from emoqwen_jax.eval.suites.stage_eval import run_stage_eval
    from emoqwen_jax.rl.stage import run_rl_stage
    from emoqwen_jax.train.trainer import Preempted, train_and_evaluate

    try:
        summary = train_and_evaluate(config, stage_eval=run_stage_eval, stage_runners={"rl": run_rl_stage})
    except Preempted as err:
        print(str(err))
        return
    for name, last in summary["stages"].items():
        print(f"{name}: loss {last.get('loss', float('nan')):.4f} after {last.get('step')} steps; "
              f"plot {last.get('plot', '-')}")
    print(f"weights per stage: {summary['workdir']}/stages/<stage>   checkpoints: {summary['workdir']}/checkpoints")
    print(f"metrics: {summary['metrics']}   tensorboard: {summary['workdir']}/tensorboard")
    line = {"workdir": summary["workdir"], "final": summary["final"],
            "final_loss": {k: v.get("loss") for k, v in summary["stages"].items()},
            **{k: summary[k] for k in ("process_index", "process_count", "device_count")}}
    final_stage = config.run_stages[-1]
    for name, last in summary["stages"].items():
        for bench, scores in eval_scores(last.get("eval") or {}).items():
            print(f"{name} eval {bench}: " + "  ".join(f"{k} {v}" for k, v in scores.items())
                  + f"   report: {summary['workdir']}/eval/{name}/report.md")
            line.setdefault("eval_by_stage", {}).setdefault(name, {})[bench] = scores
            if name == final_stage:  # the final weights' scores close the run's summary line
                line.setdefault("eval", {})[bench] = scores
    print(json.dumps(line))


def eval_scores(report: dict) -> dict[str, dict]:
    """{benchmark: {its headline metric (and UAR/WAR where it has them), invalid_rate, n}} of a stage's report."""
    out = {}
    for bench, result in report.get("benchmarks", {}).items():
        keys = dict.fromkeys((result.get("headline"), "uar", "war", "invalid_rate", "n"))
        out[bench] = {k: result[k] for k in keys if k in result}
    return out


if __name__ == "__main__":
    main()
