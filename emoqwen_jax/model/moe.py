"""Token routing for the Hybrid Compressor's scale mode: top-k router, capacity per routing group, the
load-balancing and z losses, and three dispatch modes with linear cost in the number of tokens.

Shapes: T tokens (merged 2x2 units), S tokens per routing group, G = T / S groups, E experts, k = top_k,
C capacity per expert and group, A = T * k assignments, I = 4 * ViT width (a token's input), O = LLM width.

Routing groups. Tokens are cut into fixed chunks of S = ``group_size`` consecutive tokens; capacity and drops
are counted per group. A group never depends on the mesh, so the same batch keeps the same tokens and drops
on any mesh and any dispatch (the data-parallel shards hold whole groups).

Inside a group (``group_slots``): the k * S assignments are ordered by priority — every token's first choice
before any second choice, then token order — and a stable sort by expert gives each assignment its position
in its expert's buffer; positions >= C are dropped. Tokens are then gathered into float[E, C, I] buffers and
the expert outputs gathered back (no one-hot [T, E, C] tensors: cost ~ T * k, not T^2).

Padding. Of the E * C rows a group gives each expert only the kept ones are real: with capacity factor 1.25 the
dense expert matmuls on [E, G * C, I] buffers do >= 25 % more work than the assignments need (E = 2, k = 2 is
the exception: C is clipped at S and every token fills both buffers). On one device (``run_compact``) the kept
rows of all groups are packed to the front of each expert's [G * C] rows, and the expert matmuls
(``expert_matmul``) multiply only the first R rows, R the smallest of a few static sizes (``compact_sizes``:
5/8 ... 8/8 of G * C) that holds the fullest expert, picked at run time by ``lax.switch``. The drops are those of
the groups, so the result is the same; only the padding's matmuls are skipped.

Dispatch modes:
* ``einsum``: GSPMD. Buffers [G, E, C, I] sharded by group over the batch axes are transposed to
  [E, G, C, I] sharded by expert, so XLA inserts an all-to-all there and on the way back.
* ``shard_map``: the same buffers, moved explicitly by ``all_to_all`` over the expert mesh axis
  (``emoqwen_jax.model.moe_dispatch``, which also holds the entry point ``token_moe``).
* ``ragged``: dropless. Assignments sorted by expert run through ``jax.lax.ragged_dot`` (grouped matmul), with
  no capacity and no drops (``capacity_factor`` is ignored). Under a mesh it runs in shard_map with a padded
  ``all_to_all`` to the expert's device.

A token whose k assignments were all dropped gets a zero vector (a dropped token in a residual MoE contributes
nothing); kept weights are not renormalised (Switch).
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp

from emoqwen_jax.model import sharding

Array = jax.Array
DISPATCH_MODES = ("einsum", "shard_map", "ragged")


class Experts(Protocol):
    """The expert computation, pure in its stacked parameters (so shard_map can hand each device its own)."""

    def apply(self, buffers: Array, params: tuple, rows: tuple | None = None) -> Array:
        """float[E', C, I] with params sliced to the same E' experts -> float[E', C, O]. ``rows`` (from
        ``run_compact``: only the first rows of each expert are real) is passed on to ``expert_matmul``."""

    def apply_ragged(self, rows: Array, group_sizes: Array, params: tuple) -> Array:
        """float[M, I] rows sorted by expert, int32[E'] rows per expert -> float[M, O] (rows past the sum of
        ``group_sizes`` are padding; their values are ignored)."""


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Per-expert buffer rows of one routing group: ceil(S * k / E * factor), at most S (an expert gets at most
    one assignment per token); ``factor <= 0`` is dropless (C = S)."""
    if capacity_factor <= 0:
        return group_size
    return max(1, min(group_size, math.ceil(group_size * top_k / num_experts * capacity_factor)))


def route(logits: Array, top_k: int) -> tuple[Array, Array, Array]:
    """logits float32[T, E] -> (expert ids int32[T, k], weights float32[T, k] softmaxed over the chosen k,
    router probabilities float32[T, E] over all experts)."""
    # k rounds of argmax rather than lax.top_k: XLA's TopK gathers a token-sharded operand onto every device,
    # argmax stays sharded. Ties go to the lower expert id, as in top_k.
    ids = []
    masked = logits
    for _ in range(top_k):
        best = jnp.argmax(masked, axis=-1).astype(jnp.int32)
        ids.append(best)
        masked = jnp.where(jax.nn.one_hot(best, logits.shape[-1], dtype=bool), -jnp.inf, masked)
    expert_ids = jnp.stack(ids, axis=-1)
    top_logits = jnp.take_along_axis(logits, expert_ids, axis=-1)
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


def sort_by_expert(expert_ids: Array, num_experts: int) -> tuple[Array, Array, Array]:
    """Stable sort of assignment ids int32[A] (the value ``num_experts`` marks "none") -> (order int32[A] with
    ``expert_ids[order]`` ascending, rank of each assignment within its expert int32[A] in the original order,
    counts int32[E + 1])."""
    a = expert_ids.shape[0]
    order = jnp.argsort(expert_ids, stable=True)
    counts = jnp.bincount(expert_ids, length=num_experts + 1).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(a, dtype=jnp.int32) - starts[expert_ids[order]]
    rank = jnp.zeros((a,), jnp.int32).at[order].set(rank_sorted)
    return order, rank, counts


def group_slots(expert_ids: Array, valid: Array, num_experts: int, cap: int) -> tuple[Array, Array]:
    """Buffer slots of one group's assignments.

    Args:
      expert_ids: int32[S, k]; valid: bool[S].
    Returns:
      slot int32[S, k] in [0, E * C) (row e * C + position of expert e's buffer), E * C where dropped;
      keep bool[S, k].
    """
    s, k = expert_ids.shape
    by_priority = jnp.where(valid[None, :], expert_ids.T, num_experts).reshape(k * s)  # first choices first
    _, rank, _ = sort_by_expert(by_priority, num_experts)
    keep = (by_priority < num_experts) & (rank < cap)
    slot = jnp.where(keep, by_priority * cap + rank, num_experts * cap)
    return slot.reshape(k, s).T, keep.reshape(k, s).T


def gather_buffers(x: Array, slot: Array, num_slots: int) -> Array:
    """Tokens x float[S, I] into expert buffers float[E * C, I] (``slot`` int32[S, k]; empty rows are 0)."""
    s, k = slot.shape
    token = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k))
    source = jnp.full((num_slots + 1,), s, jnp.int32).at[slot.reshape(-1)].set(token.reshape(-1))[:num_slots]
    return jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])[source]


