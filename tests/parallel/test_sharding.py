"""Meshes, rules and expert parallelism on 8 host devices: sharded loss and gradients equal one device's."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model.sharding import axis_rules, logical_to_spec
from emoqwen_jax.parallel import (
    DEFAULT_RULES,
    check_divisibility,
    make_mesh,
    mesh_shape,
    param_shardings,
    shard_batch,
    shard_model,
)
from emoqwen_jax.train.loss import loss_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402

MESHES = (dict(data=8), dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2))
MODES = {
    "paper": dict(routing="sample", num_experts=4),
    # capacity factor 1.0 in groups of 8 tokens (each device holds whole groups): drops happen
    "token_einsum": dict(routing="token", num_experts=8, top_k=2, dispatch="einsum", capacity_factor=1.0,
                         group_size=8, z_loss_weight=1e-3),
    "token_shard_map": dict(routing="token", num_experts=8, top_k=2, dispatch="shard_map", capacity_factor=1.0,
                            group_size=8, z_loss_weight=1e-3),
    "token_ragged": dict(routing="token", num_experts=8, top_k=2, dispatch="ragged", z_loss_weight=1e-3),
}


def tiny_config(mode: str):
    config = emotion_qwen.get_config("tiny")
    config.model.compressor.update(**MODES[mode])
    return ModelConfig.from_run_config(config)


def make_batch(mc, batch_size: int = 8) -> dict:
    """Alternating image and video rows of different lengths, right-padded, patches padded to 256."""
    rng = np.random.default_rng(0)
    rows, images, videos = [], [], []
    for i in range(batch_size):
        grid = (2, 4, 4) if i % 2 else (1, 4, 6)
        (videos if i % 2 else images).append(grid)
        pad = mc.video_token_id if i % 2 else mc.image_token_id
        n = int(np.prod(grid)) // 4
        rows.append([*rng.integers(0, 900, 3), mc.vision_start_token_id, *[pad] * n, mc.vision_end_token_id,
                     *rng.integers(0, 900, 5 + i)])
    length = max(map(len, rows))
    ids = np.zeros((batch_size, length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    img, vid = np.array(images), np.array(videos)
    model = nnx.eval_shape(lambda: EmotionQwen(mc, rngs=nnx.Rngs(0)))
    batch = model.prepare_inputs(
        ids, mask, rng.standard_normal((int(img.prod(-1).sum()), 1176)).astype(np.float32), img,
        rng.standard_normal((int(vid.prod(-1).sum()), 1176)).astype(np.float32), vid, [1.0] * len(vid),
        pad_patches_to=256, pad_items_to=8, labels=np.where(mask > 0, ids, -100))
    return batch


def loss_and_grads(model, batch):
    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    return loss, metrics, grads


_step = nnx.jit(loss_and_grads)


def test_mesh_shape_fills_and_errors():
    assert mesh_shape(dict(data=-1, tensor=2), 8) == dict(data=4, fsdp=1, expert=1, tensor=2)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        mesh_shape(dict(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        mesh_shape(dict(data=-1, tensor=3), 8)
    with pytest.raises(ValueError, match="has 4 devices but 8"):
        mesh_shape(dict(data=2, tensor=2), 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_shape(dict(pipeline=2), 8)
    assert make_mesh(dict(data=-1)).shape == dict(data=8, fsdp=1, expert=1, tensor=1)


def test_divisibility_errors_name_the_numbers():
    mc = tiny_config("paper")
    check_divisibility(mc, make_mesh(dict(data=2, expert=4)), batch_size=8)
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by mesh.expert=8"):
        check_divisibility(mc, make_mesh(dict(expert=8)))
    with pytest.raises(ValueError, match="num_kv_heads=2 is not divisible by mesh.tensor=4"):
        check_divisibility(mc, make_mesh(dict(data=2, tensor=4)))
    with pytest.raises(ValueError, match="batch size 6 is not divisible by data\\*fsdp\\*expert=8"):
        check_divisibility(mc, make_mesh(dict(data=8)), batch_size=6)


def test_rules_shard_weights_fsdp_tensor_and_expert():
    mesh = make_mesh(dict(fsdp=2, expert=2, tensor=2))
    assert logical_to_spec(("embed", "q_heads"), (64, 64), mesh=mesh, rules=DEFAULT_RULES) == \
        PartitionSpec(("fsdp", "expert"), "tensor")
    # Expert weights: the expert axis goes to the expert dim, so 'merge' only gets fsdp.
    assert logical_to_spec(("expert", "merge", "mlp"), (4, 128, 128), mesh=mesh, rules=DEFAULT_RULES) == \
        PartitionSpec("expert", "fsdp", "tensor")
    # A dimension the axes do not divide stays replicated rather than failing.
    assert logical_to_spec(("embed", "mlp"), (3, 5), mesh=mesh, rules=DEFAULT_RULES) == PartitionSpec()
    model = nnx.eval_shape(lambda: EmotionQwen(tiny_config("paper"), rngs=nnx.Rngs(0)))
    shardings = param_shardings(nnx.state(model), mesh)
    assert shardings["language_model"]["layers"][0]["mlp"]["down_proj"]["kernel"].spec == \
        PartitionSpec("tensor", ("fsdp", "expert"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_sharded_loss_and_grads_equal_single_device(mode):
    mc = tiny_config(mode)
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    batch = make_batch(mc)
    ref_loss, ref_metrics, ref_grads = _step(model, jax.tree.map(jnp.asarray, batch))
    ref_flat = jax.tree.leaves(nnx.to_pure_dict(ref_grads))
    if mode != "paper":
        assert float(ref_metrics["aux_loss"]) > 0
        assert (float(ref_metrics["dropped_assignments"]) == 0) == (mode == "token_ragged")  # dropless or not
    for mesh_cfg in MESHES:
        mesh = make_mesh(mesh_cfg)
        check_divisibility(mc, mesh, batch_size=8)
        sharded = shard_model(nnx.clone(model), mesh)
        with axis_rules(mesh, DEFAULT_RULES):
            loss, metrics, grads = _step(sharded, shard_batch(batch, mesh))
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), mesh_cfg
        for key in ("lm_loss", "aux_loss", "lb_loss", "z_loss", "dropped_assignments", "dropped_tokens"):
            np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]), rtol=1e-5, err_msg=str(mesh_cfg))
        for got, ref in zip(jax.tree.leaves(nnx.to_pure_dict(grads)), ref_flat, strict=True):
            err = float(jnp.abs(got - ref).max() / jnp.maximum(jnp.abs(ref).max(), 1e-30))
            assert err <= 1e-5, (mesh_cfg, err)
        if mesh_cfg.get("expert", 1) > 1:
            # Each device holds only its E / expert experts.
            local = sharded.compressor.experts.mlp_0_kernel[...].addressable_shards[0].data.shape
            assert local[0] == mc.compressor.num_experts // mesh_cfg["expert"]


@pytest.mark.slow
def test_shard_map_path_uses_all_to_all():
    mc = tiny_config("token_shard_map")
    mesh = make_mesh(dict(data=2, expert=4))
    model = shard_model(EmotionQwen(mc, rngs=nnx.Rngs(0)), mesh)
    batch = shard_batch(make_batch(mc), mesh)
    with axis_rules(mesh, DEFAULT_RULES):
        hlo = nnx.jit(lambda m, b: loss_fn(m, b)[0]).lower(model, batch).compile().as_text()
    assert hlo.count("all-to-all") >= 2  # dispatch and return
