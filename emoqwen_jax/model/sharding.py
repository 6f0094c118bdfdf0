"""Logical axis names -> mesh axes, and activation sharding constraints.

Parameters carry ``logical_axes`` metadata; activations are annotated with ``constrain(x, names)``. Both are
resolved against the rules of the active ``axis_rules(mesh, rules)`` context (set by the trainer from
``emoqwen_jax.parallel.rules``); without a context every annotation is a no-op, so the model runs unchanged
on one device.

Resolution (as in MaxText): for each dimension, in order, the rule's mesh axes that are not yet used by an
earlier dimension of the same array and whose product divides the dimension. A dimension that cannot be
split stays replicated, so small or odd dimensions never fail; the divisibility that matters for
correctness and speed (heads, experts, batch) is checked up front by ``emoqwen_jax.parallel``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_CONTEXT: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("emoqwen_axis_rules",
                                                                                        default=None)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules):
    """Activates ``rules`` on ``mesh`` for ``constrain`` and ``logical_to_spec`` calls inside the block."""
    token = _CONTEXT.set((mesh, _as_dict(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current() -> tuple[Mesh, dict] | None:
    return _CONTEXT.get()


def shard_count(name: str, size: int | None = None) -> int:
    """How many devices split an axis with logical ``name`` (of ``size``, if given) under the active rules;
    1 outside a rules context."""
    ctx = current()
    if ctx is None:
        return 1
    mesh = ctx[0]
    spec = logical_to_spec([name], None if size is None else [size])
    axes = () if not spec else (spec[0],) if isinstance(spec[0], str) else tuple(spec[0] or ())
    count = 1
    for axis in axes:
        count *= mesh.shape[axis]
    return count


def _as_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(axes)
    return out


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, *, mesh: Mesh | None = None,
                    rules: Rules | dict | None = None) -> PartitionSpec:
    """PartitionSpec for an array with logical ``names`` (and ``shape``, to skip axes that do not divide)."""
    if mesh is None or rules is None:
        ctx = current()
        if ctx is None:
            return PartitionSpec()
        mesh, rules = ctx
    rules = rules if isinstance(rules, dict) else _as_dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        chosen = []
        size = 1
        for axis in rules.get(name, ()) if name is not None else ():
            if axis in used or axis not in mesh.shape or mesh.shape[axis] == 1:
                continue
            if shape is not None and shape[dim] % (size * mesh.shape[axis]):
                continue
            chosen.append(axis)
            size *= mesh.shape[axis]
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names under the active rules; identity without a context."""
    ctx = current()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh=mesh,
                                                                                   rules=rules)))
