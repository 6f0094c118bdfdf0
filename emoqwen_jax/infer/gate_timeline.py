"""The paper-mode gate's expert weights over a clip's time: one weight vector per temporal patch group.

The gate gives one weight vector per visual item (``EmotionQwen.embed``). To show how its choice moves through a
clip, this runs the ViT and the gate on each temporal patch group of the clip as if it were an item of its own.
That is exact, not an approximation of the ViT: Qwen2.5-VL's vision encoder attends within one temporal patch
group (its full-attention layers take the frame as the sequence, its window layers windows inside a frame) and
its rotary ids are (row, column) only, so a group's features are the same alone or inside the clip. Only the
gate sees a different item: the group's tokens instead of the whole clip's.

Audio is left out: an audio-gated checkpoint (``model.audio.gate_audio``) adds the clip's pooled audio to the
whole item's gate feature, which has no per-moment counterpart.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from emoqwen_jax.infer.session import Prompt, Session
from emoqwen_jax.inputs import ModelInputs, TextInputs, VisionInputs
from emoqwen_jax.layout import vision_layout
from emoqwen_jax.model import layout_spec


@nnx.jit
def _group_gates(model, vision: VisionInputs):
    return model.encode_vision(vision)[1]


def gate_over_time(session: Session, prompt: Prompt) -> np.ndarray | None:
    """The gate's weights float32[T, E] for each of the T temporal patch groups of the prompt's first clip
    (T = sampled frames / ``temporal_patch_size``); None when the checkpoint has no gate (scale mode, or one
    expert) or the prompt has no clip."""
    model = session.model
    grids = prompt.vision.get("video_grid_thw")
    if model.compressor.gate is None or grids is None or len(grids) == 0:
        return None
    t, h, w = (int(x) for x in np.asarray(grids)[0])
    pixels = np.asarray(prompt.vision["pixel_values_videos"], np.float32)[: t * h * w]
    lay = vision_layout(np.tile([[1, h, w]], (t, 1)), layout_spec(model.config))
    vision = ModelInputs(text=TextInputs()).replace(pixel_values=pixels, **lay).vision  # the layout's flat names
    return np.asarray(_group_gates(model, vision), np.float32)


def group_times(frame_seconds: list[float], groups: int) -> list[float]:
    """The start (seconds) of each temporal patch group, from the sampled frames' times: group g starts at
    frame g · (frames / groups)."""
    if groups == 0:
        return []
    step = len(frame_seconds) // groups
    return [frame_seconds[g * step] for g in range(groups)] if step else []
