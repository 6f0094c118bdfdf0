"""Audio encoder and projector parity against HF ``Qwen2AudioEncoder`` (transformers 5.24), float32.

Tiny configs with distinct sizes (mel 20, width 36 / 3 heads → head dim 12, MLP 44, 50 positions → 100 frames);
every HF parameter randomised (``hf_oracle.randomize_``), the fixed positions included, so nothing can hide.
Per module: the conv stem, one layer (with and without a key mask), pooling + final norm, the whole encoder
(full window and a short, masked one), the projector; then the converters from a saved Qwen2-Audio model, a
bare encoder and a Whisper model. Tolerance max|ours − ref| / max|ref|: 1e-5 simple, 1e-4 composite.
"""

import hf_oracle as O
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_load as TL
from flax import nnx
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    WhisperConfig,
    WhisperModel,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.qwen2_audio import modeling_qwen2_audio as Q

from emoqwen_jax.convert import audio_encoder_from_hf
from emoqwen_jax.convert.audio import audio_config_from_hf, audio_projector_from_hf
from emoqwen_jax.model.audio import AudioConfig, AudioEncoder, AudioProjector, output_lengths
from emoqwen_jax.parallel import make_mesh
from emoqwen_jax.parallel.rules import param_shardings

SIMPLE, COMPOSITE = 1e-5, 1e-4
ENC = dict(num_mel_bins=20, d_model=36, encoder_layers=2, encoder_attention_heads=3, encoder_ffn_dim=44,
           max_source_positions=50)
FRAMES = 2 * ENC["max_source_positions"]


@nnx.jit
def _apply(module, *args):
    return module(*args)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def hf_encoder():
    cfg = Qwen2AudioEncoderConfig(**ENC)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return O.randomize_(Q.Qwen2AudioEncoder(cfg).eval(), 5)


def _load_torch(ours: nnx.Module, module: torch.nn.Module) -> None:
    """Strict HF → ours by name: Linear [out, in] → kernel.T; Conv1d [out, in, k] → kernel [in·k, out]."""
    params = dict(module.named_parameters())
    for name, p in params.items():
        *path, leaf = name.split(".")
        target = ours
        for part in path:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        value = p.detach().numpy()
        if leaf == "weight" and hasattr(target, "kernel"):
            target.kernel[...] = jnp.asarray(value.reshape(value.shape[0], -1).T)
        elif isinstance(target, nnx.Param):  # embed_positions.weight
            target[...] = jnp.asarray(value)
        else:
            var = getattr(target, leaf)
            assert var[...].shape == value.shape, name
            var[...] = jnp.asarray(value)
    assert len(params) == len(jax.tree.leaves(nnx.state(ours, nnx.Param)))


@pytest.fixture(scope="module")
def ours(hf_encoder):
    enc = TL.build(lambda: AudioEncoder(AudioConfig(**ENC), rngs=nnx.Rngs(0)))  # zeros, filled below
    _load_torch(enc, hf_encoder)
    return enc


def _features(batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, ENC["num_mel_bins"], FRAMES)).astype(np.float32)


def test_conv_stem(ours, hf_encoder):
    x = _features()
    with torch.no_grad():
        h = torch.nn.functional.gelu(hf_encoder.conv1(torch.tensor(x)))
        h = torch.nn.functional.gelu(hf_encoder.conv2(h)).permute(0, 2, 1) + hf_encoder.embed_positions.weight
    assert _rel(nnx.jit(lambda m, f: m.stem(f))(ours, jnp.asarray(x)), h.numpy()) <= SIMPLE


@pytest.mark.parametrize("masked", [False, True])
def test_encoder_layer(ours, hf_encoder, masked):
    x = np.random.default_rng(1).standard_normal((2, 50, ENC["d_model"])).astype(np.float32)
    valid = np.array([50, 17])
    keep = np.arange(50)[None, :] < valid[:, None]
    hf_mask = None
    if masked:
        hf_mask = create_bidirectional_mask(config=hf_encoder.config, inputs_embeds=torch.zeros(2, 50, 1),
                                            attention_mask=torch.tensor(keep.astype(np.int64)))
    with torch.no_grad():
        ref = hf_encoder.layers[0](torch.tensor(x), hf_mask).numpy()
    mask = jnp.asarray(keep)[:, None, None, :] if masked else None
    out = np.asarray(_apply(ours.layers[0], jnp.asarray(x), mask))
    assert _rel(out, ref) <= COMPOSITE


