r"""Data throughput: 16-frame 448×448 clips, decode → processed tensors, with 0 and 2 grain workers.

  python bench/data_throughput.py [--clips 48] [--workers 0 2] [--faces none extra]

Writes synthetic H.264 clips (the demo set's cartoon faces, 16 frames at 8 fps, 448×448) to a temporary
folder, then times ``SampleProcessor`` (PyAV seek + decode, sampling, smart_resize, CLIP normalisation,
patchify, tokenizer, chat template) over them through grain. All 16 frames are kept (fps = the clip's rate,
max_frames 16) and 448×448 is already a multiple of 28, so each clip gives grid (8, 32, 32) = 8192 patch
rows. Steady-state rates exclude the worker start-up, which is printed separately. Prints one line per
setting and a JSON line with all figures and ``machine`` (cores, load average before and after, and
``reliable``: false when the load exceeded the core count, i.e. the figures were taken under load).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import grain
import numpy as np
from machine import describe, machine_info  # bench/machine.py (this script's directory is on sys.path)

from emoqwen_jax.runtime.commands import command_parser


def make_clips(root: str, n: int) -> list[dict]:
    from emoqwen_jax.data import demo, manifests, video_io

    records = []
    for i in range(n):
        rel = f"clip_{i:03d}.mp4"
        video_io.write_video(os.path.join(root, rel), demo.demo_clip(i, demo.EMOTIONS[i % 5], frames=16, size=448),
                             8.0, gop=8)
        entry = {"id": rel, "video": rel, "conversations": [
            {"role": "user", "content": "<video>\nWhat emotion does the person show?"},
            {"role": "assistant", "content": f"The person looks {demo.EMOTIONS[i % 5]}."}]}
        records.append(manifests.conversation_record(entry, root, "bench", i))
    return records


def run(records: list[dict], cfg, workers: int) -> dict:
    from emoqwen_jax.data.process import SampleProcessor

    # As in the training pipeline: the map runs on the iterator, so 0 workers means the main process alone
    # (MapDataset.map before to_iter_dataset would run it on a thread pool).
    ds = grain.MapDataset.source(records).to_iter_dataset().map(SampleProcessor(cfg))
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    start = time.perf_counter()
    it = iter(ds)
    first = next(it)
    warm = time.perf_counter()
    assert "rejected" not in first, first
    rows = first["pixel_values_videos"].shape[0]
    n = 1
    for sample in it:
        assert "rejected" not in sample, sample
        n += 1
    end = time.perf_counter()
    rate = (n - 1) / (end - warm)
    cores = max(1, workers)
    return {"workers": workers, "clips": n, "startup_s": round(warm - start, 2), "clips_per_s": round(rate, 2),
            "clips_per_s_per_core": round(rate / cores, 2), "patch_rows_per_clip": int(rows)}


def main() -> None:
    parser = command_parser(__doc__, prog="python bench/data_throughput.py")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--faces", nargs="+", default=["none"], choices=["none", "extra"])
    args = parser.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (docs/design.md, grain workers and absl flags)
    from emoqwen_jax.data import defaults, load_tokenizer

    cfg = defaults.data_config()
    cfg.fps, cfg.min_frames, cfg.max_frames = 8.0, 4, 16
    cfg.max_length = 8192  # 2048 vision tokens per clip, twice with faces=extra
    load_tokenizer(cfg.tokenizer_vocab_size, cfg.tokenizer_cache_dir)  # build the cache once, outside timing
    results = []
    before = machine_info()
    with tempfile.TemporaryDirectory() as root:
        records = make_clips(root, args.clips)
        for faces in args.faces:
            cfg.faces.fusion = faces
            for workers in args.workers:
                r = run(records, cfg, workers)
                r["faces"] = faces
                results.append(r)
                print(f"faces={faces:5s} workers={workers}: {r['clips_per_s']:6.2f} clips/s, "
                      f"{r['clips_per_s_per_core']:6.2f} clips/s/core (start-up {r['startup_s']} s, "
                      f"{r['patch_rows_per_clip']} patch rows/clip)", flush=True)
    machine = machine_info(before)
    print(f"machine: {describe(machine)}", flush=True)
    print(json.dumps({"cpu_count": os.cpu_count(), "numpy": np.__version__, "machine": machine,
                      "results": results}))


if __name__ == "__main__":
    main()
