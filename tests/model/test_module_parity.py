"""Per-module parity against the Hugging Face Qwen2.5-VL torch modules (transformers 5.24), float32.

Each HF module is built from a small config with distinct sizes (``torch_load.small_hf_config``), every
parameter randomised (``hf_oracle.randomize_``: norms around 1, biases non-zero), and copied strictly into
our NNX module. Tolerance is max|ours - ref| / max|ref|: 1e-5 for simple layers (RMSNorm, rotary tables,
MLP, merger), 1e-4 for composite ones (blocks, the whole ViT, the decoder layer).
"""

import dataclasses

import hf_oracle as O
import jax
import numpy as np
import pytest
import torch
import torch_load as TL
from flax import nnx
from transformers import vision_utils as VU
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as M

from emoqwen_jax import layout
from emoqwen_jax.model import rope
from emoqwen_jax.model.compressor import ExpertMergers
from emoqwen_jax.model.layers import GatedMLP, RMSNorm
from emoqwen_jax.model.text import DecoderLayer
from emoqwen_jax.model.vision import VisionBlock, VisionTransformer, from_window_order, to_window_order

SIMPLE, COMPOSITE = 1e-5, 1e-4
F32 = dict(dtype=np.float32, param_dtype=np.float32)

# Grid sets (t, h, w in patches). With window 56 px (2x2 merged units) and 112 px (4x4): 6x10 patches = 3x5
# units is divided by neither window; (3, 4, 6) is a 3-frame video; the last set mixes images and a video.
GRID_SETS = {
    "image_window_not_dividing": [(1, 6, 10)],
    "video_3_frames": [(3, 4, 6)],
    "images_and_video": [(1, 4, 8), (2, 6, 4), (1, 10, 2)],
}


@pytest.fixture(scope="module")
def hf_cfg():
    return TL.small_hf_config()


@pytest.fixture(scope="module")
def ours_cfg(hf_cfg):
    return TL.ours_config(hf_cfg)


@pytest.fixture(scope="module")
def hf_visual(hf_cfg):
    torch.manual_seed(0)
    visual = M.Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_cfg.vision_config).eval()
    return O.randomize_(visual, 11)


def _t(x, dtype=torch.float32):
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _run(module, *args):
    with torch.no_grad():
        return module(*args)


def _rng(seed):
    return np.random.default_rng(seed)


_mrope = jax.jit(rope.mrope, static_argnums=(1, 2, 3))
_vision_rotary = jax.jit(rope.vision_rotary, static_argnums=(1, 2))


@nnx.jit
def _apply(module, *args):
    return module(*args)


@nnx.jit
def _vit_and_merger(vit, merger, pixels, lay):
    features = vit(pixels, pos_hw=lay["vision_pos_hw"], window_index=lay["vision_window_index"],
                   frame_segment=lay["vision_frame_segment"], window_segment=lay["vision_window_segment"])
    return from_window_order(merger(features)[0], lay["vision_window_index"])


# ---- simple layers ------------------------------------------------------------------------------------------
def test_rms_norm():
    hf = O.randomize_(M.Qwen2_5_VLRMSNorm(37, eps=1e-6), 1)
    ours = TL.build(lambda: RMSNorm(37, eps=1e-6, **F32))
    TL.load_torch_(ours, hf)
    x = 3.0 * _rng(0).standard_normal((5, 7, 37)).astype(np.float32) + 0.5
    assert O.rel_err(_apply(ours, x), _run(hf, _t(x))) <= SIMPLE


def test_vision_gated_mlp(hf_cfg):
    vc = hf_cfg.vision_config
    hf = O.randomize_(M.Qwen2_5_VLMLP(vc, bias=True), 2)
    ours = TL.build(lambda: GatedMLP(vc.hidden_size, vc.intermediate_size, use_bias=True, rngs=nnx.Rngs(0), **F32))
    TL.load_torch_(ours, hf)
    x = _rng(1).standard_normal((13, vc.hidden_size)).astype(np.float32)
    assert O.rel_err(_apply(ours, x), _run(hf, _t(x))) <= SIMPLE


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(3, 6, 4)], [(2, 8, 8), (1, 4, 2), (4, 2, 6)]])
def test_vision_rotary(hf_cfg, ours_cfg, grids):
    vc = hf_cfg.vision_config
    hf_pos = VU.get_vision_position_ids(torch.tensor(grids), vc.spatial_merge_size)  # [P, 2] (row, col)
    ref_cos, ref_sin = _run(M.Qwen2_5_VLVisionRotaryEmbedding(vc), torch.zeros(1), hf_pos)
    cfg, spec = ours_cfg
    pos_hw = layout.vision_layout(np.array(grids), spec)["vision_pos_hw"]
    np.testing.assert_array_equal(pos_hw, hf_pos.numpy())
    cos, sin = _vision_rotary(pos_hw, cfg.vision.head_dim, cfg.vision.rope_theta)
    assert cos.shape == tuple(ref_cos.shape) == (len(pos_hw), cfg.vision.head_dim)
    assert O.rel_err(cos, ref_cos) <= SIMPLE and O.rel_err(sin, ref_sin) <= SIMPLE


