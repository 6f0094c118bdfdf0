"""Generation with audio in the prompt: the cached path (prefill + decode) equals uncached forwards over
prompt + generated tokens, and emoqwen-describe uses a clip's audio track when the checkpoint has an encoder."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_rel

from emoqwen_jax.infer import SamplingConfig, generate, left_pad, prefill
from emoqwen_jax.model import EmotionQwen, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402

pytestmark = pytest.mark.slow  # generates with audio end to end


def _sharpen(model):
    """Larger weights so greedy margins are decisive (an equal argmax then means something)."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    rng = np.random.default_rng(1)

    def bump(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "norm" in name or "layer_norm" in name or "embed_positions" in name:
            return x
        return x + 0.3 * rng.standard_normal(x.shape).astype(np.float32) * (2.0 if "audio" in name else 1.0)

    pure = jax.tree_util.tree_map_with_path(lambda p, x: bump(p, np.asarray(x)), pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def audio_model():
    c = emotion_qwen.get_config("demo")  # the tiny sizes with audio on (1 s encoder windows)
    return _sharpen(EmotionQwen(ModelConfig.from_run_config(c), rngs=nnx.Rngs(0)))


def test_cached_decoding_equals_uncached_with_audio(audio_model):
    m = audio_model
    a = m.config.audio
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3, a.num_mel_bins, a.max_frames)).astype(np.float32)
    fmask = np.zeros((3, a.max_frames), np.int32)
    fmask[0], fmask[1, :60], fmask[2, :100] = 1, 1, 1  # row 0: windows 0-1 (25 + 14 tokens); row 1: window 2
    lengths = [[2, 39], [1, 25]]
    audio_block = lambda n: [a.audio_bos_token_id] + [a.audio_token_id] * n + [a.audio_eos_token_id]  # noqa: E731
    rows = [[11, 12] + audio_block(39) + [13, 14], [21] + audio_block(25) + [22, 23, 24, 25]]
    audio = dict(input_features=feats, feature_attention_mask=fmask, audio_lengths=lengths)
    ids, mask = left_pad(rows, 0)
    inputs = m.prepare_inputs(ids, mask, **audio)
    logits, _, _ = prefill(m, inputs.replace(rope_deltas=None), cache_len=ids.shape[1] + 4)
    full = np.asarray(m(ids, attention_mask=mask, **audio).logits)
    # Two float32 paths (other attention shapes): measured 1.2e-6 of max|logit| here, 6e-7 for text-only rows of
    # the same sharpened model (audio adds an encoder, no cache-specific error). An element-wise bound (atol=1e-5)
    # failed on an AVX-512 CPU: 1.35e-5 on a logit of 0.04, ~2e-6 of this test's max|logit| (about 7).
    assert_close_rel(logits, full[:, -1], 1e-5, what="prefill vs uncached forward")

    n = 5
    out = generate(m, ids, mask, sampling=SamplingConfig(max_new_tokens=n), **audio)
    per_row = [dict(input_features=feats[:2], feature_attention_mask=fmask[:2], audio_lengths=[lengths[0]]),
               dict(input_features=feats[2:], feature_attention_mask=fmask[2:], audio_lengths=[lengths[1]])]
    specials = {a.audio_bos_token_id, a.audio_token_id, a.audio_eos_token_id}
    assert not specials & set(out.tokens.reshape(-1).tolist())  # (a generated <|AUDIO|> has no features to re-run)
    for b, row in enumerate(rows):
        seq = row + out.tokens[b].tolist()
        one = np.asarray(m(np.asarray([seq]), **per_row[b]).logits[0])
        step_logits = one[len(row) - 1:len(seq) - 1]
        top2 = np.sort(step_logits, -1)[:, -2:]
        # no near-tie: the top-2 gap is 10x the cached-vs-uncached bound above, so equal argmax is meaningful
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-4 * np.abs(step_logits).max()
        np.testing.assert_array_equal(out.tokens[b], step_logits.argmax(-1))


def test_describe_uses_the_clip_audio(audio_model, tmp_path, capsys):
    """A model directory with an audio encoder: describe's prompt carries the clip's audio block (and an
    audio-only file works), built by the training code's own processor."""
    from emoqwen_jax.cli.describe import main
    from emoqwen_jax.data.audio import write_audio
    from emoqwen_jax.data.demo import demo_clip
    from emoqwen_jax.data.demo_audio import demo_audio, write_demo_clip
    from emoqwen_jax.infer.session import Session
    from emoqwen_jax.model_dir import save_model

    ckpt = save_model(audio_model, str(tmp_path / "ckpt"))
    clip = str(tmp_path / "clip.mp4")
    write_demo_clip(clip, demo_clip(0, "happy", frames=16), 8.0, "happy", 0)  # 16 frames at 8 fps: 2 s
    voice = str(tmp_path / "voice.wav")
    write_audio(voice, demo_audio(1, "sad", 1.5))
    session = Session.from_checkpoint(ckpt)
    prompt = session.prompt("How does she feel?", [("video", clip)])
    a = audio_model.config.audio
    assert int((prompt.input_ids == a.audio_token_id).sum()) == 50  # 2 s of sound, 25 tokens per second
    assert prompt.vision["audio_lengths"].tolist() == [[2, 50]]
    assert main(["--ckpt", ckpt, "--video", clip, "--prompt", "How does she feel?", "--max_new_tokens", "3",
                 "--json"]) == 0
    assert main(["--ckpt", ckpt, "--audio", voice, "--max_new_tokens", "3", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert lines[0]["prompt_tokens"] == len(prompt.input_ids)
    assert lines[1]["prompt_tokens"] > 37  # 1.5 s of audio: 37 tokens plus the template
