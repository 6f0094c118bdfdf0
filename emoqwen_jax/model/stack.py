"""Running a stack of layers: a Python loop or one ``lax.scan``, each layer optionally rematerialised.

The parameter tree never changes: layers stay separate modules (``layers/3/...`` paths, which HF conversion,
LoRA targets, stage ``trainable`` regexes and checkpoints rely on). For ``scan`` their states are stacked on
the fly inside the forward pass (a copy of the stack's weights, in their storage dtype) and the scan body
rebuilds one layer from a slice, so XLA compiles one layer instead of ``depth`` of them.

Layers that differ in structure (the ViT's window and full-attention blocks) are scanned in *groups* of
``period`` consecutive layers: layer ``g * period + i`` has the structure of layer ``i`` for every group g, and
the body runs the ``period`` layers of one group. When the layers do not repeat with that period (e.g. LoRA on
some layers only) the stack falls back to the loop.

Remat policies (``config.model.remat``):
  none           keep every activation for the backward pass;
  block          keep only each layer's input, recompute the layer in the backward pass;
  dots_saveable  keep the matmul outputs of each layer, recompute the elementwise work.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
log = logging.getLogger(__name__)

REMAT_POLICIES = ("none", "block", "dots_saveable")


def remat_name(remat) -> str:
    """Accepts the config string or a bool (True = 'block', the older flag)."""
    if isinstance(remat, bool):
        return "block" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r}; choose one of {REMAT_POLICIES}")
    return remat


def _checkpointed(fn: Callable, remat: str) -> Callable:
    if remat == "none":
        return fn
    policy = jax.checkpoint_policies.dots_saveable if remat == "dots_saveable" else None
    return jax.checkpoint(fn, policy=policy)


def run_stack(layers: Sequence[nnx.Module], x: Array, call: Callable[[int, nnx.Module, Array], Array], *,
              scan: bool, remat, period: int = 1) -> Array:
    """Applies ``x = call(i, layers[i], x)`` for every layer in order and returns x.

    ``call`` must be pure in the layer (no state updates) and may close over per-call arrays (rotary tables,
    segment ids). ``period``: layers i and i + period share a structure (see the module docstring).
    """
    remat = remat_name(remat)
    n = len(layers)
    splits = [nnx.split(layer) for layer in layers]

    def one(i: int):
        graphdef = splits[i][0]
        return _checkpointed(lambda state, x: call(i, nnx.merge(graphdef, state), x), remat)

    groups = n // period if period and n % period == 0 else 0
    same = groups > 1 and all(splits[g * period + i][0] == splits[i][0] for g in range(groups) for i in range(period))
    if scan and not same:
        log.info("scan_layers: %d layers do not repeat with period %d; running them in a loop", n, period)
    if not (scan and same):
        for i in range(n):
            x = one(i)(splits[i][1], x)
        return x

    stacked = [jax.tree.map(lambda *leaves: jnp.stack(leaves), *[splits[g * period + i][1] for g in range(groups)])
               for i in range(period)]
    bodies = [one(i) for i in range(period)]

    def body(x, group_states):
        for i in range(period):
            x = bodies[i](group_states[i], x)
        return x, None

    x, _ = jax.lax.scan(body, x, stacked)
    return x
