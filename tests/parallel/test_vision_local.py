"""The ViT on each device's own patches (``sharding.axis_rules(units_local=True)``, the trainer's layout with one
data shard per batch device): the same loss and gradients as one device, and no all-gather of the patch axis."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig, layout_spec
from emoqwen_jax.model.sharding import axis_rules
from emoqwen_jax.parallel import DEFAULT_RULES, make_mesh, shard_batch, shard_model
from emoqwen_jax.train import batching
from emoqwen_jax.train.loss import loss_fn
from emoqwen_jax.train.plan import patch_all_gathers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402

SHARDS = 4


def shard_batch_dict(mc, s: int) -> dict:
    """Data shard ``s`` as the pipeline gives it: an image row and a video row, different grids per shard."""
    rng = np.random.default_rng(s)
    image, video = (1, 4, 4 + 2 * (s % 2)), (2, 4, 4 + 4 * (s // 2))  # frames of 16-32 patches: 1-2 windows
    rows = []
    for grid, pad in ((image, mc.image_token_id), (video, mc.video_token_id)):
        n = int(np.prod(grid)) // 4
        rows.append([*rng.integers(0, 900, 3), mc.vision_start_token_id, *[pad] * n, mc.vision_end_token_id,
                     *rng.integers(0, 900, 4 + s)])
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask > 0, ids, -100).astype(np.int32),
            "image_grid_thw": np.array([image]), "video_grid_thw": np.array([video]),
            "pixel_values": rng.standard_normal((int(np.prod(image)), 1176)).astype(np.float32),
            "pixel_values_videos": rng.standard_normal((int(np.prod(video)), 1176)).astype(np.float32),
            "second_per_grid_ts": np.array([1.0])}


def global_batch(mc):
    """The trainer's global batch: equally padded shards in shard order (``batching``)."""
    shards = [shard_batch_dict(mc, s) for s in range(SHARDS)]
    sizes = batching.agreed_sizes([batching.needs(b) for b in shards], 2)
    return batching.concat_shards([batching.shard_inputs(b, layout_spec(mc), sizes, shard_index=s)
                                   for s, b in enumerate(shards)])


# XLA may form the compressor experts' FSDP-sharded weight gradient (Σ over units of input × output gradient) by
# gathering the experts' input over the units instead of reduce-scattering the gradient, when the input is the
# smaller of the two (as for the tiny model here). That is the compressor's weight update, not the ViT.
EXPERT_WEIGHT_GRADIENT = "transpose(jvp(eci,eij->ecj))"


def vision_gathers(hlo: str, patches: int, units: int) -> dict[str, list[str]]:
    """The all-gathers ``plan.patch_all_gathers`` counts (float, async and tuple-shaped included): those with a
    patch-sized dimension, and those with a merge-unit-sized one outside the experts' weight gradient."""
    counted = [line.strip() for line in hlo.splitlines() if patch_all_gathers(line, patches, units)]
    return {"patches": [x for x in counted if patch_all_gathers(x, patches, patches)],
            "units": [x for x in counted if not patch_all_gathers(x, patches, patches)
                      and EXPERT_WEIGHT_GRADIENT not in x]}


def loss_and_grads(model, batch):
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    return loss, grads


_step = nnx.jit(loss_and_grads)


def test_shards_per_batch_device():
    assert batching.resolve_num_shards(0, 2, 8) == 2 and batching.resolve_num_shards(-1, 2, 8) == 8
    assert batching.resolve_num_shards(16, 2, 8) == 16
    assert batching.units_local(8, 8) and batching.units_local(16, 8) and not batching.units_local(2, 8)
    with pytest.raises(ValueError, match="num_shards"):
        batching.resolve_num_shards(-2, 1, 8)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_cfg", [dict(data=4, num_devices=4), dict(fsdp=2, tensor=2, num_devices=4)],
                         ids=["data4", "fsdp2_tensor2"])
def test_local_vision_equals_one_device_and_gathers_no_patches(mesh_cfg):
    config = emotion_qwen.get_config("tiny")
    config.model.attention = "blockwise"  # the full layer's scan over query blocks is what GSPMD used to gather
    mc = ModelConfig.from_run_config(config)
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    batch = global_batch(mc)
    patches = batch.vision.pixel_values.shape[0]
    ref_loss, ref_grads = _step(model, jax.tree.map(jnp.asarray, batch))
    mesh = make_mesh(mesh_cfg)
    sharded, placed = shard_model(nnx.clone(model), mesh), shard_batch(batch, mesh)
    gathered = {}
    for local in (True, False):
        step = nnx.jit(loss_and_grads)  # a fresh trace: the layout promise is read when tracing
        with axis_rules(mesh, DEFAULT_RULES, units_local=local):
            hlo = step.lower(sharded, placed).compile().as_text()
            if local:
                loss, grads = step(sharded, placed)
        gathered[local] = vision_gathers(hlo, patches, patches // mc.vision.merge_unit)
    assert gathered[False]["patches"], "the global layout should gather the patch axis (else this test checks nothing)"
    assert gathered[True] == {"patches": [], "units": []}, gathered[True]
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for got, ref in zip(jax.tree.leaves(nnx.to_pure_dict(grads)), jax.tree.leaves(nnx.to_pure_dict(ref_grads)),
                        strict=True):
        err = float(jnp.abs(got - ref).max() / jnp.maximum(jnp.abs(ref).max(), 1e-30))
        assert err <= 1e-5, err