def combine(out: Array, slot: Array, weights: Array, keep: Array) -> Array:
    """Expert outputs float[E * C, O] back to tokens: y[t] = sum_j weight[t, j] * out[slot[t, j]] -> float[S, O]."""
    padded = jnp.concatenate([out, jnp.zeros((1, out.shape[-1]), out.dtype)])
    w = jnp.where(keep, weights, 0.0).astype(out.dtype)
    return jnp.einsum("sk,sko->so", w, padded[slot])


def drop_counts(keep: Array, valid: Array) -> dict[str, Array]:
    """keep bool[..., S, k], valid bool[..., S] -> dropped assignments / tokens (float32 scalars)."""
    k = keep.shape[-1]
    return {"dropped_assignments": (valid.sum() * k - keep.sum()).astype(jnp.float32),
            "dropped_tokens": jnp.sum(valid & ~keep.any(-1)).astype(jnp.float32)}


def grouped_dispatch(x: Array, expert_ids: Array, weights: Array, valid: Array, num_experts: int, cap: int):
    """Groups of tokens into expert buffers.

    Args:
      x float[G, S, I]; expert_ids int32[G, S, k]; weights float32[G, S, k]; valid bool[G, S].
    Returns:
      buffers float[G, E, C, I] and a ``restore(out float[G, E, C, O]) -> float[G, S, O]``; drop counts.
    """
    g, s, i = x.shape
    slot, keep = jax.vmap(lambda e, v: group_slots(e, v, num_experts, cap))(expert_ids, valid)
    buffers = jax.vmap(lambda xs, sl: gather_buffers(xs, sl, num_experts * cap))(x, slot)

    def restore(out):
        flat = out.reshape(g, num_experts * cap, out.shape[-1])
        return jax.vmap(combine)(flat, slot, weights, keep)

    return buffers.reshape(g, num_experts, cap, i), restore, drop_counts(keep, valid)