def _released_positions(spec):
    """Non-trivial (t, h, w) ids from the released rule: image, long video (spt 1.5), right padding."""
    ids, mask = O.pad_batch([[1, 52] + [50] * 6 + [53, 2, 52] + [51] * 24 + [53, 3, 4],
                             [5, 52] + [51] * 8 + [53, 6]])
    pos, _ = layout.get_rope_index(ids, mask, [(1, 4, 6)], [(4, 4, 6), (2, 4, 4)], [1.5, 0.5], spec)
    return pos, mask


def _hf_text_rotary(section):
    head_dim = 2 * sum(section)
    rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(section)}
    tc = M.Qwen2_5_VLTextConfig(**dict(TL.TEXT, hidden_size=3 * head_dim, num_attention_heads=3, num_key_value_heads=1,
                                       rope_parameters=rope_parameters))
    return M.Qwen2_5_VLRotaryEmbedding(tc), head_dim


@pytest.mark.parametrize("section", [(1, 2, 2), (2, 3, 3), (16, 24, 24)])
def test_mrope_tables(ours_cfg, section):
    hf, head_dim = _hf_text_rotary(section)
    released, _ = _released_positions(ours_cfg[1])
    random = _rng(2).integers(0, 3000, (3, 2, 17))  # every axis different at every token
    for position_ids in (released, random):
        ref_cos, ref_sin = _run(hf, torch.zeros(1), torch.as_tensor(np.asarray(position_ids, np.int64)))
        cos, sin = _mrope(position_ids, head_dim, 1e6, section)
        assert cos.shape == tuple(ref_cos.shape) == (*position_ids.shape[1:], head_dim)
        assert O.rel_err(cos, ref_cos) <= SIMPLE and O.rel_err(sin, ref_sin) <= SIMPLE


@pytest.mark.parametrize("dim, theta", [(128, 1e6), (80, 1e4), (10, 1e6), (20, 1e4)])
def test_inverse_frequencies_within_one_ulp_of_torch(dim, theta):
    """numpy's float32 pow was up to 2 ulp off torch's (14 of 64 entries at the real text head_dim 128), which
    at position 4096 moved cos by ~2e-4; the float64 power rounded to float32 is within 1 ulp everywhere and
    exact on the vision tables."""
    ref = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).numpy()
    ours = rope.inverse_frequencies(dim, theta)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.max(np.abs(ours - ref) / np.spacing(ref)) <= 1.0
    if theta == 1e4:
        np.testing.assert_array_equal(ours, ref)


def test_patch_merger_into_any_expert_slot(hf_cfg):
    vc = hf_cfg.vision_config
    hf = O.randomize_(M.Qwen2_5_VLPatchMerger(vc.out_hidden_size, vc.hidden_size, vc.spatial_merge_size), 3)
    x = _rng(3).standard_normal((4 * 9, vc.hidden_size)).astype(np.float32)
    ref = _run(hf, _t(x))
    for num_experts, slot in ((1, 0), (3, 1)):
        ours = TL.randomize_nnx_(TL.build(lambda num_experts=num_experts: ExpertMergers(
            num_experts, vc.hidden_size, vc.out_hidden_size, 4, rngs=nnx.Rngs(0), **F32)), 4)
        TL.load_merger_(ours, hf, slot)
        out = _apply(ours, x)
        assert out.shape == (num_experts, 9, vc.out_hidden_size)
        assert O.rel_err(out[slot], ref) <= SIMPLE


# ---- composite modules --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision_block_pair(hf_cfg, ours_cfg):
    hf = O.randomize_(M.Qwen2_5_VLVisionBlock(hf_cfg.vision_config).eval(), 5)
    ours = TL.build(lambda: VisionBlock(ours_cfg[0].vision, rngs=nnx.Rngs(0), **F32))
    TL.load_torch_(ours, hf)
    return hf, ours