def test_pooling_and_final_norm(ours, hf_encoder):
    x = np.random.default_rng(2).standard_normal((2, 50, ENC["d_model"])).astype(np.float32)
    with torch.no_grad():
        ref = hf_encoder.layer_norm(hf_encoder.avg_pooler(torch.tensor(x).permute(0, 2, 1)).permute(0, 2, 1))
    assert _rel(nnx.jit(lambda m, h: m.pool(h))(ours, jnp.asarray(x)), ref.numpy()) <= SIMPLE


def test_whole_encoder(ours, hf_encoder):
    x = _features()
    with torch.no_grad():
        ref = hf_encoder(torch.tensor(x)).last_hidden_state.numpy()
    out = _apply(ours, jnp.asarray(x))
    assert out.shape == (2, FRAMES // 4, ENC["d_model"])
    assert _rel(out, ref) <= COMPOSITE


def test_whole_encoder_with_feature_mask(ours, hf_encoder):
    """Short audio in a padded window: keys past the valid frames are masked as Qwen2AudioModel masks them."""
    x = _features(seed=3)
    feat_len = np.array([FRAMES, 37])
    fmask = (np.arange(FRAMES)[None, :] < feat_len[:, None]).astype(np.int32)
    conv_len = (feat_len - 1) // 2 + 1
    keep = np.arange(50)[None, :] < conv_len[:, None]
    hf_mask = create_bidirectional_mask(config=hf_encoder.config, inputs_embeds=torch.zeros(2, 50, 1),
                                        attention_mask=torch.tensor(keep.astype(np.int64)))
    with torch.no_grad():
        ref = hf_encoder(torch.tensor(x), attention_mask=hf_mask).last_hidden_state.numpy()
    out = np.asarray(_apply(ours, jnp.asarray(x), jnp.asarray(fmask)))
    n = np.asarray(output_lengths(jnp.asarray(feat_len)))
    np.testing.assert_array_equal(n, [25, 9])
    for b in range(2):  # the rows Qwen2-Audio keeps
        assert _rel(out[b, :n[b]], ref[b, :n[b]]) <= COMPOSITE


def test_shorter_input_uses_the_first_positions(ours, hf_encoder):
    """HF insists on 2·max_source_positions frames; ours takes any even count ≤ that. With frames 0..39 and
    no mask the first output rows differ (attention sees fewer keys), so compare with HF's layers run on the
    same 20 positions."""
    x = _features()[:, :, :40]
    with torch.no_grad():
        h = torch.nn.functional.gelu(hf_encoder.conv1(torch.tensor(x)))
        h = torch.nn.functional.gelu(hf_encoder.conv2(h)).permute(0, 2, 1) + hf_encoder.embed_positions.weight[:20]
        for layer in hf_encoder.layers:
            h = layer(h, None)
        ref = hf_encoder.layer_norm(hf_encoder.avg_pooler(h.permute(0, 2, 1)).permute(0, 2, 1)).numpy()
    assert _rel(_apply(ours, jnp.asarray(x)), ref) <= COMPOSITE
    with pytest.raises(ValueError, match="even count"):
        ours(jnp.asarray(_features()[:, :, :41]))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector(kind):
    cfg = AudioConfig(**ENC, projector=kind, projector_hidden_size=28)
    proj = AudioProjector(cfg, 24, rngs=nnx.Rngs(1))
    x = np.random.default_rng(4).standard_normal((2, 7, ENC["d_model"])).astype(np.float32)
    if kind == "linear":
        full = Qwen2AudioConfig(audio_config=dict(ENC), text_config=dict(hidden_size=24))
        hf = O.randomize_(Q.Qwen2AudioMultiModalProjector(full).eval(), 6)
        proj.linear.kernel[...] = jnp.asarray(hf.linear.weight.detach().numpy().T)
        proj.linear.bias[...] = jnp.asarray(hf.linear.bias.detach().numpy())
        with torch.no_grad():
            ref = hf(torch.tensor(x)).numpy()
    else:  # an independent numpy reference: Linear → exact GELU → Linear
        import math

        w1, b1 = np.asarray(proj.linear_1.kernel[...]), np.asarray(proj.linear_1.bias[...])
        w2, b2 = np.asarray(proj.linear_2.kernel[...]), np.asarray(proj.linear_2.bias[...])
        h = x.astype(np.float64) @ w1 + b1
        h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
        ref = h @ w2 + b2
        assert w1.shape == (ENC["d_model"], 28)
    assert _rel(_apply(proj, jnp.asarray(x)), ref) <= SIMPLE


# ---- converters ---------------------------------------------------------------------------------------------
def test_from_bare_encoder_dir(hf_encoder, tmp_path):
    hf_encoder.save_pretrained(tmp_path)
    enc = audio_encoder_from_hf(str(tmp_path))
    x = _features(seed=7)
    with torch.no_grad():
        ref = hf_encoder(torch.tensor(x)).last_hidden_state.numpy()
    assert _rel(_apply(enc, jnp.asarray(x)), ref) <= COMPOSITE


def test_from_qwen2_audio_dir(tmp_path):
    enc_cfg = dict(ENC)
    text = dict(vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32)
    cfg = Qwen2AudioConfig(audio_config=enc_cfg, text_config=text)
    cfg.audio_config._attn_implementation = "eager"
    torch.manual_seed(1)
    model = O.randomize_(Qwen2AudioForConditionalGeneration(cfg).eval(), 8)
    model.save_pretrained(tmp_path)
    enc, proj = audio_encoder_from_hf(str(tmp_path)), audio_projector_from_hf(str(tmp_path))
    x = _features(seed=8)
    with torch.no_grad():
        feats = model.model.audio_tower(torch.tensor(x)).last_hidden_state
        ref_proj = model.model.multi_modal_projector(feats).numpy()
    ours_feats = _apply(enc, jnp.asarray(x))
    assert _rel(ours_feats, feats.numpy()) <= COMPOSITE
    assert _rel(_apply(proj, ours_feats), ref_proj) <= COMPOSITE
    assert audio_config_from_hf(cfg.to_dict()).d_model == ENC["d_model"]


def test_from_whisper_encoder(tmp_path):
    """A Whisper checkpoint's encoder, run the Qwen2-Audio way (HF Qwen2AudioEncoder with the same weights)."""
    wcfg = WhisperConfig(**ENC, decoder_layers=1, decoder_attention_heads=3, decoder_ffn_dim=20, vocab_size=60,
                         max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         decoder_start_token_id=1)
    torch.manual_seed(2)
    whisper = O.randomize_(WhisperModel(wcfg).eval(), 9)
    whisper.save_pretrained(tmp_path)
    qcfg = Qwen2AudioEncoderConfig(**ENC)
    qcfg._attn_implementation = "eager"
    ref_enc = Q.Qwen2AudioEncoder(qcfg).eval()
    ref_enc.load_state_dict(whisper.encoder.state_dict(), strict=True)
    x = _features(seed=9)
    with torch.no_grad():
        ref = ref_enc(torch.tensor(x)).last_hidden_state.numpy()
    enc = audio_encoder_from_hf(str(tmp_path), dtype="float32")
    assert _rel(_apply(enc, jnp.asarray(x)), ref) <= COMPOSITE
    bf16 = audio_encoder_from_hf(str(tmp_path), dtype=jnp.bfloat16)
    out = _apply(bf16, jnp.asarray(x))
    assert out.dtype == jnp.bfloat16 and bf16.conv1.kernel[...].dtype == jnp.bfloat16
    assert _rel(out.astype(jnp.float32), ref) <= 0.1  # bfloat16 runs, and is close


def test_not_an_audio_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    with pytest.raises(ValueError, match="qwen2_audio"):
        audio_encoder_from_hf(str(tmp_path))


def test_every_param_has_logical_axes_and_shards():
    enc = nnx.eval_shape(lambda: AudioEncoder(AudioConfig(**(ENC | {"encoder_ffn_dim": 48})), rngs=nnx.Rngs(0)))
    proj = nnx.eval_shape(lambda: AudioProjector(AudioConfig(**ENC), 24, rngs=nnx.Rngs(0)))
    for module in (enc, proj):
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == len(var.shape), path
    mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 1, "tensor": 4})
    specs = param_shardings(nnx.state(enc, nnx.Param), mesh)
    fc1 = specs["layers"][0]["fc1"]["kernel"].spec
    assert fc1 == jax.sharding.PartitionSpec("fsdp", "tensor")  # width over fsdp, MLP over tensor
