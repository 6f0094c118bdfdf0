"""The scale-mode compressor's entry point, ``token_moe``: picks the dispatch path (``emoqwen_jax.model.moe``
holds routing, capacity, losses and the single-device / GSPMD dispatch) and runs the explicit expert-parallel
ones, the ``shard_map`` bodies of the ``shard_map`` (capacity) and ``ragged`` (dropless) modes.

Shapes as in ``moe``; ep = size of the expert mesh axes, E' = E / ep local experts, T' tokens per device.
Mesh axis names come from the active sharding rules: the logical name ``expert`` gives the expert axes,
``units`` the axes that split the tokens (``emoqwen_jax.parallel.rules``).

* ``shard_map``: each device routes its own whole groups into [G', E, C, I] buffers; one ``all_to_all`` over
  the expert axes sends every expert's slice to the device that holds it ([ep * G', E', C, I]), the local
  experts run, and a second ``all_to_all`` brings the results home. Groups are fixed chunks of tokens, so
  the result equals the single-device one exactly.
* ``ragged``: each device sorts its assignments by expert and sends each expert's rows to its device, which
  sorts the received rows by local expert, runs ``ragged_dot`` and sends the rows back. The receive buffer has
  one block of T' * k rows per source device, of which the first n are real. On CPU a padded ``all_to_all``
  fills it (XLA:CPU has no ``ragged_all_to_all``; docs/design.md, XLA:CPU traps); on GPU/TPU
  ``ragged_all_to_all`` writes only the real rows into the same layout (less traffic; the same ep x rows of
  buffer memory). The CPU tests cover the padded exchange; the ragged one has not run on hardware here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from emoqwen_jax.model import moe, sharding

Array = jax.Array


def mesh_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the active rules map the logical name ``logical`` to."""
    ctx = sharding.current()
    if ctx is None:
        return ()
    mesh, rules = ctx
    return tuple(a for a in rules.get(logical, ()) if mesh.shape.get(a, 1) > 1)


def _has_ragged_all_to_all() -> bool:
    """XLA implements ragged_all_to_all on GPU and TPU, not on CPU (docs/design.md, XLA:CPU traps)."""
    return jax.default_backend() in ("gpu", "tpu")


