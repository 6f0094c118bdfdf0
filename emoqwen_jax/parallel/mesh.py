"""The device mesh from ``config.mesh`` (axes data, fsdp, expert, tensor; -1 fills), over all global devices.

Axis order puts ``tensor`` innermost so tensor-parallel collectives stay on the fastest links (within a host /
ICI ring), then ``expert``, ``fsdp`` and ``data`` outermost (across hosts / DCN).

Multislice (several TPU slices joined by the data-centre network): ``mesh.dcn_data`` and ``mesh.dcn_fsdp`` split
the ``data`` / ``fsdp`` axes across slices, and the other sizes (``data``, ``fsdp``, ``expert``, ``tensor``, -1
filling) then describe ONE slice; an axis's total size is its in-slice size times its DCN factor. The device grid
comes from ``mesh_utils.create_hybrid_device_mesh`` (slice blocks outermost, so only data/FSDP traffic crosses
DCN). Devices without a ``slice_index`` (CPU, e.g. ``emoqwen-plan --num_slices 2``) are split into equal
consecutive groups that stand in for slices.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")
DCN_AXES = ("dcn_data", "dcn_fsdp")  # across-slice factors of data and fsdp (config.mesh.dcn_*)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves -1 (at most one axis) so the product equals ``num_devices``; clear errors otherwise."""
    sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
    # ``rules`` (config.mesh.rules) maps logical axes onto these axes; it is no axis itself.
    unknown = set(mesh_cfg) - set(MESH_AXES) - set(DCN_AXES) - {"num_devices", "rules"}
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


def dcn_shape(mesh_cfg: Mapping[str, int]) -> tuple[int, ...]:
    """Across-slice factor of every mesh axis (1 for expert and tensor, which stay inside a slice)."""
    dcn = {"data": int(mesh_cfg.get("dcn_data", 1)), "fsdp": int(mesh_cfg.get("dcn_fsdp", 1))}
    bad = {f"dcn_{a}": v for a, v in dcn.items() if v < 1}
    if bad:
        raise ValueError(f"mesh DCN factors must be >= 1, got {bad}")
    return tuple(dcn.get(axis, 1) for axis in MESH_AXES)


class _SliceOf:
    """A device seen as part of simulated slice ``slice_index`` (for devices that report none)."""

    def __init__(self, device: jax.Device, slice_index: int):
        self.device, self.slice_index = device, slice_index

    def __getattr__(self, name):
        return getattr(self.device, name)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None, *,
              num_slices: int | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: every global device, all hosts) with Auto axis types, so GSPMD
    propagates shardings from the annotations and ``shard_map`` accepts any input sharding.

    ``num_slices``: how many slices the devices form (default: from their ``slice_index``, else 1); must equal
    ``dcn_data * dcn_fsdp``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if int(mesh_cfg.get("num_devices", 0) or 0) > 0:  # a prefix of the devices (debugging, tests)
        devices = devices[: int(mesh_cfg["num_devices"])]
    dcn = dcn_shape(mesh_cfg)
    if num_slices is None:
        num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if math.prod(dcn) != num_slices:
        raise ValueError(f"mesh.dcn_data * mesh.dcn_fsdp = {math.prod(dcn)} but the devices form {num_slices} "
                         f"slice(s); set the DCN factors so their product is the number of slices")
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices do not split into {num_slices} equal slices")
    sizes = mesh_shape({k: v for k, v in mesh_cfg.items() if k not in DCN_AXES}, len(devices) // num_slices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if num_slices > 1:
        from jax.experimental import mesh_utils

        per_slice = len(devices) // num_slices
        simulated = not all(hasattr(d, "slice_index") for d in devices)
        granules = [_SliceOf(d, i // per_slice) for i, d in enumerate(devices)] if simulated else devices
        grid = mesh_utils.create_hybrid_device_mesh(shape, dcn, granules, allow_split_physical_axes=True)
        if simulated:
            grid = np.vectorize(lambda d: d.device, otypes=[object])(grid)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    try:
        # Topology-aware placement on TPU/GPU; falls back to a plain reshape for CPU devices.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - any topology failure means: use the given order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
