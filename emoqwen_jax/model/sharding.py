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
from typing import Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_CONTEXT: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("emoqwen_axis_rules",
                                                                                        default=None)
_UNITS_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("emoqwen_units_local", default=False)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules, *, units_local: bool = False):
    """Activates ``rules`` on ``mesh`` for ``constrain`` and ``logical_to_spec`` calls inside the block.

    ``units_local``: the caller promises that the flat vision arrays (patches, merge units; logical name
    'units') are laid out device by device: every device's contiguous slice of them holds whole items and
    their index arrays point inside that slice (``emoqwen_jax.train.batching``: one or more whole data shards
    per batch device). ``map_units`` then runs per-item work on each device's slice alone."""
    with _active((mesh, _as_dict(rules)), bool(units_local)):
        yield


def _no_rules():
    """Inside a ``shard_map`` body: arrays are per-device, so no annotation may refer to the global mesh."""
    return _active(None, False)


@contextlib.contextmanager
def _active(context: tuple[Mesh, dict] | None, units_local: bool):
    token, local = _CONTEXT.set(context), _UNITS_LOCAL.set(units_local)
    try:
        yield
    finally:
        _UNITS_LOCAL.reset(local)
        _CONTEXT.reset(token)


def map_units(fn: Callable, *args: jax.Array, in_names: Sequence[Sequence[str | None]],
              out_names: Sequence[str | None]) -> jax.Array:
    """``fn(*args)`` for work that stays within an item of the flat vision arrays (a frame's attention, the
    window permutation), run on each device's slice of the 'units' axis alone (``jax.shard_map``) when
    ``units_local`` holds: no all-gather of the patch axis, and each device computes only its own items.
    Otherwise (one device, no promise, an axis that is not split) plain ``fn(*args)``.

    ``in_names``: logical names of each argument's dimensions (e.g. ('units', 'act_heads', None)); the output's
    are ``out_names``. ``fn`` sees per-device arrays and runs without sharding annotations."""
    counts = {shard_count("units", a.shape[n.index("units")])
              for a, n in zip(args, in_names, strict=True) if "units" in n}
    if not _UNITS_LOCAL.get() or len(counts) != 1 or counts == {1}:  # every 'units' argument split alike
        return fn(*args)
    mesh, rules = current()
    in_specs = tuple(logical_to_spec(n, a.shape, mesh=mesh, rules=rules) for a, n in zip(args, in_names, strict=True))

    def body(*local_args):
        with _no_rules():
            return fn(*local_args)

    with _no_rules():
        out_shape = jax.eval_shape(fn, *args).shape
    out_spec = logical_to_spec(out_names, out_shape, mesh=mesh, rules=rules)
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


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