def _axis(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def _capacity_body(x, expert_ids, weights, valid, params, experts, *, num_experts, cap, group_size, axes, ep):
    """[T', I] local tokens -> [T', O], drop counts; buffers cross devices by all_to_all."""
    buffers, restore, counts = moe.grouped_dispatch(
        moe.to_groups(x, group_size), moe.to_groups(expert_ids, group_size), moe.to_groups(weights, group_size),
        moe.to_groups(valid, group_size), num_experts, cap)  # [G', E, C, I]
    if ep > 1:
        buffers = jax.lax.all_to_all(buffers, _axis(axes), split_axis=1, concat_axis=0, tiled=True)  # [ep G', E', C, I]
    g, e, c, i = buffers.shape
    out = experts.apply(jnp.swapaxes(buffers, 0, 1).reshape(e, g * c, i), params)
    out = jnp.swapaxes(out.reshape(e, g, c, -1), 0, 1)  # [ep G', E', C, O]
    if ep > 1:
        out = jax.lax.all_to_all(out, _axis(axes), split_axis=0, concat_axis=1, tiled=True)  # [G', E, C, O]
    y = restore(out)
    return y.reshape(-1, y.shape[-1]), counts


def _exchange_ragged(rows, expert_of_row, counts, params, experts, *, num_experts, axes, ep):
    """Rows float[A, I] sorted by expert (``counts`` int32[E + 1], last = padding) -> their expert outputs
    float[A, O] in the same order, computed on the devices that hold the experts."""
    a = rows.shape[0]
    local = num_experts // ep
    per_dest = counts[:num_experts].reshape(ep, local)  # rows for each destination device, by its local expert
    sent = per_dest.sum(1)
    start = jnp.cumsum(sent) - sent
    p = jnp.arange(a, dtype=jnp.int32)
    padded = jnp.concatenate([rows, jnp.zeros((1, rows.shape[-1]), rows.dtype)])
    recv_counts = jax.lax.all_to_all(per_dest, _axis(axes), 0, 0, tiled=True)  # [ep, E']: from j, per expert
    received = recv_counts.sum(1)
    if _has_ragged_all_to_all():  # only the real rows travel; the layout is the padded one below
        me = jax.lax.axis_index(_axis(axes))
        here = jnp.full((ep,), me * a, jnp.int32)
        recv = jax.lax.ragged_all_to_all(rows, jnp.zeros((ep * a, rows.shape[-1]), rows.dtype), start, sent,
                                         here, received, axis_name=_axis(axes))
    else:
        source = jnp.where(p[None] < sent[:, None], start[:, None] + p[None], a)  # [ep, A]: block d: rows for d
        recv = jax.lax.all_to_all(padded[source.reshape(-1)], _axis(axes), 0, 0, tiled=True)  # block j from j
    ends = jnp.cumsum(recv_counts, axis=1)
    local_id = jax.vmap(lambda e: jnp.searchsorted(e, p, side="right"))(ends).reshape(-1)  # E' = padding
    order, _, local_counts = moe.sort_by_expert(local_id.astype(jnp.int32), local)
    out = experts.apply_ragged(recv[order], local_counts[:local], params)
    out = jnp.zeros_like(out).at[order].set(out)  # back to the received layout
    if _has_ragged_all_to_all():
        blocks = jnp.arange(ep, dtype=jnp.int32) * a
        back = jax.lax.ragged_all_to_all(out, jnp.zeros_like(out), blocks, received, here, sent,
                                         axis_name=_axis(axes))
    else:
        back = jax.lax.all_to_all(out, _axis(axes), 0, 0, tiled=True)  # block d: my rows, computed on device d
    dest = expert_of_row // local  # ep for padding rows
    slot = jnp.where(dest < ep, dest * a + p - start[jnp.minimum(dest, ep - 1)], ep * a)
    return jnp.concatenate([back, jnp.zeros((1, back.shape[-1]), back.dtype)])[slot]


def _ragged_body(x, expert_ids, weights, valid, params, experts, *, num_experts, axes, ep):
    """Dropless: local tokens float[T', I] -> float[T', O]."""
    if ep == 1:
        return moe.ragged_experts(x, expert_ids, weights, valid, params, experts, num_experts)
    t, k = expert_ids.shape
    flat = jnp.where(valid[:, None], expert_ids, num_experts).reshape(t * k)
    order, _, counts = moe.sort_by_expert(flat, num_experts)
    out = _exchange_ragged(x[order // k], flat[order], counts, params, experts, num_experts=num_experts,
                           axes=axes, ep=ep)
    out = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)
    w = jnp.where(flat.reshape(t, k) < num_experts, weights, 0.0).astype(out.dtype)
    return jnp.einsum("tk,tko->to", w, out)


def shard_map_moe(x: Array, logits: Array, valid: Array, params: tuple, experts: moe.Experts, *, top_k: int,
                  capacity_factor: float, group_size: int, dispatch: str):
    """``token_moe`` for dispatch 'shard_map' or 'ragged' under the active mesh (same returns)."""
    mesh, _ = sharding.current()
    batch_axes = mesh_axes("units")
    axes = mesh_axes("expert")
    ep = math.prod(mesh.shape[a] for a in axes)
    num_experts = logits.shape[-1]
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if x.shape[0] % shards:
        raise ValueError(f"{x.shape[0]} compressor tokens do not split over the {shards} devices of mesh axes "
                         f"{batch_axes}")
    local_tokens = x.shape[0] // shards
    if dispatch == "shard_map" and local_tokens % group_size:
        raise ValueError(f"compressor.group_size={group_size} does not divide the {local_tokens} tokens each device "
                         f"holds ({x.shape[0]} over mesh axes {batch_axes}); choose a group size that divides it")
    if num_experts % ep:
        raise ValueError(f"compressor.num_experts={num_experts} is not divisible by the expert mesh axes {axes} "
                         f"(size {ep})")
    cap = moe.capacity(group_size, num_experts, top_k, capacity_factor)

    def body(x, logits, valid, params):
        expert_ids, weights, probs = moe.route(logits, top_k)
        sums = moe.aux_sums(logits, probs, expert_ids, valid)
        if dispatch == "ragged":
            y = _ragged_body(x, expert_ids, weights, valid, params, experts, num_experts=num_experts, axes=axes,
                             ep=ep)
            zero = jnp.zeros((), jnp.float32)
            counts = {"dropped_assignments": zero, "dropped_tokens": zero}
        else:
            y, counts = _capacity_body(x, expert_ids, weights, valid, params, experts, num_experts=num_experts,
                                       cap=cap, group_size=group_size, axes=axes, ep=ep)
        if batch_axes:  # global statistics, so the losses equal the single-device ones
            sums = jax.lax.psum(sums, batch_axes)
            counts = jax.lax.psum(counts, batch_axes)
        return y, sums, counts

    tok = PartitionSpec(batch_axes or None)
    par = PartitionSpec(_axis(axes) if axes else None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, jax.tree.map(lambda _: par, params)),
                       out_specs=(tok, PartitionSpec(), PartitionSpec()), check_vma=False)
    return fn(x, logits, valid, params)


