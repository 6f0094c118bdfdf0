"""The pixel-range check: evaluation settings far outside the range a checkpoint was trained on are named,
with the --set flags that restore the trained range."""

from emoqwen_jax.eval.suites.registry import standard_data
from emoqwen_jax.infer.session import Session, pixel_range_warning

DEMO_TRAINED = {"video_min_pixels": 56 * 56, "video_max_pixels": 112 * 112, "image_min_pixels": 56 * 56,
                "image_max_pixels": 112 * 112}


def test_standard_eval_settings_on_a_small_frame_checkpoint_warn(tiny):
    message = pixel_range_warning(Session(tiny, DEMO_TRAINED, standard_data()))
    assert message is not None
    assert "--set video_min_pixels=3136 --set video_max_pixels=12544" in message
    assert "100,352-602,112" in message and "image" not in message  # the image range still covers it


def test_the_named_flags_or_unknown_training_settings_do_not_warn(tiny):
    fixed = {**standard_data(), "video_min_pixels": 3136, "video_max_pixels": 12544}
    assert pixel_range_warning(Session(tiny, DEMO_TRAINED, fixed)) is None
    assert pixel_range_warning(Session(tiny, {}, standard_data())) is None  # no training range stored
    low = {**standard_data(), "video_min_pixels": 56, "video_max_pixels": 1000}  # far below the trained range
    assert "video frames at 56-1,000" in pixel_range_warning(Session(tiny, DEMO_TRAINED, low))
