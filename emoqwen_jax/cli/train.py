r"""emoqwen-train: Emotion-Qwen's three pretraining stages on a device mesh.

  emoqwen-train --config=configs/emotion_qwen.py:demo --config.workdir=runs/demo
  emoqwen-train --config=configs/emotion_qwen.py:7b --config.workdir=/ckpt/run1 \
      --config.init_from=/ckpt/Qwen2.5-VL-7B-Instruct --config.mesh.fsdp=-1 --config.mesh.data=1

Starting again in a workdir that has checkpoints resumes from the latest one (mid-stage). SIGTERM saves a
checkpoint and exits cleanly.
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
    from emoqwen_jax.train.trainer import Preempted, train_and_evaluate

    config = _CONFIG.value
    if _WORKDIR.value:
        config.workdir = _WORKDIR.value
    if not config.workdir:
        raise app.UsageError("set --config.workdir=DIR (or --workdir=DIR): checkpoints, metrics and plots go there")
    logging.set_verbosity(logging.WARNING)
    try:
        summary = train_and_evaluate(config, stage_eval=run_stage_eval)
    except Preempted as err:
        print(str(err))
        return
    for name, last in summary["stages"].items():
        print(f"{name}: loss {last.get('loss', float('nan')):.4f} after {last.get('step')} steps; "
              f"plot {last.get('plot', '-')}")
    print(f"weights per stage: {summary['workdir']}/stages/<stage>   checkpoints: {summary['workdir']}/checkpoints")
    print(f"metrics: {summary['metrics']}   tensorboard: {summary['workdir']}/tensorboard")
    print(json.dumps({"workdir": summary["workdir"], "final": summary["final"],
                      "final_loss": {k: v.get("loss") for k, v in summary["stages"].items()},
                      **{k: summary[k] for k in ("process_index", "process_count", "device_count")}}))


def main() -> None:
    app.run(main_, argv=sys.argv)


if __name__ == "__main__":
    main()
