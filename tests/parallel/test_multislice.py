"""Multislice meshes: data/FSDP factors across slices (mesh.dcn_*) via create_hybrid_device_mesh."""

import jax
import numpy as np
import pytest

from emoqwen_jax.parallel import make_mesh


def test_dcn_data_puts_each_simulated_slice_in_one_block():
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 2, "dcn_data": 2}, num_slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # Slice 0 = devices 0-3, slice 1 = devices 4-7: only the data axis crosses slices.
    assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}


def test_dcn_fsdp_extends_fsdp_across_slices():
    mesh = make_mesh({"data": 1, "fsdp": -1, "dcn_fsdp": 2}, num_slices=2)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices).ravel()
    assert set(ids[:4]) == {0, 1, 2, 3} and set(ids[4:]) == {4, 5, 6, 7}


def test_dcn_factors_must_match_the_slices():
    with pytest.raises(ValueError, match="dcn_data \\* mesh.dcn_fsdp = 2 but the devices form 1 slice"):
        make_mesh({"fsdp": -1, "dcn_fsdp": 2})
    with pytest.raises(ValueError, match="do not split into 3 equal slices"):
        make_mesh({"fsdp": -1, "dcn_data": 3}, num_slices=3)
    with pytest.raises(ValueError, match="DCN factors must be >= 1"):
        make_mesh({"fsdp": -1, "dcn_data": 0})


def test_single_slice_mesh_is_unchanged():
    assert dict(make_mesh({"fsdp": -1, "data": 1}).shape) == {"data": 1, "fsdp": len(jax.devices()),
                                                              "expert": 1, "tensor": 1}
