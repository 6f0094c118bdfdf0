r"""Batched greedy generation: our engine (``emoqwen_jax.infer.engine``) against transformers' ``generate`` on the
same weights.

  python bench/generate.py [--preset small] [--rows 8] [--new_tokens 64] [--runs 3] [--decode_steps 1]
  python bench/generate.py --preset tiny --rows 2 --new_tokens 8 --runs 1      # a quick check that it runs

The weights: a Qwen2.5-VL of the preset's sizes with transformers' random initialisation, saved with
``save_pretrained`` (safetensors) into a temporary directory; our side reads the same files through the HF
import path (``from_hf`` with 1 expert: exactly Qwen2.5-VL's merger, the architecture HF has). The batch:
``--rows`` prompts, each one 224x224 image (grid 1x16x16: 256 patches, 64 image tokens) in a short text of
its own length, ``--new_tokens`` new tokens per row (EOS ignored: every row generates the same count; HF with
``min_new_tokens``), greedy, float32. Each framework runs in its OWN process (torch's OpenMP threads keep
spinning after a call and slow JAX in the same process), one after the other: ``--warmup`` untimed runs
(compilation), then ``--runs`` timed runs of the whole batch (prefill + decode), median.

Prints a table and, last, a JSON line {"jax_tokens_per_s", "torch_tokens_per_s", "ratio", "same_tokens",
"machine"} (``machine``: ``bench/machine.py``'s ``machine_info()``; figures from a loaded machine are marked
unreliable there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emoqwen_jax.runtime.commands import command_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GRID = (1, 16, 16)  # one 224x224 image


def model_config(preset: str):
    import emotion_qwen

    from emoqwen_jax.model import ModelConfig

    return ModelConfig.from_run_config(emotion_qwen.get_config(preset))


def prompts(mcfg, rows: int) -> list[tuple[list[int], np.ndarray]]:
    """(token ids, pixel rows float32[256, 1176]) per row: text of 4 + 3·row tokens, the image, 6 more tokens."""
    rng = np.random.default_rng(0)
    image = [mcfg.vision_start_token_id] + [mcfg.image_token_id] * (int(np.prod(GRID)) // 4) + \
        [mcfg.vision_end_token_id]
    out = []
    for r in range(rows):
        ids = [int(i) for i in rng.integers(20, 500, 4 + 3 * r)] + image + [int(i) for i in rng.integers(20, 500, 6)]
        out.append((ids, rng.standard_normal((int(np.prod(GRID)), 1176)).astype(np.float32)))
    return out


def run_jax(args) -> dict:
    from emoqwen_jax.convert import from_hf
    from emoqwen_jax.infer.engine import Engine, SamplingParams
    from emoqwen_jax.infer.feed import cache_length
    from emoqwen_jax.infer.session import Prompt, Session

    model = from_hf(args.weights, dtype="float32", compressor={"num_experts": 1})
    session = Session(model, {"tokenizer_cache_dir": args.tokenizer_cache})
    batch = [Prompt(np.asarray(ids, np.int32), {"pixel_values": pix, "image_grid_thw": np.array([GRID])})
             for ids, pix in prompts(model.config, args.rows)]
    longest = max(len(p.input_ids) for p in batch)
    engine = Engine(session, max_batch=args.rows, max_len=cache_length(longest + args.new_tokens),
                    prefill_batch=args.rows, decode_steps=args.decode_steps)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)

    def once():
        done = engine.generate(batch, params)
        return [c.token_ids for c in done]

    return timed(once, args)


def run_torch(args) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.weights, dtype=torch.float32).eval()
    mcfg = model_config(args.preset)
    rows = prompts(mcfg, args.rows)
    length = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), length), np.int64)  # left-padded, as generate wants
    mask = np.zeros_like(ids)
    for i, (r, _) in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    types = np.where(ids == mcfg.image_token_id, 1, 0)
    kwargs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                  mm_token_type_ids=torch.as_tensor(types),
                  pixel_values=torch.as_tensor(np.concatenate([p for _, p in rows])),
                  image_grid_thw=torch.as_tensor(np.array([GRID] * len(rows))))

    def once():
        model.model.rope_deltas = None
        with torch.no_grad():
            out = model.generate(**kwargs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, length:].tolist()

    return timed(once, args)


def timed(once, args) -> dict:
    for _ in range(args.warmup):
        tokens = once()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        tokens = once()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"seconds": seconds, "times_s": times, "tokens_per_s": args.rows * args.new_tokens / seconds,
            "tokens": tokens}


def child(args, side: str, weights: str, cache: str) -> dict:
    from train_step import run_json

    cmd = [sys.executable, __file__, "--side", side, "--weights", weights, "--tokenizer_cache", cache,
           "--preset", args.preset, "--rows", str(args.rows), "--new_tokens", str(args.new_tokens),
           "--runs", str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--decode_steps", str(args.decode_steps)]
    return run_json(cmd, echo=False)


def main(argv=None) -> dict:
    ap = command_parser(__doc__, prog="python bench/generate.py")
    ap.add_argument("--preset", default="small", help="configs/emotion_qwen.py preset for the sizes")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--decode_steps", type=int, default=1, help="our engine's tokens per decode call")
    ap.add_argument("--side", choices=("both", "jax", "torch"), default="both", help=argparse.SUPPRESS)
    ap.add_argument("--weights", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer_cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side != "both":
        result = run_jax(args) if args.side == "jax" else run_torch(args)
        print(json.dumps(result))
        return result

    from machine import describe, machine_info
    from train_step import hf_model

    before = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        weights, cache = str(Path(tmp) / "hf"), str(Path(tmp) / "tokenizer")
        hf_model(model_config(args.preset)).eval().save_pretrained(weights)
        ours = child(args, "jax", weights, cache)
        theirs = child(args, "torch", weights, cache)
    machine = machine_info(before)
    same = float(np.mean([a == b for a, b in zip(ours["tokens"], theirs["tokens"], strict=True)]))
    report = {"preset": args.preset, "rows": args.rows, "new_tokens": args.new_tokens, "runs": args.runs,
              "decode_steps": args.decode_steps,
              "jax_tokens_per_s": round(ours["tokens_per_s"], 1),
              "torch_tokens_per_s": round(theirs["tokens_per_s"], 1),
              "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2), "same_tokens": same,
              "jax_times_s": ours["times_s"], "torch_times_s": theirs["times_s"], "machine": machine}
    print(f"{'':<24}{'tokens/s':>10}{'median s':>10}")
    print(f"{'ours (engine)':<24}{ours['tokens_per_s']:>10.1f}{ours['seconds']:>10.3f}")
    print(f"{'transformers generate':<24}{theirs['tokens_per_s']:>10.1f}{theirs['seconds']:>10.3f}")
    print(f"ratio {report['ratio']}x; rows with identical tokens {same:.2f}; {describe(machine)}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
