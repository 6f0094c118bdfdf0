"""ModelInputs: flat names and attributes, optional groups/fields through jit, sharding, joining shards and
abstract shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emoqwen_jax import inputs as I
from emoqwen_jax.inputs import ModelInputs


def _inputs(b=2, length=5, p=8, g=2, vision=True):
    flat = {"input_ids": np.arange(b * length, dtype=np.int32).reshape(b, length),
            "attention_mask": np.ones((b, length), np.int32),
            "position_ids": np.zeros((3, b, length), np.int32),
            "visual_token_index": np.full((b, length), -1, np.int32)}
    if vision:
        flat.update(pixel_values=np.zeros((p, 6), np.float32), vision_pos_hw=np.zeros((p, 2), np.int32),
                    vision_window_index=np.arange(p // 4, dtype=np.int32),
                    vision_frame_segment=np.r_[np.zeros(p - 2), [-1, -1]].astype(np.int32),
                    vision_window_segment=np.zeros(p, np.int32), vision_patch_item=np.zeros(p, np.int32),
                    vision_item_valid=np.array([True] + [False] * (g - 1)))
    return ModelInputs.from_dict(flat)


def test_flat_names_build_the_groups_and_it_is_not_a_mapping():
    x = _inputs()
    assert isinstance(x.vision, I.VisionInputs) and x.audio is None and x.text.labels is None
    assert [spec.key for spec, _ in x.fields()][:4] == ["input_ids", "attention_mask", "position_ids",
                                                       "visual_token_index"]
    assert x.field(I.BY_KEY["vision_pos_hw"]) is x.vision.pos_hw and x.field(I.BY_KEY["labels"]) is None
    y = x.replace(labels=np.zeros((2, 5), np.int32))
    assert y.text.labels.shape == (2, 5) and x.text.labels is None and y.vision is x.vision
    assert y.replace(labels=None).text.labels is None
    with pytest.raises(ValueError, match=r"unknown model input\(s\) \['nope'\]; valid names"):
        ModelInputs.from_dict({"input_ids": x.text.input_ids, "nope": 1})
    with pytest.raises(ValueError, match="need the text group"):
        ModelInputs.from_dict({"vision_pos_hw": x.vision.pos_hw})
    with pytest.raises(TypeError):
        _ = x["input_ids"]  # the typed batch only: attributes, not a dict view


def test_absent_group_and_fields_pass_through_jit():
    x = _inputs(vision=False)
    assert x.vision is None and [spec.key for spec, _ in x.fields()] == ["input_ids", "attention_mask", "position_ids",
                                                                         "visual_token_index"]
    out = jax.jit(lambda t: t.map_fields(lambda _, v: v + 1))(x)
    assert out.vision is None and out.text.labels is None
    np.testing.assert_array_equal(out.text.input_ids, x.text.input_ids + 1)


def test_offsets_and_concat_follow_field_metadata():
    a, b = _inputs(), _inputs()
    moved = I.offset_indices(b, 1, {"units": 2, "patches": 8, "items": 2})
    np.testing.assert_array_equal(moved.vision.window_index, [2, 3])  # a permutation: every entry moves
    np.testing.assert_array_equal(moved.vision.frame_segment, [8] * 6 + [-1, -1])  # padding stays -1
    np.testing.assert_array_equal(moved.text.visual_token_index, b.text.visual_token_index)
    joined = I.concat([a, moved])
    assert joined.text.position_ids.shape == (3, 4, 5) and joined.vision.pixel_values.shape == (16, 6)
    assert joined.vision.item_valid.shape == (4,)


def test_abstract_inputs_and_batch_sharding():
    shapes = I.abstract_inputs({"B": 2, "L": 7, "P": 16, "U": 4, "G": 2, "patch_dim": 6})
    assert shapes.text.position_ids.shape == (3, 2, 7) and shapes.text.labels.dtype == np.int32
    assert shapes.vision.item_valid.dtype == np.bool_ and shapes.text.rope_deltas.shape == (2,)
    assert I.abstract_inputs({"B": 1, "L": 3}, groups=("text",), optional=()).vision is None
    with pytest.raises(ValueError, match="size 'P'"):
        I.abstract_inputs({"B": 1, "L": 3})
    from emoqwen_jax.parallel import make_mesh, shard_batch

    P = jax.sharding.PartitionSpec
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices()[:2])
    placed = shard_batch(_inputs(), mesh)
    assert isinstance(placed, ModelInputs) and isinstance(placed.vision.pos_hw, jax.Array)
    assert placed.text.position_ids.sharding.spec == P(None, ("data",), None)  # batch_dim 1
    assert placed.text.input_ids.sharding.spec == P(("data",), None)
    assert placed.vision.item_valid.sharding.spec == P()  # batch_dim None: replicated
    assert jnp.all(placed.text.attention_mask == 1)


def test_model_runs_without_a_vision_group():
    import sys
    from pathlib import Path

    from flax import nnx

    from emoqwen_jax.model import EmotionQwen, ModelConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
    import emotion_qwen

    model = EmotionQwen(ModelConfig.from_run_config(emotion_qwen.get_config("tiny")), rngs=nnx.Rngs(0))
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32)
    full = model.prepare_inputs(ids, mask)  # an empty vision group (0 patches)
    text_only = ModelInputs(text=full.text)  # no vision group at all
    a, b = model.forward(full), model.forward(text_only)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    assert b.gate_weights.shape == (0, 2)