def _pad_to_groups(group_size: int, *arrays: Array) -> tuple[int, tuple[Array, ...]]:
    """Pads the token axis of each array (valid last: padded tokens are invalid) to a multiple of S."""
    t = arrays[0].shape[0]
    pad = -t % group_size
    if not pad:
        return t, arrays
    return t, tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays)


def token_moe(x: Array, logits: Array, valid: Array, params: tuple, experts: moe.Experts, *, top_k: int,
              capacity_factor: float, group_size: int, dispatch: str
              ) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """Token-routed experts.

    Args:
      x: float[T, I] tokens; logits: float32[T, E] router logits; valid: bool[T] (False = padding).
      params: expert parameters, each stacked on a leading E axis; experts: their computation.
      group_size: S, tokens per routing group (capacity and drops are per group).
    Returns:
      y float[T, O], summed aux statistics (see ``moe.aux_losses``), drop counts.
    """
    if dispatch not in moe.DISPATCH_MODES:
        raise ValueError(f"compressor.dispatch={dispatch!r}; choose one of {moe.DISPATCH_MODES}")
    if group_size < 1:
        raise ValueError(f"compressor.group_size={group_size} must be >= 1")
    num_experts = logits.shape[-1]
    ctx = sharding.current()
    if ctx is not None and dispatch in ("shard_map", "ragged"):
        return shard_map_moe(x, logits, valid, params, experts, top_k=top_k, capacity_factor=capacity_factor,
                             group_size=group_size, dispatch=dispatch)
    expert_ids, weights, probs = moe.route(logits, top_k)
    sums = moe.aux_sums(logits, probs, expert_ids, valid)
    if dispatch == "ragged":
        y = moe.ragged_experts(x, expert_ids, weights, valid, params, experts, num_experts)
        zero = jnp.zeros((), jnp.float32)
        return y, sums, {"dropped_assignments": zero, "dropped_tokens": zero}
    t, (xp, ids, w, v) = _pad_to_groups(group_size, x, expert_ids, weights, valid)
    cap = moe.capacity(group_size, num_experts, top_k, capacity_factor)
    if ctx is None and cap < group_size:  # one device: skip the padding (C = S: every row may be real)
        y, counts = moe.run_compact(xp, ids, w, v, params, experts, num_experts=num_experts, cap=cap,
                                    group_size=group_size)
    else:
        y, counts = moe.run_grouped(xp, ids, w, v, params, experts, num_experts=num_experts, cap=cap,
                                    group_size=group_size, annotate=ctx is not None)
    return y[:t], sums, counts
