"""Token routing for the Hybrid Compressor's scale mode: top-k router, capacity, load-balancing and z losses,
and the two expert-parallel dispatch paths.

Shapes: T tokens (merged 2x2 units), E experts, k = top_k, C capacity per expert, I = 4 * ViT width
(a token's input), O = LLM width.

* ``einsum``: GSPMD. One-hot dispatch [T, E, C] and combine [T, E, C] tensors; the expert buffers
  [E, C, I] are constrained to the ``expert`` mesh axis, so XLA inserts the all-to-alls.
* ``shard_map``: explicit. Each device routes its own tokens into [E, C_local, I] buffers, one
  ``all_to_all`` over ``expert`` sends every expert's slice to the device that holds it, the local experts
  run on [E/ep, ep * C_local, I], and a second ``all_to_all`` brings the results home. Capacity is then per
  device group (C_local from the local token count), as in GShard.

Priority when an expert overflows: every token's first choice before any second choice, then token order.
A token whose k assignments were all dropped gets a zero vector (its expert contribution is empty, exactly
as a dropped token in a residual MoE contributes nothing); kept weights are not renormalised (Switch).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from emoqwen_jax.model import sharding

Array = jax.Array
ExpertFn = Callable[[Array, tuple], Array]  # (buffers [E', C', I], expert params sliced to E') -> [E', C', O]


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Per-expert buffer rows: ceil(T * k / E * factor); ``factor <= 0`` is dropless (C = T)."""
    if capacity_factor <= 0:
        return num_tokens
    return max(1, min(num_tokens, math.ceil(num_tokens * top_k / num_experts * capacity_factor)))


def route(logits: Array, top_k: int) -> tuple[Array, Array, Array]:
    """logits float32[T, E] -> (expert ids int32[T, k], weights float32[T, k] softmaxed over the chosen k,
    router probabilities float32[T, E] over all experts)."""
    top_logits, expert_ids = jax.lax.top_k(logits, top_k)
    return expert_ids, jax.nn.softmax(top_logits, axis=-1), jax.nn.softmax(logits, axis=-1)


def aux_sums(logits: Array, probs: Array, expert_ids: Array, valid: Array) -> dict[str, Array]:
    """Sums over valid tokens from which the global losses are formed (summable across devices)."""
    v = valid.astype(jnp.float32)
    assigned = jax.nn.one_hot(expert_ids, probs.shape[-1], dtype=jnp.float32).sum(1) * v[:, None]  # [T, E]
    return {"tokens": v.sum(), "assigned": assigned.sum(0), "probs": (probs * v[:, None]).sum(0),
            "z": (jnp.square(jax.nn.logsumexp(logits, axis=-1)) * v).sum()}


def aux_losses(sums: dict[str, Array], top_k: int) -> tuple[Array, Array]:
    """Switch load-balancing loss E * sum_e f_e * P_e (f_e: fraction of the k-assignments that chose e,
    P_e: mean router probability of e) and the router z-loss mean(logsumexp(logits)^2)."""
    num_experts = sums["probs"].shape[-1]
    n = jnp.maximum(sums["tokens"], 1.0)
    fraction = sums["assigned"] / (n * top_k)
    mean_prob = sums["probs"] / n
    return num_experts * jnp.sum(fraction * mean_prob), sums["z"] / n


def dispatch_combine(expert_ids: Array, weights: Array, valid: Array, num_experts: int,
                     cap: int) -> tuple[Array, Array, dict[str, Array]]:
    """One-hot dispatch bool[T, E, C] and combine float32[T, E, C]; counts of dropped assignments/tokens."""
    t, k = expert_ids.shape
    onehot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.int32) * valid[:, None, None]  # [T, k, E]
    by_priority = jnp.swapaxes(onehot, 0, 1).reshape(k * t, num_experts)  # all first choices first
    position = jnp.cumsum(by_priority, axis=0) - 1
    keep = (by_priority > 0) & (position < cap)
    position = jnp.swapaxes(position.reshape(k, t, num_experts), 0, 1)  # [T, k, E]
    keep = jnp.swapaxes(keep.reshape(k, t, num_experts), 0, 1)
    slot = jax.nn.one_hot(jnp.where(keep, position, -1), cap, dtype=jnp.float32)  # [T, k, E, C]
    combine = jnp.einsum("tk,tkec->tec", weights.astype(jnp.float32), slot)
    dispatch = slot.sum(1) > 0
    kept = keep.sum((1, 2))
    counts = {"dropped_assignments": (onehot.sum() - keep.sum()).astype(jnp.float32),
              "dropped_tokens": jnp.sum(valid & (kept == 0)).astype(jnp.float32)}
    return dispatch, combine, counts


