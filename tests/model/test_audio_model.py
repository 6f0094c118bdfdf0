"""EmotionQwen with audio: audio tokens are the projector of the encoder's output at the <|AUDIO|> positions,
they only influence later positions, a frozen encoder gets no gradient, and audio-free inputs run as before."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_load as TL
from flax import nnx
from tolerance import assert_close_rel

from emoqwen_jax.model import EmotionQwen, ModelConfig, abstract_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402

MELS, WINDOW = 16, 100


def tiny_audio_config(**audio) -> ModelConfig:
    c = emotion_qwen.get_config("tiny")
    c.model.audio.update(enabled=True, num_mel_bins=MELS, **audio)
    return ModelConfig.from_dict(c.model.to_dict())


@pytest.fixture(scope="module")
def model():
    return TL.randomize_nnx_(TL.build(lambda: EmotionQwen(tiny_audio_config(), rngs=nnx.Rngs(0))), 3)


def _prompt(cfg: ModelConfig, n_audio: int, text_before: int = 3, text_after: int = 4) -> np.ndarray:
    a = cfg.audio
    row = ([5 + i for i in range(text_before)] + [a.audio_bos_token_id] + [a.audio_token_id] * n_audio
           + [a.audio_eos_token_id] + [40 + i for i in range(text_after)])
    return np.asarray([row], np.int32)


def _audio(seed: int, windows: int = 2, valid: int = 170):
    feats = np.random.default_rng(seed).standard_normal((windows, MELS, WINDOW)).astype(np.float32)
    mask = (np.arange(windows * WINDOW) < valid).astype(np.int32).reshape(windows, WINDOW)
    return feats, mask


@nnx.jit
def _embed(m, inputs):
    return m.embed(inputs)[0]


@nnx.jit
def _logits(m, inputs):
    return m.forward(inputs).logits


def test_audio_tokens_are_projected_encoder_features(model):
    cfg = model.config
    feats, mask = _audio(0)
    n = 25 + 17  # window 0: 25 tokens; window 1: 70 valid frames -> 17
    ids = _prompt(cfg, n)
    inputs = model.prepare_inputs(ids, input_features=feats, feature_attention_mask=mask, audio_lengths=[[2, n]])
    embeds = np.asarray(_embed(model, inputs))
    enc = nnx.jit(lambda m, f, k: m.audio_projector(m.audio_tower(f, k)))(model, jnp.asarray(feats), jnp.asarray(mask))
    expected = np.asarray(enc).reshape(-1, cfg.text.hidden_size)[:n]
    where = ids[0] == cfg.audio.audio_token_id
    assert_close_rel(embeds[0, where], expected, 1e-5, what="audio embeddings")
    table = np.asarray(model.language_model.embed_tokens[...])
    np.testing.assert_array_equal(embeds[0, ~where], table[ids[0, ~where]])


def test_audio_only_influences_later_positions(model):
    cfg = model.config
    ids = _prompt(cfg, 42)
    outs = []
    for seed in (0, 1):
        feats, mask = _audio(seed)
        inputs = model.prepare_inputs(ids, input_features=feats, feature_attention_mask=mask, audio_lengths=[[2, 42]])
        outs.append(np.asarray(_logits(model, inputs)))
    before = 4  # text 0..2 and <|audio_bos|>
    np.testing.assert_array_equal(outs[0][0, :before], outs[1][0, :before])
    assert np.abs(outs[0][0, -1] - outs[1][0, -1]).max() > 1e-4


def test_frozen_encoder_gets_no_gradient(model):
    cfg = model.config
    feats, mask = _audio(2)
    ids = _prompt(cfg, 42)
    inputs = model.prepare_inputs(ids, input_features=feats, feature_attention_mask=mask, audio_lengths=[[2, 42]])

    def loss(m):
        return jnp.mean(m.forward(inputs).logits[0, -1] ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)
    tower = jax.tree.leaves(grads["audio_tower"])
    proj = jax.tree.leaves(grads["audio_projector"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in tower)
    assert any(float(jnp.abs(g).max()) > 0.0 for g in proj)


def test_mismatched_audio_is_a_clear_error(model):
    feats, mask = _audio(0)
    with pytest.raises(ValueError, match="do not match"):
        model.prepare_inputs(_prompt(model.config, 41), input_features=feats, feature_attention_mask=mask,
                             audio_lengths=[[2, 42]])
    plain = abstract_model(ModelConfig.from_dict(emotion_qwen.get_config("tiny").model.to_dict()))
    assert not hasattr(plain, "audio_tower")  # no audio parameters unless model.audio.enabled
    with pytest.raises(ValueError, match="no audio encoder"):
        plain.prepare_inputs(_prompt(model.config, 42), input_features=feats)


def test_pooled_audio_per_item_matches_a_loop():
    from emoqwen_jax.model.audio import pooled_audio_per_item

    rng = np.random.default_rng(3)
    audio = rng.standard_normal((10, 5)).astype(np.float32)
    a_idx = np.full((3, 8), -1, np.int32)
    a_idx[0, 1:4] = [0, 1, 2]
    a_idx[2, 2:7] = [5, 6, 7, 8, 9]
    v_idx = np.full((3, 8), -1, np.int32)
    v_idx[0, 5:7] = [0, 1]
    v_idx[1, 0:2] = [2, 3]
    v_idx[2, 0:2] = [4, 5]
    unit_item = np.array([0, 0, 1, 1, 2, 2, -1, -1], np.int32)
    got = np.asarray(pooled_audio_per_item(jnp.asarray(audio), jnp.asarray(a_idx), jnp.asarray(v_idx),
                                           jnp.asarray(unit_item), 4))
    want = np.zeros((4, 5), np.float32)
    want[0] = audio[[0, 1, 2]].mean(0)  # item 0 is in row 0
    want[2] = audio[[5, 6, 7, 8, 9]].mean(0)  # item 1 (row 1) has no audio; item 2 is in row 2; item 3 padding
    assert_close_rel(got, want, 1e-6, what="pooled audio")


def test_gate_takes_pooled_audio():
    """gate_audio: the projection starts at zero (the gate is unchanged), and once trained the gate weights of a
    clip depend on its audio."""
    model = TL.randomize_nnx_(TL.build(lambda: EmotionQwen(tiny_audio_config(gate_audio=True), rngs=nnx.Rngs(0))), 4)
    cfg = model.config
    grid = (2, 4, 4)
    ids = np.asarray([[5, cfg.vision_start_token_id] + [cfg.video_token_id] * 8 + [cfg.vision_end_token_id,
                      cfg.audio.audio_bos_token_id] + [cfg.audio.audio_token_id] * 25 + [cfg.audio.audio_eos_token_id,
                      6]], np.int32)
    vision = dict(pixel_values_videos=np.random.default_rng(1).standard_normal((32, 1176)).astype(np.float32),
                  video_grid_thw=np.array([grid]), second_per_grid_ts=np.array([1.0], np.float32))

    def gate(seed, proj_value=None):
        if proj_value is not None:
            model.audio_gate_proj.kernel[...] = jnp.full(model.audio_gate_proj.kernel[...].shape, proj_value)
        feats, mask = _audio(seed, windows=1, valid=100)
        inputs = model.prepare_inputs(ids, **vision, input_features=feats, feature_attention_mask=mask,
                                      audio_lengths=[[1, 25]])
        return np.asarray(nnx.jit(lambda m, x: m.forward(x).gate_weights)(model, inputs))

    model.audio_gate_proj.kernel[...] = jnp.zeros_like(model.audio_gate_proj.kernel[...])  # as initialised
    model.audio_gate_proj.bias[...] = jnp.zeros_like(model.audio_gate_proj.bias[...])
    no_audio = np.asarray(nnx.jit(lambda m, x: m.forward(x).gate_weights)(model, model.prepare_inputs(
        np.asarray([[5, cfg.vision_start_token_id] + [cfg.video_token_id] * 8 + [cfg.vision_end_token_id, 6]]),
        **vision)))
    assert_close_rel(gate(0), no_audio, 1e-6, what="gate")  # zero-initialised: as without audio
    assert np.abs(gate(0, 0.5) - gate(1)).max() > 1e-4  # trained: other sound, other expert weights
