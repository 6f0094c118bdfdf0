r"""Scale-mode compressor cost against the number of experts and the number of tokens (one device).

  python bench/moe_scaling.py --experts 2 64 --units 2304 9216 [--dispatch einsum|shard_map|ragged] [--runs N] \
      [--capacity_factor F]

The Hybrid Compressor in scale mode (routing='token', top_k 2, the config's capacity factor and routing group
size) on the ``small`` preset's widths (ViT 256 -> token input 1024, LLM 512): forward + backward (gradients of
the expert and router weights and of the input features) on ``units`` merged tokens. Dispatch is the config's
default unless ``--dispatch`` is given. Rounds interleave every (E, T) pair; medians after one warm-up round.

With routing groups of S tokens and capacity C = min(S, ceil(S * k / E * factor)) per group, the per-group
layout has (T / S) * E * C buffer rows ("buffer_rows"), of which at most T * k hold a kept assignment ("kept";
the rest is padding). For E >= k * factor that is T * k * factor rows, independent of E; for small E the clip at
S removes the padding (E = 2, k = 2: every token goes to both experts, E * C = S * k, nothing to pad), so at the
default factor 1.25 the padded layout gives E = 64 1.25x the rows of E = 2. On one device the dispatch packs
each expert's kept rows first and its matmuls stop at the smallest of a few sizes that holds the fullest expert
(``emoqwen_jax.model.moe.run_compact``): "matmul_rows" = E x that size, what the expert matmuls really multiply
(the fullest expert's excess over the mean is what remains). ``--capacity_factor 1.0`` compares E's at equal
buffer rows. Beyond the rows, E costs its expert weights (E * (I² + I * O) parameters, read and written as
gradients once) and the router's [T, E] logits. The sort-based dispatch costs ~ T * k, so the step grows
linearly in T. ``ragged`` is dropless and runs ``jax.lax.ragged_dot``, which XLA:CPU lowers to a dense masked
matmul (E x the FLOPs): on CPU it is the correctness reference, on accelerators the grouped-matmul path.

The process runs with the training CLI's malloc settings (``emoqwen_jax.runtime.malloc.tune_malloc``): with glibc's
defaults every step maps and page-faults its scratch buffers afresh, a cost that grows with the step's bytes
(E = 64 at 9,216 tokens: ~400k faults per step against ~180k at E = 2) and is absent from training.

Prints a table and, last, a JSON line ``{"rows": [{"experts", "units", "ms", "min_ms", "capacity",
"group_size", "dispatch", "buffer_rows", "kept", "matmul_rows", "params", "xla_gflop", "analytic_gflop"}, …],
"machine": machine_info(), "malloc_tuned": bool}``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from emoqwen_jax.runtime.commands import command_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def bench_config(num_experts: int, dispatch: str | None, top_k: int, capacity_factor: float | None = None):
    import emotion_qwen

    config = emotion_qwen.get_config("small")
    config.model.compressor.update(routing="token", num_experts=num_experts, top_k=top_k)
    if dispatch:
        config.model.compressor.dispatch = dispatch
    if capacity_factor is not None:
        config.model.compressor.capacity_factor = capacity_factor
    return config


def packed_rows(comp, features, c, num_experts: int, units: int) -> int:
    """E x the rows per expert that the one-device capacity path multiplies (``moe.run_compact``), or the
    buffer rows where it does not apply (``ragged``: T * k; C = S: the padded layout)."""
    import jax
    import jax.numpy as jnp

    from emoqwen_jax.model import moe

    if c.dispatch == "ragged":
        return units * c.top_k
    cap = moe.capacity(c.group_size, num_experts, c.top_k, c.capacity_factor)
    groups = -(-units // c.group_size)
    if cap >= c.group_size:
        return groups * num_experts * cap
    x = features.reshape(units, -1)
    ids, _, _ = moe.route(comp.router(x.astype(jnp.float32)), c.top_k)
    pad = groups * c.group_size - units
    ids = jnp.pad(ids, ((0, pad), (0, 0)))
    valid = jnp.arange(groups * c.group_size) < units
    slot, keep = jax.vmap(lambda e, v: moe.group_slots(e, v, num_experts, cap))(
        moe.to_groups(ids, c.group_size), moe.to_groups(valid, c.group_size))
    _, _, used = moe.compact_rows(slot, keep, num_experts, cap)
    size = next(r for r in moe.compact_sizes(groups * cap) if r >= int(used.max()))
    return num_experts * size


def make_step(num_experts: int, units: int, dispatch: str | None, top_k: int, capacity_factor: float | None = None):
    """A compiled forward + backward of the compressor on ``units`` tokens; (run, XLA FLOPs, params, config,
    kept assignments)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emoqwen_jax.model import ModelConfig
    from emoqwen_jax.model.compressor import HybridCompressor

    mc = ModelConfig.from_run_config(bench_config(num_experts, dispatch, top_k, capacity_factor))
    comp = HybridCompressor(mc.compressor, mc.vision, mc.text.hidden_size, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(comp, nnx.Param)
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.standard_normal((units * 4, mc.vision.hidden_size)), jnp.float32)
    patch_item = jnp.zeros((units * 4,), jnp.int32)
    target = jnp.asarray(rng.standard_normal((units, mc.text.hidden_size)), jnp.float32)

    def loss(p, x):
        tokens, _, aux = nnx.merge(graphdef, p)(x, patch_item, 1)
        return jnp.mean((tokens - target) ** 2) + aux["aux_loss"], aux["dropped_assignments"]

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(params, features).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    (_, dropped), _ = compiled(params, features)
    kept = units * mc.compressor.top_k - int(dropped)
    matmul_rows = packed_rows(comp, features, mc.compressor, num_experts, units)

    def run():
        jax.block_until_ready(compiled(params, features))

    return run, float(cost.get("flops", 0.0)), n_params, mc, kept, matmul_rows