def _local_moe(x, logits, valid, params, expert_fn: ExpertFn, *, top_k, capacity_factor, axis_name=None,
               annotate=False):
    """Route, dispatch, run experts and combine for the tokens of one device (or all of them).

    With ``axis_name`` (inside shard_map) the expert buffers travel to their devices by all_to_all; with
    ``annotate`` (GSPMD) they are constrained to the expert mesh axis instead."""
    num_experts = logits.shape[-1]
    expert_ids, weights, probs = route(logits, top_k)
    cap = capacity(x.shape[0], num_experts, top_k, capacity_factor)
    dispatch, combine, counts = dispatch_combine(expert_ids, weights, valid, num_experts, cap)
    buffers = jnp.einsum("tec,ti->eci", dispatch.astype(x.dtype), x)  # [E, C, I]
    if annotate:
        buffers = sharding.constrain(buffers, ("expert", None, None))
    if axis_name is not None:
        buffers = jax.lax.all_to_all(buffers, axis_name, split_axis=0, concat_axis=1, tiled=True)  # [E/ep, ep*C, I]
    out = expert_fn(buffers, params)
    if annotate:
        out = sharding.constrain(out, ("expert", None, None))
    if axis_name is not None:
        out = jax.lax.all_to_all(out, axis_name, split_axis=1, concat_axis=0, tiled=True)  # [E, C, O]
    y = jnp.einsum("tec,eco->to", combine.astype(out.dtype), out)
    return y, aux_sums(logits, probs, expert_ids, valid), counts


def token_moe(x: Array, logits: Array, valid: Array, params: tuple, expert_fn: ExpertFn, *, top_k: int,
              capacity_factor: float, dispatch: str) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """Token-routed experts.

    Args:
      x: float[T, I] tokens; logits: float32[T, E] router logits; valid: bool[T] (False = padding).
      params: expert parameters, each stacked on a leading E axis.
    Returns:
      y float[T, O], summed aux statistics (see ``aux_losses``), drop counts.
    """
    if dispatch == "ragged":
        raise ValueError("compressor.dispatch='ragged' needs ragged_all_to_all, which XLA:CPU lacks; this build "
                         "offers 'einsum' and 'shard_map'")
    if dispatch not in ("einsum", "shard_map"):
        raise ValueError(f"compressor.dispatch={dispatch!r}; choose 'einsum' or 'shard_map'")
    ctx = sharding.current()
    kw = dict(top_k=top_k, capacity_factor=capacity_factor)
    if dispatch == "einsum" or ctx is None:
        return _local_moe(x, logits, valid, params, expert_fn, annotate=ctx is not None, **kw)
    mesh, rules = ctx
    batch_axes = tuple(a for a in rules.get("units", ()) if mesh.shape.get(a, 1) > 1)
    expert_axis = "expert" if mesh.shape.get("expert", 1) > 1 else None
    tok = PartitionSpec(batch_axes or None)
    par = PartitionSpec(expert_axis)

    def body(x, logits, valid, params):
        y, sums, counts = _local_moe(x, logits, valid, params, expert_fn, axis_name=expert_axis, **kw)
        if batch_axes:  # global statistics, so the losses equal the single-device ones
            sums = jax.lax.psum(sums, batch_axes)
            counts = jax.lax.psum(counts, batch_axes)
        return y, sums, counts

    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, jax.tree.map(lambda _: par, params)),
                       out_specs=(tok, PartitionSpec(), PartitionSpec()), check_vma=False)
    return fn(x, logits, valid, params)
