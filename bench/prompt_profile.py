r"""Where ``emoqwen-eval``'s host time per clip goes: cProfile of building the prompts of the demo's held-out clips.

  python bench/prompt_profile.py --ckpt runs/demo/stages/stage3_video --demo_dir runs/demo/demo_data

Builds the DFEW prompt of each of the 25 held-out clips ``--rounds`` times with ``Session.prompt`` and
``bench/eval_throughput.py``'s frame settings (what the evaluation's prompt threads do for every clip: open the
clip, decode and patchify the sampled frames, decode its audio into log-mel windows, tokenize), in this one
thread under cProfile with the process's CPU clock (the decoders' and converters' own threads count, other
processes' load does not), after one untimed round (imports, caches). Prints the functions by own time and,
last, a JSON line {"ms_per_clip", "top": {function: cumulative ms per clip}, "machine"}. A CPU-time profile
with the profiler's overhead on Python calls: it shows where the time goes and compares checkouts
(``PYTHONPATH`` at another one); it is not a throughput.
"""

from __future__ import annotations

import cProfile
import csv
import json
import os
import pstats
import time

from eval_throughput import DEMO_FRAMES  # bench/ (this script's directory is on sys.path)
from machine import describe, machine_info

from emoqwen_jax.runtime.commands import command_parser


def held_out_clips(demo_dir: str) -> list[str]:
    with open(os.path.join(demo_dir, "eval_dfew.csv")) as f:
        return [os.path.join(demo_dir, row["video_name"] + ".mp4") for row in csv.DictReader(f)]


def main() -> None:
    parser = command_parser(__doc__, prog="python bench/prompt_profile.py")
    parser.add_argument("--ckpt", required=True, help="a trained demo checkpoint (runs/demo/stages/stage3_video)")
    parser.add_argument("--demo_dir", required=True, help="its demo set (runs/demo/demo_data)")
    parser.add_argument("--rounds", type=int, default=8, help="profiled passes over the held-out clips")
    parser.add_argument("--top", type=int, default=25, help="functions printed")
    args = parser.parse_args()

    from emoqwen_jax.eval.emotion.benchmarks import get_benchmark
    from emoqwen_jax.eval.suites.registry import standard_data
    from emoqwen_jax.infer.session import Session

    session = Session.from_checkpoint(args.ckpt, {**standard_data(), **DEMO_FRAMES})
    question, clips = get_benchmark("dfew").prompt, held_out_clips(args.demo_dir)
    for clip in clips:
        session.prompt(question, [("video", clip)])
    before = machine_info()
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    for _ in range(args.rounds):
        for clip in clips:
            session.prompt(question, [("video", clip)])
    profile.disable()
    machine = machine_info(before)
    built = args.rounds * len(clips)
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)
    ms = stats.total_tt / built * 1e3
    cumulative = sorted(stats.stats.items(), key=lambda item: -item[1][3])[:args.top]
    top = {f"{os.path.basename(path)}:{line}({name})": round(entry[3] / built * 1e3, 3)
           for (path, line, name), entry in cumulative}
    print(f"{built} prompts: {ms:.3f} ms of CPU a clip; {describe(machine)}")
    print(json.dumps({"ms_per_clip": round(ms, 3), "clips": built, "top": top, "machine": machine}))


if __name__ == "__main__":
    main()