def ragged_experts(x: Array, expert_ids: Array, weights: Array, valid: Array, params: tuple, experts: Experts,
                   num_experts: int) -> Array:
    """Dropless: every assignment, sorted by expert, through ``experts.apply_ragged`` -> float[T, O]."""
    t, k = expert_ids.shape
    flat = jnp.where(valid[:, None], expert_ids, num_experts).reshape(t * k)
    order, _, counts = sort_by_expert(flat, num_experts)
    out = experts.apply_ragged(x[order // k], counts[:num_experts], params)  # [A, O] in expert order
    out = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)
    w = jnp.where(flat.reshape(t, k) < num_experts, weights, 0.0).astype(out.dtype)
    return jnp.einsum("tk,tko->to", w, out)


COMPACT_EIGHTHS = (5, 6, 7, 8)  # the compact buffer sizes, in eighths of the per-group layout's G * C rows


def compact_sizes(full: int) -> tuple[int, ...]:
    """The static per-expert row counts ``run_compact`` can choose from, ascending, the last = ``full``."""
    return tuple(sorted({max(1, -(-full * q // 8)) for q in COMPACT_EIGHTHS}))


def compact_rows(slot: Array, keep: Array, num_experts: int, cap: int) -> tuple[Array, Array, Array]:
    """Group slots int32[G, S, k] (``group_slots``) -> (expert int32[G, S, k] (E where dropped), row of the
    assignment in its expert's packed buffer int32[G, S, k], kept rows per expert int32[E]). Within a group an
    expert's kept positions are 0 .. n - 1, so packing the groups one after another is a prefix sum."""
    g = slot.shape[0]
    expert = jnp.where(keep, slot // cap, num_experts)
    per_group = jax.vmap(lambda e: jnp.bincount(e.reshape(-1), length=num_experts + 1))(expert)[:, :num_experts]
    offset = jnp.cumsum(per_group, axis=0) - per_group  # [G, E]: rows of the groups before
    start = jnp.take_along_axis(offset, jnp.minimum(expert, num_experts - 1).reshape(g, -1), axis=1)
    return expert, start.reshape(slot.shape) + slot % cap, per_group.sum(0).astype(jnp.int32)


def _first_rows_matmul(x: Array, w: Array, r: int) -> Array:
    """float[E, N, I] @ float[E, I, J] on rows [0, r) only, zeros below -> float[E, N, J]."""
    y = jnp.einsum("eci,eij->ecj", x[:, :r], w)
    return jnp.pad(y, ((0, 0), (0, x.shape[1] - r), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _packed_matmul(x: Array, w: Array, index: Array, sizes: tuple[int, ...]) -> Array:
    return jax.lax.switch(index, [functools.partial(_first_rows_matmul, r=r) for r in sizes], x, w)


def _packed_fwd(x, w, index, sizes):
    # The residuals are the inputs whatever the branch: differentiating lax.switch itself would keep every
    # branch's intermediates (zeros for the branches not taken), several times the full buffers.
    return _packed_matmul(x, w, index, sizes), (x, w, index)


def _packed_bwd(sizes, res, g):
    x, w, index = res

    def branch(r):
        def grads(x, w, g):
            gx = jnp.einsum("ecj,eij->eci", g[:, :r], w)
            return jnp.pad(gx, ((0, 0), (0, x.shape[1] - r), (0, 0))), jnp.einsum("eci,ecj->eij", x[:, :r], g[:, :r])
        return grads

    gx, gw = jax.lax.switch(index, [branch(r) for r in sizes], x, w, g)
    return gx, gw, None


_packed_matmul.defvjp(_packed_fwd, _packed_bwd)


def expert_matmul(x: Array, w: Array, rows: tuple | None = None) -> Array:
    """Per-expert matmul float[E, N, I] @ float[E, I, J] -> float[E, N, J]. ``rows`` = (index int32 scalar,
    sizes): only rows [0, sizes[index]) of each expert are nonzero (``run_compact``), the rest of the result
    is 0 and their matmuls (forward and backward) are skipped."""
    if rows is None:
        return jnp.einsum("eci,eij->ecj", x, w)
    index, sizes = rows
    return _packed_matmul(x, w, index, tuple(sizes))


def run_compact(x, expert_ids, weights, valid, params, experts: Experts, *, num_experts, cap, group_size):
    """``run_grouped`` on one device without the padding's matmuls: tokens float[T, I] (T a multiple of S)
    -> (float[T, O], drop counts). The same drops (per group, capacity C); the kept rows of expert e fill rows
    [0, n_e) of its G * C rows, and ``experts.apply`` gets ``rows`` so that its matmuls stop at the smallest
    of ``compact_sizes(G * C)`` that holds max n_e."""
    t, k = expert_ids.shape
    slot, keep = jax.vmap(lambda e, v: group_slots(e, v, num_experts, cap))(to_groups(expert_ids, group_size),
                                                                            to_groups(valid, group_size))
    counts = drop_counts(keep, to_groups(valid, group_size))
    expert, row, used = compact_rows(slot, keep, num_experts, cap)
    full = (t // group_size) * cap
    keep = keep.reshape(t, k)
    packed = jnp.where(keep, expert.reshape(t, k) * full + row.reshape(t, k), num_experts * full)
    buffers = gather_buffers(x, packed, num_experts * full).reshape(num_experts, full, x.shape[-1])
    sizes = compact_sizes(full)
    index = jnp.sum(jnp.asarray(sizes[:-1]) < jnp.max(used))  # the first size >= the fullest expert's rows
    out = experts.apply(buffers, params, rows=(index, sizes))
    return combine(out.reshape(num_experts * full, -1), packed, weights, keep), counts


def to_groups(x: Array, group_size: int) -> Array:
    """float[T, ...] -> float[T / S, S, ...] (T must be a multiple of S)."""
    return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])


def run_grouped(x, expert_ids, weights, valid, params, experts: Experts, *, num_experts, cap, group_size,
                annotate: bool):
    """The capacity path on tokens float[T, I] (T a multiple of S) -> (float[T, O], drop counts). With
    ``annotate`` (GSPMD) the buffers switch from group-sharded to expert-sharded, which XLA compiles into
    all-to-alls."""
    buffers, restore, counts = grouped_dispatch(to_groups(x, group_size), to_groups(expert_ids, group_size),
                                                to_groups(weights, group_size), to_groups(valid, group_size),
                                                num_experts, cap)
    g, _, c, i = buffers.shape
    if annotate:
        buffers = sharding.constrain(buffers, ("units", None, None, None))
    by_expert = jnp.swapaxes(buffers, 0, 1)  # [E, G, C, I]
    if annotate:
        by_expert = sharding.constrain(by_expert, ("expert", "units", None, None))
    out = experts.apply(by_expert.reshape(num_experts, g * c, i), params).reshape(num_experts, g, c, -1)
    if annotate:
        out = sharding.constrain(out, ("expert", "units", None, None))
    out = jnp.swapaxes(out, 0, 1)  # [G, E, C, O]
    if annotate:
        out = sharding.constrain(out, ("units", None, None, None))
    y = restore(out)
    return y.reshape(-1, y.shape[-1]), counts
