"""Shared pieces of the engine tests: a sharpened tiny model with audio (decisive greedy margins), its
session, synthetic prompts (text, image, video, audio) and the one-prompt ``generate`` reference."""

import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from emoqwen_jax.infer import SamplingConfig, generate, left_pad
from emoqwen_jax.infer.session import Prompt, Session
from emoqwen_jax.model import EmotionQwen, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402


def sharp_model(seed: int = 1) -> EmotionQwen:
    """The ``demo`` preset (tiny sizes, audio on) with weights bumped by 0.3·N(0, 1) so greedy margins are
    decisive: equal tokens from different computations then mean something."""
    model = EmotionQwen(ModelConfig.from_run_config(emotion_qwen.get_config("demo")), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)

    def bump(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "norm" in name or "embed_positions" in name:
            return x
        return x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)

    pure = jax.tree_util.tree_map_with_path(lambda p, x: bump(p, np.asarray(x)), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def session_of(model: EmotionQwen, cache_dir: str) -> Session:
    return Session(model, {"tokenizer_cache_dir": cache_dir})


def text_prompt(rng, n: int) -> Prompt:
    return Prompt(rng.integers(20, 600, n).astype(np.int32), {})


def image_prompt(model, rng, grid=(1, 4, 6), before=3, after=5) -> Prompt:
    c = model.config
    ids = list(rng.integers(20, 600, before)) + [c.vision_start_token_id] + [c.image_token_id] * (
        int(np.prod(grid)) // 4) + [c.vision_end_token_id] + list(rng.integers(20, 600, after))
    pixels = rng.standard_normal((int(np.prod(grid)), 1176)).astype(np.float32)
    return Prompt(np.asarray(ids, np.int32), {"pixel_values": pixels, "image_grid_thw": np.array([grid])})


def video_prompt(model, rng, grid=(2, 4, 4), before=2, after=4) -> Prompt:
    c = model.config
    ids = list(rng.integers(20, 600, before)) + [c.vision_start_token_id] + [c.video_token_id] * (
        int(np.prod(grid)) // 4) + [c.vision_end_token_id] + list(rng.integers(20, 600, after))
    pixels = rng.standard_normal((int(np.prod(grid)), 1176)).astype(np.float32)
    return Prompt(np.asarray(ids, np.int32), {"pixel_values_videos": pixels, "video_grid_thw": np.array([grid]),
                                              "second_per_grid_ts": np.array([1.0], np.float32)})


def audio_prompt(model, rng, frames: int = 60) -> Prompt:
    a = model.config.audio
    tokens = (frames + 1) // 2 // 2  # the encoder halves the frames, the projector pools by 2
    feats = rng.standard_normal((1, a.num_mel_bins, a.max_frames)).astype(np.float32)
    fmask = np.zeros((1, a.max_frames), np.int32)
    fmask[0, :frames] = 1
    ids = [31, 32, a.audio_bos_token_id] + [a.audio_token_id] * tokens + [a.audio_eos_token_id, 33, 34]
    return Prompt(np.asarray(ids, np.int32), {"input_features": feats, "feature_attention_mask": fmask,
                                              "audio_lengths": np.array([[1, tokens]])})


REF_LENGTH, REF_TOKENS = 64, 12  # one padded length and budget: the references share compiled shapes


def reference(model, prompt: Prompt, max_tokens: int, stop_ids=(), rng=None, temperature=0.0, top_p=1.0,
              top_k=0) -> list[int]:
    """``generate`` for this prompt alone (a batch of one, left-padded to REF_LENGTH; stop id removed), its
    first ``max_tokens`` tokens (a greedy or seeded run's prefix does not depend on the budget)."""
    ids, mask = left_pad([prompt.input_ids], 0, REF_LENGTH)
    vision = dict(prompt.vision)
    buckets = dict(pad_patches_to=256, pad_items_to=2) if "pixel_values" in vision or \
        "pixel_values_videos" in vision else {}
    out = generate(model, ids, mask, sampling=SamplingConfig(
        max_new_tokens=max(max_tokens, REF_TOKENS), stop_ids=tuple(stop_ids), temperature=temperature,
        top_p=top_p, top_k=top_k), rng=rng, **vision, **buckets)
    return out.row(0)[:max_tokens]
