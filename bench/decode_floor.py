r"""The floors under generation: the time to read the decoder's weights once (a decode step), and the matmul
rate (a prefill).

  python bench/decode_floor.py [--rows 8] [--runs 50]

Times a jitted chain of the `small` decoder's weight products (8 layers of q, k, v, o, gate, up, down and
the LM head, float32, ``--rows`` rows: the batch of `bench/generate.py`) and a numpy sum over 200 MB (memory
bandwidth). A decode step cannot be faster than reading its weights once; `bench/generate.py` says how close
the engine's step comes. A prefill is bound by arithmetic instead: it also times one jitted float32 matmul of the
decoder's MLP shape at the prefill of `bench/generate.py` (1024 tokens x 512 -> 1408) and prints its GFLOP/s.
Prints a JSON line with the figures and ``machine_info()``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from emoqwen_jax.runtime.commands import command_parser

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYERS, D, KV, FF, VOCAB = 8, 512, 128, 1408, 4096  # emoqwen_jax/sizes.py "small" text sizes


def median_s(fn, runs: int) -> float:
    """Median wall seconds of ``fn()`` (a jitted call; blocks on its result) over ``runs`` calls after one warm-up."""
    fn().block_until_ready()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn().block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = command_parser(__doc__, prog="python bench/decode_floor.py")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from machine import describe, machine_info

    before = machine_info()
    big = np.ones(50_000_000, np.float32)  # 200 MB, far beyond any cache
    big.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        big.sum()
    sum_gb_s = 5 * big.nbytes / (time.perf_counter() - t0) / 1e9

    rng = np.random.default_rng(0)
    shapes = [(D, D), (D, KV), (D, KV), (D, D), (D, FF), (D, FF), (FF, D)]
    layers = [[jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes] for _ in range(LAYERS)]
    head = jnp.asarray(rng.standard_normal((D, VOCAB), np.float32) * 0.02)
    weight_bytes = sum(int(w.nbytes) for layer in layers for w in layer) + int(head.nbytes)

    @jax.jit
    def chain(x, layers, head):
        for q, k, v, o, gate, up, down in layers:
            x = x + (x @ q) @ o + 0 * ((x @ k).sum() + (x @ v).sum())  # k and v are read, as in a step
            x = x + (jax.nn.silu(x @ gate) * (x @ up)) @ down
        return x @ head

    x = jnp.ones((args.rows, D), jnp.float32)
    step_s = median_s(lambda: chain(x, layers, head), args.runs)

    tokens = jnp.asarray(rng.standard_normal((1024, D), np.float32))
    up = jnp.asarray(rng.standard_normal((D, FF), np.float32))
    matmul = jax.jit(jnp.matmul)
    matmul_gflop_s = 2 * 1024 * D * FF / median_s(lambda: matmul(tokens, up), args.runs) / 1e9
    machine = machine_info(before)
    report = {"rows": args.rows, "weight_mb": round(weight_bytes / 1e6, 1), "chain_ms": round(step_s * 1e3, 3),
              "chain_gb_s": round(weight_bytes / step_s / 1e9, 1), "numpy_sum_gb_s": round(sum_gb_s, 1),
              "matmul_gflop_s": round(matmul_gflop_s), "machine": machine}
    print(f"weights {report['weight_mb']} MB: {report['chain_ms']} ms a chain ({report['chain_gb_s']} GB/s); "
          f"numpy sum {report['numpy_sum_gb_s']} GB/s; matmul {report['matmul_gflop_s']} GFLOP/s; "
          f"{describe(machine)}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
