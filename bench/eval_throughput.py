r"""``emoqwen-eval`` throughput at steady state: clips per second with start-up and compilation excluded.

  python bench/eval_throughput.py --ckpt runs/demo/stages/stage3_video --demo_dir runs/demo/demo_data \
      [--copies 4] [--rounds 3] [--batch_size N]

Copies the demo set's held-out clips ``--copies`` times under new names (so every request is processed: nothing
is cached) and writes their DFEW-style label file. Then, in this one process, it loads the checkpoint once with
the standard evaluation settings plus the demo's frame sizes (as ``emoqwen-eval --set`` would) and answers the
whole file ``--rounds`` times with ``emoqwen_jax.eval.emotion.runner.run_benchmark``, the function behind
``emoqwen-eval --benchmark``. Round 1 pays for compilation; the steady-state figure is the median clips/s of
the later rounds. It uses only names that existed before the generation engine, so it measures whichever
``emoqwen_jax`` is imported (point ``PYTHONPATH`` at another checkout to compare versions). Prints one line
per round and a JSON line with the figures and ``machine`` (load before and after).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import tempfile
import time

from machine import describe, machine_info  # bench/machine.py (this script's directory is on sys.path)

DEMO_FRAMES = {"video_min_pixels": 3136, "video_max_pixels": 12544, "video_total_pixels": 0}


def copy_clips(demo_dir: str, out: str, copies: int) -> str:
    """``out``/videos with ``copies`` copies of every held-out clip; returns the label file."""
    with open(os.path.join(demo_dir, "eval_dfew.csv")) as f:
        rows = list(csv.DictReader(f))
    os.makedirs(os.path.join(out, "videos"))
    labels = os.path.join(out, "labels.csv")
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_name", "label"])
        for k in range(copies):
            for row in rows:
                name = f"{row['video_name']}_copy{k}"
                shutil.copyfile(os.path.join(demo_dir, row["video_name"] + ".mp4"), os.path.join(out, name + ".mp4"))
                writer.writerow([name, row["label"]])
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a trained demo checkpoint (runs/demo/stages/stage3_video)")
    ap.add_argument("--demo_dir", required=True, help="its demo set (runs/demo/demo_data)")
    ap.add_argument("--copies", type=int, default=4, help="copies of the 25 held-out clips")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=8, help="emoqwen-eval --batch_size")
    args = ap.parse_args()

    from emoqwen_jax.eval.emotion.benchmarks import get_benchmark
    from emoqwen_jax.eval.emotion.runner import run_benchmark
    from emoqwen_jax.eval.suites.registry import standard_data
    from emoqwen_jax.infer.session import Session

    before = machine_info()
    rates = []
    session = Session.from_checkpoint(args.ckpt, {**standard_data(), **DEMO_FRAMES})
    sampling = session.sampling(32)  # the emotion benchmarks' standard max_new_tokens, greedy
    with tempfile.TemporaryDirectory() as tmp:
        labels = copy_clips(args.demo_dir, tmp, args.copies)
        with open(labels) as f:
            n = sum(1 for _ in f) - 1
        for r in range(args.rounds):
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # progress bars
                scores, _ = run_benchmark(session, get_benchmark("dfew"), labels, tmp, os.path.join(tmp, f"{r}.jsonl"),
                                          sampling=sampling, batch_size=args.batch_size)
            seconds = time.perf_counter() - start
            rates.append(n / seconds)
            print(f"round {r + 1}: {n} clips in {seconds:.2f} s = {n / seconds:.2f} clips/s "
                  f"({'with' if r == 0 else 'without'} compilation); uar {scores.uar:.3f}")
    info = machine_info(before)
    steady = statistics.median(rates[1:]) if len(rates) > 1 else float("nan")
    print(f"steady state: {steady:.2f} clips/s over {n} clips; {describe(info)}")
    print(json.dumps({"clips": n, "rounds_clips_per_s": rates, "steady_clips_per_s": steady,
                      "batch_size": args.batch_size, "machine": info}))


if __name__ == "__main__":
    main()
