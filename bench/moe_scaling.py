r"""Scale-mode compressor cost against the number of experts (one CPU device).

  python bench/moe_scaling.py [--experts 2 8 32 64] [--units 576] [--runs 5]

The Hybrid Compressor in scale mode (routing='token', top_k 2, capacity factor 1.25, einsum dispatch) on the
``small`` preset's widths (ViT 256 -> token input 1024, LLM 512): forward + backward (gradients of the expert,
router weights and the input features) on ``units`` merged tokens (576 = a 16-frame 224x224 video + one
image's worth). Rounds interleave the expert counts; medians after one warm-up.

With capacity C = ceil(T * k / E * factor), the routed work E * C ≈ T * k * factor rows and the one-hot
dispatch/combine tensors [T, E, C] hold ≈ T² * k * factor entries — both independent of E. What does grow
with E is the expert weights themselves (E * (I² + I * O) parameters, read once and written once as gradients)
and the router's [T, E] logits. The table prints the analytic FLOPs beside the time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))


def make_step(num_experts: int, units: int, top_k: int, capacity_factor: float):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import emotion_qwen
    from emoqwen_jax.model import ModelConfig
    from emoqwen_jax.model.compressor import HybridCompressor

    config = emotion_qwen.get_config("small")
    config.model.compressor.update(routing="token", num_experts=num_experts, expert_names=(), top_k=top_k,
                                   capacity_factor=capacity_factor, dispatch="einsum")
    mc = ModelConfig.from_run_config(config)
    comp = HybridCompressor(mc.compressor, mc.vision, mc.text.hidden_size, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(comp, nnx.Param)
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.standard_normal((units * 4, mc.vision.hidden_size)), jnp.float32)
    patch_item = jnp.zeros((units * 4,), jnp.int32)
    target = jnp.asarray(rng.standard_normal((units, mc.text.hidden_size)), jnp.float32)

    def loss(p, x):
        tokens, _, aux = nnx.merge(graphdef, p)(x, patch_item, 1)
        return jnp.mean((tokens - target) ** 2) + aux["aux_loss"]

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = step.lower(params, features).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def run():
        out = compiled(params, features)
        jax.block_until_ready(out)

    return run, float(cost.get("flops", 0.0)), n_params, mc


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 8, 32, 64])
    ap.add_argument("--units", type=int, default=576)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--capacity_factor", type=float, default=1.25)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from emoqwen_jax.model.moe import capacity
    from emoqwen_jax.train import flops

    steps = {e: make_step(e, args.units, args.top_k, args.capacity_factor) for e in args.experts}
    times = {e: [] for e in args.experts}
    for i in range(args.runs + 1):
        for e, (run, *_rest) in steps.items():
            t0 = time.perf_counter()
            run()
            if i:
                times[e].append((time.perf_counter() - t0) * 1e3)
    print(f"compressor fwd+bwd, routing='token', top_k {args.top_k}, capacity factor {args.capacity_factor}, "
          f"{args.units} tokens, 1 CPU device (jax {jax.__version__}); load avg "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("\n| E | capacity C | E·C rows | expert params | analytic GFLOP | XLA GFLOP | median ms | min ms |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for e, (run, xla, n_params, mc) in steps.items():
        cap = capacity(args.units, e, args.top_k, args.capacity_factor)
        analytic = 3 * flops.compressor_flops(mc, args.units)
        med = statistics.median(times[e])
        rows[e] = {"ms": round(med, 2), "capacity": cap, "params": n_params, "xla_gflop": round(xla / 1e9, 3)}
        print(f"| {e} | {cap} | {e * cap} | {n_params / 1e6:.1f} M | {analytic / 1e9:.2f} | {xla / 1e9:.2f} | "
              f"{med:.1f} | {min(times[e]):.1f} |")
    print(json.dumps({"ms_by_experts": {e: r["ms"] for e, r in rows.items()}, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
