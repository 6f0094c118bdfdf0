r"""emoqwen-train: Emotion-Qwen's training stages on a device mesh (the supervised stages, and RL stages:
``stages.<name>.kind = 'rl'``, docs/rl.md).

  emoqwen-train --config=configs/emotion_qwen.py:demo --config.workdir=runs/demo
  emoqwen-train --config=configs/emotion_qwen.py:7b --config.workdir=/ckpt/run1 \
      --config.init_from=/ckpt/Qwen2.5-VL-7B-Instruct --config.mesh.fsdp=-1 --config.mesh.data=1

Starting again in a workdir that has checkpoints resumes from the latest one (mid-stage). SIGTERM saves a
checkpoint and exits cleanly. Stages with an ``eval_suite`` are scored on their final weights (the demo preset
scores held-out demo clips as DFEW); the last line printed is a JSON summary whose ``eval`` holds the final
stage's scores: ``{"<benchmark>": {"uar", "war", "invalid_rate", "n"}}``, and ``eval_by_stage`` every evaluated
stage's: ``{"<stage>": {"<benchmark>": {...}}}``.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/emotion_qwen.py:demo", "Run config (file:preset).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Overrides config.workdir.")


def main_(argv) -> None:
    del argv
    from emoqwen_jax.eval.suites.stage_eval import run_stage_eval
    from emoqwen_jax.rl.stage import run_rl_stage
    from emoqwen_jax.train.trainer import Preempted, train_and_evaluate

    config = _CONFIG.value
    if _WORKDIR.value:
        config.workdir = _WORKDIR.value
    if not config.workdir:
        raise app.UsageError("set --config.workdir=DIR (or --workdir=DIR): checkpoints, metrics and plots go there")
    logging.set_verbosity(logging.WARNING)
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


def main() -> None:
    from emoqwen_jax.runtime.malloc import tune_malloc

    tune_malloc()  # before JAX allocates: XLA:CPU's per-step scratch buffer stays mapped (runtime/malloc.py)
    app.run(main_, argv=sys.argv)


if __name__ == "__main__":
    main()
