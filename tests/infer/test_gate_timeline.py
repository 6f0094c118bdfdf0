"""The gate over a clip's time: row g is exactly the gate of a clip made of temporal group g alone (the ViT
never attends across temporal groups), rows follow the groups' order, and there is nothing without a gate."""

import engine_helpers as H
import numpy as np
import pytest
from tolerance import assert_close_rel

from emoqwen_jax.infer.gate_timeline import gate_over_time, group_times
from emoqwen_jax.infer.session import Prompt
from emoqwen_jax.layout import build_model_inputs
from emoqwen_jax.model import layout_spec

pytestmark = pytest.mark.slow  # compiles the model's embedding for several clips

GRID = (3, 4, 4)  # three temporal patch groups of 4 x 4 patches


def alone(model, prompt: Prompt, group: int) -> np.ndarray:
    """The gate weights float32[E] the model gives a one-group clip holding only ``group``'s patches, through
    the whole embedding path (text, placeholders, padding)."""
    _, h, w = GRID
    pixels = prompt.vision["pixel_values_videos"][group * h * w:(group + 1) * h * w]
    c = model.config
    ids = [31, c.vision_start_token_id] + [c.video_token_id] * (h * w // 4) + [c.vision_end_token_id, 32]
    inputs = build_model_inputs(np.asarray([ids], np.int32), pixel_values_videos=pixels,
                                video_grid_thw=np.array([[1, h, w]]), second_per_grid_ts=np.array([1.0]),
                                spec=layout_spec(c))
    return np.asarray(model.embed(inputs)[1][0], np.float32)


def test_each_row_is_the_gate_of_its_group_alone(model, session):
    prompt = H.video_prompt(model, np.random.default_rng(0), grid=GRID)
    timeline = gate_over_time(session, prompt)
    assert timeline.shape == (GRID[0], model.config.compressor.num_experts)
    assert_close_rel(timeline.sum(-1), np.ones(GRID[0]), 1e-6)
    for g in range(GRID[0]):
        assert_close_rel(timeline[g], alone(model, prompt, g), 1e-5)
    assert np.abs(timeline[0] - timeline[1]).max() > 1e-3  # the groups really differ


def test_rows_follow_the_groups_order(model, session):
    prompt = H.video_prompt(model, np.random.default_rng(1), grid=GRID)
    _, h, w = GRID
    groups = prompt.vision["pixel_values_videos"].reshape(GRID[0], h * w, -1)
    reversed_clip = Prompt(prompt.input_ids, {**prompt.vision, "pixel_values_videos": groups[::-1].reshape(-1, 1176)})
    assert_close_rel(gate_over_time(session, reversed_clip), gate_over_time(session, prompt)[::-1], 1e-5)


def test_no_clip_no_timeline(model, session):
    assert gate_over_time(session, H.image_prompt(model, np.random.default_rng(2))) is None
    assert gate_over_time(session, H.text_prompt(np.random.default_rng(3), 5)) is None


def test_group_times_start_at_each_groups_first_frame():
    assert group_times([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], 3) == [0.0, 1.0, 2.0]
    assert group_times([], 0) == []