@pytest.mark.parametrize("attention", ["window", "full"])
@pytest.mark.parametrize("window_size", [56, 112])
@pytest.mark.parametrize("grid_set", sorted(GRID_SETS))
def test_vision_block(hf_cfg, ours_cfg, vision_block_pair, grid_set, window_size, attention):
    hf, ours = vision_block_pair
    vc, spec = hf_cfg.vision_config, ours_cfg[1]
    grids = torch.tensor(GRID_SETS[grid_set])
    window_index, cu_window = VU.get_vision_window_index(grids, vc.spatial_merge_size, window_size, vc.patch_size)
    cu_seqlens = cu_window if attention == "window" else VU.get_vision_cu_seqlens(grids)
    # Several windows (and, for the video and the mixed set, several frames) so that a leak shows.
    assert len(cu_seqlens) - 1 == (int(grids[:, 0].sum()) if attention == "full" else len(set(cu_window.tolist())) - 1)
    assert attention == "full" or len(cu_seqlens) > 2
    lay = layout.vision_layout(grids.numpy(), dataclasses.replace(spec, window_size=window_size))
    segments = lay["vision_window_segment" if attention == "window" else "vision_frame_segment"]
    # Rotary tables in window order, exactly as HF's ViT forward builds them.
    p = int(grids.prod(-1).sum())
    cos, sin = _run(M.Qwen2_5_VLVisionRotaryEmbedding(vc), torch.zeros(1),
                    VU.get_vision_position_ids(grids, vc.spatial_merge_size))
    cos, sin = (t.reshape(p // 4, 4, -1)[window_index].reshape(p, -1) for t in (cos, sin))
    x = _rng(6).standard_normal((p, vc.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = hf(_t(x), cu_seqlens=cu_seqlens, position_embeddings=(cos, sin))
    got = _apply(ours, x, cos.numpy(), sin.numpy(), segments)
    assert O.rel_err(got, ref) <= COMPOSITE


@pytest.mark.parametrize("pad_patches", [0, 20])
def test_vision_transformer_and_merger(hf_cfg, ours_cfg, hf_visual, pad_patches):
    """Our ViT + one expert merger + ``from_window_order`` == HF ``visual(...)`` pooler_output, for two images
    and a 3-frame video of different grids in one call (window 56 px divides none of them fully)."""
    cfg, spec = ours_cfg
    grids = np.array([(1, 6, 10), (3, 4, 6), (1, 8, 4)])
    pixels = np.concatenate([O.pixels(g, i) for i, g in enumerate(grids)])
    with torch.no_grad():
        ref = hf_visual(_t(pixels), grid_thw=torch.tensor(grids)).pooler_output
    vit = TL.build(lambda: VisionTransformer(cfg.vision, rngs=nnx.Rngs(0)))
    TL.load_torch_(vit, hf_visual, skip=("merger.",))
    merger = TL.build(lambda: ExpertMergers(1, cfg.vision.hidden_size, cfg.text.hidden_size, 4, rngs=nnx.Rngs(0),
                                            **F32))
    TL.load_merger_(merger, hf_visual.merger)
    p = len(pixels)
    lay = layout.vision_layout(grids, spec, pad_patches_to=p + pad_patches)
    padded = np.zeros((p + pad_patches, pixels.shape[1]), np.float32)
    padded[:p] = pixels
    padded[p:] = 7.0  # garbage in the padding patches must not reach real tokens
    tokens = _vit_and_merger(vit, merger, padded, lay)
    assert tokens.shape == ((p + pad_patches) // 4, cfg.text.hidden_size)
    assert O.rel_err(tokens[: p // 4], ref) <= COMPOSITE


def test_decoder_layer_causal_right_padding_mrope(hf_cfg, ours_cfg):
    tc = hf_cfg.text_config
    cfg, spec = ours_cfg
    hf = O.randomize_(M.Qwen2_5_VLDecoderLayer(tc, layer_idx=0).eval(), 7)
    ours = TL.build(lambda: DecoderLayer(cfg.text, rngs=nnx.Rngs(0), **F32))
    TL.load_torch_(ours, hf)
    position_ids, mask = _released_positions(spec)
    b, length = mask.shape
    assert mask.min() == 0 and cfg.text.num_heads != cfg.text.num_kv_heads  # right padding, GQA
    x = _rng(8).standard_normal((b, length, tc.hidden_size)).astype(np.float32)
    allowed = np.tril(np.ones((length, length), bool))[None, None] & (mask[:, None, None, :] > 0)
    additive = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
    cos, sin = _run(M.Qwen2_5_VLRotaryEmbedding(tc), _t(x), torch.as_tensor(np.asarray(position_ids, np.int64)))
    with torch.no_grad():
        ref = hf(_t(x), attention_mask=_t(additive), position_embeddings=(cos, sin))
    ours_cos, ours_sin = _mrope(position_ids, cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section)
    got, cache = _apply(ours, x, ours_cos, ours_sin, mask)
    assert cache is None
    assert O.rel_err(got, ref, mask) <= COMPOSITE


# ---- window reordering --------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid_set", sorted(GRID_SETS))
def test_window_order_matches_hf_permute_and_inverts(hf_cfg, ours_cfg, hf_visual, grid_set):
    vc, spec = hf_cfg.vision_config, ours_cfg[1]
    grids = torch.tensor(GRID_SETS[grid_set])
    window_index, _ = VU.get_vision_window_index(grids, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    ours_index = layout.vision_layout(grids.numpy(), spec)["vision_window_index"]
    np.testing.assert_array_equal(ours_index, window_index.numpy())
    p = int(grids.prod(-1).sum())
    x = _rng(9).standard_normal((p, 3)).astype(np.float32)
    permuted = np.asarray(to_window_order(x, ours_index, 4))
    np.testing.assert_array_equal(permuted, hf_visual.permute_input_for_window_attn(_t(x), window_index, p).numpy())
    units = permuted.reshape(p // 4, -1)
    restored = np.asarray(from_window_order(units, ours_index))
    np.testing.assert_array_equal(restored, units[torch.argsort(window_index).numpy()])  # HF's reverse_indices
    np.testing.assert_array_equal(restored.reshape(p, 3), x)  # exact round trip