def main(argv=None) -> dict:
    ap = command_parser(__doc__, prog="python bench/moe_scaling.py")
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 64])
    ap.add_argument("--units", type=int, nargs="+", default=[2304, 9216], help="merged tokens per step")
    ap.add_argument("--dispatch", default=None, choices=("einsum", "shard_map", "ragged"),
                    help="default: the config's compressor.dispatch")
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--capacity_factor", type=float, default=None,
                    help="default: the config's compressor.capacity_factor (1.0: E=64 computes E=2's buffer rows)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from emoqwen_jax.runtime.malloc import tune_malloc

    tuned = tune_malloc()  # before JAX allocates, as the training CLI does
    import jax
    from machine import describe, machine_info

    from emoqwen_jax.model.moe import capacity
    from emoqwen_jax.train import flops

    pairs = [(e, t) for e in args.experts for t in args.units]
    steps = {p: make_step(*p, args.dispatch, args.top_k, args.capacity_factor) for p in pairs}
    before = machine_info()
    times = {p: [] for p in pairs}
    for i in range(args.runs + 1):  # round 0 warms up
        for p, (run, *_rest) in steps.items():
            t0 = time.perf_counter()
            run()
            if i:
                times[p].append((time.perf_counter() - t0) * 1e3)
    info = machine_info(before)
    rows = []
    for (e, t), (_, xla, n_params, mc, kept, matmul_rows) in steps.items():
        c = mc.compressor
        cap = t if c.dispatch == "ragged" else capacity(c.group_size, e, c.top_k, c.capacity_factor)
        buffer_rows = t * c.top_k if c.dispatch == "ragged" else -(-t // c.group_size) * e * cap
        rows.append({"experts": e, "units": t, "ms": round(statistics.median(times[(e, t)]), 2),
                     "min_ms": round(min(times[(e, t)]), 2), "dispatch": c.dispatch, "group_size": c.group_size,
                     "capacity": cap, "capacity_factor": c.capacity_factor, "buffer_rows": buffer_rows, "kept": kept,
                     "matmul_rows": matmul_rows,
                     "params": n_params,
                     "xla_gflop": round(xla / 1e9, 3),
                     "analytic_gflop": round(3 * flops.compressor_flops(mc, t) / 1e9, 3)})
    print(f"compressor fwd+bwd, routing='token', top_k {args.top_k}, 1 device (jax {jax.__version__}, "
          f"{jax.default_backend()}); {describe(info)}")
    print("\n| E | tokens | dispatch | group S | capacity C | buffer rows | kept | matmul rows | expert params |"
          " analytic GFLOP | XLA GFLOP | median ms | min ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experts']} | {r['units']} | {r['dispatch']} | {r['group_size']} | {r['capacity']} | "
              f"{r['buffer_rows']} | {r['kept']} | {r['matmul_rows']} | "
              f"{r['params'] / 1e6:.1f} M | {r['analytic_gflop']:.2f} | {r['xla_gflop']:.2f} | {r['ms']:.1f} | "
              f"{r['min_ms']:.1f} |")
    out = {"rows": rows, "runs": args.runs, "machine": info, "malloc_tuned": tuned}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
