"""Audio through the export: a model with an audio encoder (attached from a saved HF Qwen2AudioEncoder) is
written with ``to_hf``; transformers loads it with the remote code and gives our logits (1e-4) with a video
and its audio in the prompt, greedy ``generate`` gives our tokens, and JAX -> HF -> JAX is bit-identical."""

import hf_oracle as O
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration, Qwen2AudioEncoderConfig
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from emoqwen_jax.convert import from_hf, to_hf
from emoqwen_jax.convert.audio import attach_audio
from emoqwen_jax.data.tokenizer import tokenizer_info
from emoqwen_jax.infer import SamplingConfig, generate, left_pad

TOL = 1e-4
TOK = tokenizer_info(512)
STOP, PAD = (TOK.im_end_id, TOK.endoftext_id), TOK.endoftext_id
ENC = dict(num_mel_bins=16, d_model=24, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=40,
           max_source_positions=25)  # 50-frame windows, 12 tokens each
GRID = (2, 4, 6)


def _src(tmp_path_factory):
    cfg = O.hf_config("base")
    cfg.image_token_id, cfg.video_token_id = TOK.image_pad_id, TOK.video_pad_id
    cfg.vision_start_token_id, cfg.vision_end_token_id = TOK.vision_start_id, TOK.vision_end_id
    torch.manual_seed(0)
    hf = O.sharpen_(O.randomize_(Qwen2_5_VLForConditionalGeneration(cfg).eval(), 11))
    vl = tmp_path_factory.mktemp("vl")
    hf.save_pretrained(vl)
    enc = O.randomize_(Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**ENC)).eval(), 12)
    audio = tmp_path_factory.mktemp("enc")
    enc.save_pretrained(audio)
    return vl, audio


def _randomize_projector(model, seed):
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model.audio_projector):
        if isinstance(var, nnx.Param):
            var[...] = jax.numpy.asarray(0.3 * rng.standard_normal(var[...].shape).astype(np.float32))
    return model


@pytest.fixture(scope="module", params=["linear", "mlp"])
def export(request, tmp_path_factory):
    vl, audio = _src(tmp_path_factory)
    model = attach_audio(from_hf(str(vl), compressor=dict(num_experts=2), seed=1), str(audio),
                         projector=request.param, projector_hidden_size=20)
    model = _randomize_projector(model, 3)
    path = tmp_path_factory.mktemp("export")
    to_hf(model, str(path), overwrite=True)
    hf = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, local_files_only=True,
                                                     dtype=torch.float32, attn_implementation="eager").eval()
    return model, path, hf


def _inputs():
    n_video = int(np.prod(GRID)) // 4
    n_audio = 12 + 7  # window 0 full (50 frames), window 1 with 30 frames of audio
    row = ([7, 8, TOK.vision_start_id] + [TOK.video_pad_id] * n_video + [TOK.vision_end_id, TOK.audio_bos_id]
           + [TOK.audio_id] * n_audio + [TOK.audio_eos_id, 9, 10, 11])
    ids = np.asarray([row], np.int64)
    feats = np.random.default_rng(5).standard_normal((2, ENC["num_mel_bins"], 50)).astype(np.float32)
    mask = (np.arange(100) < 80).astype(np.int64).reshape(2, 50)
    vision = dict(pixel_values_videos=O.pixels(GRID, 2), video_grid_thw=np.array([GRID]),
                  second_per_grid_ts=np.array([1.0], np.float32))
    return ids, feats, mask, vision, [[2, n_audio]]


def test_logits_match_with_audio(export):
    model, _, hf = export
    ids, feats, mask, vision, lengths = _inputs()
    got = np.asarray(model(ids, np.ones_like(ids), **vision, input_features=feats, feature_attention_mask=mask,
                           audio_lengths=lengths).logits)
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in vision.items()}
    hf.model.rope_deltas = None
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.ones_like(torch.as_tensor(ids)),
                 input_features=torch.as_tensor(feats), feature_attention_mask=torch.as_tensor(mask),
                 **kwargs).logits.numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= TOL
    # the audio matters: other features, other logits after the audio block
    with torch.no_grad():
        other = hf(input_ids=torch.as_tensor(ids), input_features=torch.as_tensor(feats[::-1].copy()),
                   feature_attention_mask=torch.as_tensor(mask), **kwargs).logits.numpy()
    assert np.abs(other[0, -1] - ref[0, -1]).max() > 1e-3


def test_round_trip_is_bit_identical(export):
    model, path, _ = export
    back = from_hf(str(path))
    assert back.config == model.config
    ours = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    again = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(back, nnx.Param)))
    assert jax.tree.structure(ours) == jax.tree.structure(again)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(again), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_export_refuses_what_it_cannot_carry(export, tmp_path):
    import dataclasses

    from emoqwen_jax.convert.hf_export import check_format

    model = export[0]
    with pytest.raises(ValueError, match="no audio encoder"):
        check_format(model.config, "qwen2_5_vl")
    interleaved = dataclasses.replace(model.config, audio=dataclasses.replace(model.config.audio,
                                                                              position_rule="interleave"))
    with pytest.raises(ValueError, match="position_rule"):
        check_format(interleaved, "emotion_qwen")


def test_generate_matches_jax_greedy_with_audio(export):
    """transformers' ``generate`` on the export takes the audio inputs (prefill only) and gives our greedy
    tokens for left-padded video + audio and audio-only prompts."""
    model, _, hf = export
    ids, feats, mask, vision, lengths = _inputs()
    short = [5, 6, TOK.audio_bos_id] + [TOK.audio_id] * 7 + [TOK.audio_eos_id, 8]  # one window, 30 frames
    rows = [ids[0].tolist(), short]
    feats = np.concatenate([feats, np.random.default_rng(6).standard_normal((1,) + feats.shape[1:]).astype(np.float32)])
    mask = np.concatenate([mask, (np.arange(50) < 30).astype(np.int64)[None]])
    audio = dict(input_features=feats, feature_attention_mask=mask, audio_lengths=np.array(lengths + [[1, 7]]))
    ids, attention = left_pad(rows, PAD)
    n = 6
    got = generate(model, ids, attention, sampling=SamplingConfig(max_new_tokens=n, stop_ids=STOP, pad_id=PAD),
                   **vision, **audio)
    ref = O.assert_hf_generate_equals(hf, got, ids, attention, PAD, **vision, **audio)
    # the audio steers the answer: other sounds, other tokens (so the test sees the audio reach generate)
    with torch.no_grad():
        other = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(attention),
                            max_new_tokens=n, do_sample=False,
                            **{k: torch.as_tensor(np.asarray(v)) for k, v in vision.items()},
                            input_features=torch.as_tensor(-feats), feature_attention_mask=torch.as_tensor(mask),
                            audio_lengths=torch.as_tensor(audio["audio_lengths"]))
    other = other[:, ids.shape[1]:].numpy()
    assert other.shape != ref.shape or (other != ref).any()
    with pytest.raises(ValueError, match="audio_lengths"):  # lengths that disagree with the masks
        hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(attention),
           **{k: torch.as_tensor(np.asarray(v)) for k, v in {**vision, **audio}.items() if k != "audio_lengths"},
           audio_lengths=torch.as_tensor([[2, 19], [1, 6]]))
