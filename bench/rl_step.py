r"""RL round benchmark: how an RL stage's round (``stage4_rl``) splits between rollouts and updates.

  python bench/rl_step.py [--preset demo_rl] [--rounds 6] [--group 8] [--prompts 4] [--max-new-tokens 32]

Runs only ``stage4_rl`` of the preset (fresh weights: the timing, not the learning, is measured) on the bundled
demo clips for ``--rounds`` rounds and reads each round's ``rollout_s`` (prompts, sampling on the generation
engine, rewards, advantages, the reference's log-probabilities) and ``update_s`` (the ``num_iterations``
optimiser updates) from the run's metrics. The first round compiles and is left out; the others' medians
give the shares. Prints a table and, last, a JSON line {"rollout_s", "update_s", "rollout_share", "machine",
...} (``machine``: ``bench/machine.py``'s ``machine_info()``).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from emoqwen_jax.runtime.commands import command_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    parser = command_parser(__doc__, prog="python bench/rl_step.py")
    parser.add_argument("--preset", default="demo_rl")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    import emotion_qwen
    from machine import describe, machine_info

    from emoqwen_jax.rl.stage import run_rl_stage
    from emoqwen_jax.train.metrics import read_metrics
    from emoqwen_jax.train.trainer import train_and_evaluate

    config = emotion_qwen.get_config(args.preset)
    config.run_stages = ("stage4_rl",)
    sc = config.stages.stage4_rl
    sc.num_steps = args.rounds
    sc.batch_size = args.group * args.prompts
    sc.eval_suite = ""
    sc.rl.update(group_size=args.group, max_new_tokens=args.max_new_tokens)
    config.checkpoint.every_steps = 10 ** 6
    before = machine_info()
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(config, workdir, stage_runners={"rl": run_rl_stage})
        rows = [r for r in read_metrics(workdir) if r["stage"] == "stage4_rl"][1:]
    if not rows:
        raise SystemExit("--rounds must be >= 2 (the first round compiles and is not counted)")
    rollout = statistics.median(r["rollout_s"] for r in rows)
    update = statistics.median(r["update_s"] for r in rows)
    info = machine_info(before)
    print(f"{args.preset}: {args.prompts} prompts x {args.group} completions, up to {args.max_new_tokens} tokens, "
          f"{len(rows)} timed rounds; {describe(info)}")
    print(f"  rollout  {rollout:8.3f} s  ({rollout / (rollout + update):.0%})")
    print(f"  update   {update:8.3f} s  ({update / (rollout + update):.0%})")
    print(json.dumps({"preset": args.preset, "rounds": len(rows), "group": args.group, "prompts": args.prompts,
                      "max_new_tokens": args.max_new_tokens, "rollout_s": rollout, "update_s": update,
                      "rollout_share": rollout / (rollout + update),
                      "completion_length": statistics.mean(r["completion_length"] for r in rows), "machine": info}))


if __name__ == "__main__":
    main()
