"""Weights never gathered on one device: import straight into a mesh's shardings, save from sharded arrays,
restore onto another mesh or onto one device."""

import hf_oracle as O
import jax
import numpy as np
import pytest
from flax import nnx

from emoqwen_jax.convert import from_hf
from emoqwen_jax.model_dir import load_model, save_model
from emoqwen_jax.parallel import make_mesh
from emoqwen_jax.parallel.rules import variable_sharding


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_sharded")
    O.build_hf_model("base", seed=3).save_pretrained(path, max_shard_size="100KB")  # several files + index
    return path


def _leaves(model):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def _assert_laid_out(model, mesh):
    """Every parameter sits in its rule-given sharding on ``mesh``; at least one is really split."""
    split = 0
    for path, var in _leaves(model):
        want = variable_sharding(var, mesh)
        got = var[...].sharding
        assert got.is_equivalent_to(want, var[...].ndim), (path, got, want)
        split += not got.is_fully_replicated
    assert split > 0


def _assert_same_values(a, b):
    for (path, x), (_, y) in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))


def test_import_reads_each_tensor_into_its_sharding(hf_dir):
    mesh = make_mesh({"data": 1, "fsdp": 8})
    sharded = from_hf(f"file://{hf_dir}", mesh=mesh)
    _assert_laid_out(sharded, mesh)
    _assert_same_values(sharded, from_hf(str(hf_dir)))


def test_saved_from_8_devices_restores_on_another_mesh_and_on_one_device(hf_dir, tmp_path):
    mesh8 = make_mesh({"data": 1, "fsdp": 8})
    model = from_hf(str(hf_dir), mesh=mesh8)
    save_model(model, str(tmp_path / "m"))
    mesh4 = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    on4 = load_model(f"file://{tmp_path}/m", mesh=mesh4)
    _assert_laid_out(on4, mesh4)
    _assert_same_values(on4, model)
    one = load_model(str(tmp_path / "m"))  # describe / eval / convert: one device
    for _, var in _leaves(one):
        assert len(var[...].sharding.device_set) == 1
    _assert_same_values(one, model)
