"""The device mesh from ``config.mesh`` (axes data, fsdp, expert, tensor; -1 fills), over all global devices.

Axis order puts ``tensor`` innermost so tensor-parallel collectives stay on the fastest links (within a host /
ICI ring), then ``expert``, ``fsdp`` and ``data`` outermost (across hosts / DCN).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves -1 (at most one axis) so the product equals ``num_devices``; clear errors otherwise."""
    sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
    unknown = set(mesh_cfg) - set(MESH_AXES) - {"num_devices"}
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"mesh {sizes}: the fixed axes (product {fixed}) do not divide the {num_devices} devices")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are available; "
                         f"set one axis to -1 to fill")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: every global device, all hosts) with Auto axis types, so GSPMD
    propagates shardings from the annotations and ``shard_map`` accepts any input sharding."""
    devices = list(jax.devices() if devices is None else devices)
    if int(mesh_cfg.get("num_devices", 0) or 0) > 0:  # a prefix of the devices (debugging, tests)
        devices = devices[: int(mesh_cfg["num_devices"])]
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        # Topology-aware placement on TPU/GPU; falls back to a plain reshape for CPU devices.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - any topology failure means: use the given order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
