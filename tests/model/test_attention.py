"""``emoqwen_jax.model.attention``: every implementation that runs on CPU (xla, blockwise, splash in Pallas'
interpreter, and cudnn's mask translation) gives the values and the gradients of an independent float64 numpy
reference written from the attention formula, with segments, padding, causality, GQA, a KV-cache offset and
the ViT's bands; the ViT attends within frames of any size; splash lowers ahead of time for TPU; the choice is
validated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emoqwen_jax import layout
from emoqwen_jax.model import ModelConfig
from emoqwen_jax.model import attention as attention_lib
from emoqwen_jax.model.attention import attention, resolve
from emoqwen_jax.model.config import VisionConfig
from emoqwen_jax.model.vision import VisionTransformer, _period

TOL = 1e-5  # max|got - want| <= TOL * max|want| (float32 against float64)


def _reference(q, k, v, qseg, kseg, causal, offset, scale, dout=None):
    """Float64 numpy attention from its definition (the module docstring): softmax(scale · q kᵀ) over the keys
    of the query's segment (and, when ``causal``, at positions <= the query's + ``offset``), times v; a query
    with no visible key gives 0. With ``dout`` (the gradient of the output) also returns (dq, dk, dv), from
    the softmax's derivative: dP = dO vᵀ, dS = P ⊙ (dP − Σ_s dP ⊙ P), dq = scale · dS k, dk = scale · dSᵀ q,
    dv = Pᵀ dO, each KV head summing over its G query heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # query head i reads KV head i // G
    logits = np.einsum("btnh,bsnh->bnts", q, ke) * scale
    mask = np.asarray(qseg)[:, :, None] == np.asarray(kseg)[:, None, :]
    if causal:
        mask &= np.arange(s)[None, None, :] <= (np.arange(t) + offset)[None, :, None]
    mask = mask[:, None]
    logits = np.where(mask, logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    p = np.where(mask, np.exp(logits - np.where(np.isfinite(m), m, 0)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    out = np.einsum("bnts,bsnh->btnh", p, ve)
    if dout is None:
        return out
    do = np.asarray(dout, np.float64)
    dp = np.einsum("btnh,bsnh->bnts", do, ve)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bnts,bsnh->btnh", ds, ke) * scale
    dk = (np.einsum("bnts,btnh->bsnh", ds, q) * scale).reshape(b, s, kh, g, h).sum(3)
    dv = np.einsum("bnts,btnh->bsnh", p, do).reshape(b, s, kh, g, h).sum(3)
    return out, (dq, dk, dv)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def _qkv(b, t, s, n, kh, h, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h))]


def _assert_values_and_gradients(run, q, k, v, qseg, kseg, causal, offset, scale, seed=1):
    """``run(q, k, v)`` and the gradients of Σ run(q, k, v) · w (w random) equal the float64 reference."""
    w = np.random.default_rng(seed).standard_normal(q.shape).astype(np.float32)
    want, want_grads = _reference(q, k, v, qseg, kseg, causal, offset, scale, dout=w)
    assert _rel(jax.jit(run)(q, k, v), want) <= TOL
    grads = jax.jit(jax.grad(lambda *x: jnp.sum(run(*x).astype(jnp.float32) * w), argnums=(0, 1, 2)))(q, k, v)
    for name, got, ref in zip("qkv", grads, want_grads, strict=True):
        assert np.isfinite(np.asarray(got)).all(), name
        assert _rel(got, ref) <= TOL, (name, _rel(got, ref))


# Row 0: two samples then padding (a packed decoder row); row 1: one sample and a long padding tail.
SEGMENTS = np.array([[1] * 9 + [2] * 21 + [0] * 7, [5] * 25 + [0] * 12])
# The same over 300 positions: the xla path's causal query blocks (128, 128, 44) cut through the segments.
LONG_SEGMENTS = np.array([[1] * 100 + [2] * 150 + [0] * 50, [5] * 170 + [0] * 130])


@pytest.mark.parametrize("impl,causal,block,segments", [
    ("xla", True, 0, SEGMENTS), ("xla", False, 0, SEGMENTS), ("blockwise", True, 8, SEGMENTS),
    ("blockwise", False, 16, SEGMENTS), ("blockwise", True, 512, SEGMENTS),
    ("xla", True, 0, LONG_SEGMENTS), ("xla", False, 0, LONG_SEGMENTS), ("blockwise", True, 64, LONG_SEGMENTS)])
def test_values_and_gradients_equal_reference(impl, causal, block, segments):
    t = segments.shape[1]  # 37 positions (no block divides it) or 300 (> CAUSAL_QUERY_BLOCK keys)
    q, k, v = _qkv(2, t, t, 6, 2, 8)  # GQA: 3 query heads per KV head
    seg = jnp.asarray(segments)
    run = lambda q, k, v: attention(q, k, v, scale=0.35, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,  # noqa: E731
                                    implementation=impl, block_size=block)
    _assert_values_and_gradients(run, q, k, v, segments, segments, causal, 0, 0.35)


def test_xla_causal_query_blocks_are_taken_for_long_rows():
    """The long rows above run the xla path's causal query blocks (3 blocks of at most 128 queries), so the
    reference comparison covers them: the lowered program has each block's logits against the keys up to its end
    (float32[B, K, G, queries, keys]), never the full 300 x 300."""
    q, k, v = _qkv(1, 300, 300, 2, 2, 8)
    fn = jax.jit(lambda q, k, v: attention(q, k, v, scale=0.35, causal=True, implementation="xla"))
    text = fn.lower(q, k, v).as_text()
    assert attention_lib.CAUSAL_QUERY_BLOCK == 128
    assert all(f"tensor<1x2x1x{shape}xf32>" in text for shape in ("128x128", "128x256", "44x300"))
    assert "x300x300x" not in text


@pytest.mark.parametrize("impl,heads_first", [("xla", False), ("blockwise", False), ("xla", True),
                                               ("blockwise", True)])
def test_kv_cache_offset(impl, heads_first):
    """T new queries written at slot `offset` of an S-slot cache (left padding 0, unwritten slots hidden):
    values and gradients (the blockwise custom VJP takes the offset too), with the cache as float[B, S, K, H]
    or, ``kv_heads_first``, float[B, K, S, H] (the decoder's cache layout)."""
    q, k, v = _qkv(2, 3, 20, 4, 2, 8, seed=2)
    qseg = np.ones((2, 3), np.int32)
    kseg = np.ones((2, 20), np.int32)
    kseg[1, :4] = 0  # row 1: 4 left-padding slots
    kseg[:, 14:] = 0  # slots after the new tokens are not valid yet
    layout = (lambda x: x.transpose(0, 2, 1, 3)) if heads_first else (lambda x: x)  # noqa: E731
    run = lambda q, k, v: attention(q, layout(k), layout(v), scale=0.3, q_segment_ids=jnp.asarray(qseg),  # noqa: E731
                                    kv_segment_ids=jnp.asarray(kseg), causal=True, q_offset=jnp.int32(11),
                                    implementation=impl, block_size=8, kv_heads_first=heads_first)
    _assert_values_and_gradients(run, q, k, v, qseg, kseg, True, 11, 0.3)


@pytest.mark.parametrize("impl,block", [("xla", 16), ("blockwise", 16), ("blockwise", 8)])
def test_band_paths_equal_reference(impl, block):
    """Segments of at most `band` contiguous positions (the ViT's windows): the 3-block xla path and the
    banded blockwise path give dense attention's values and gradients, padding (-1) included."""
    seg = np.concatenate([np.repeat(np.arange(7), [5, 13, 3, 13, 9, 1, 12]), -np.ones(11, int)])[None]
    q, k, v = _qkv(1, seg.shape[1], seg.shape[1], 3, 3, 8, seed=3)
    run = lambda q, k, v: attention(q, k, v, scale=0.3, q_segment_ids=jnp.asarray(seg),  # noqa: E731
                                    kv_segment_ids=jnp.asarray(seg), implementation=impl, block_size=block, band=13)
    _assert_values_and_gradients(run, q, k, v, seg, seg, False, 0, 0.3)


def test_local_block_equals_reference():
    """Segments of unequal sizes, each whole within an aligned block of 16 (several in one block, padding
    included): the block-diagonal path gives dense attention's values and gradients; a call it cannot serve
    is refused."""
    seg = np.concatenate([np.repeat([0, 1], [5, 11]), np.full(16, 2), np.repeat([3, 4, 5], [3, 9, 4]),
                          np.full(16, -1)])[None]
    q, k, v = _qkv(1, seg.shape[1], seg.shape[1], 4, 2, 8, seed=4)
    run = lambda q, k, v: attention(q, k, v, scale=0.3, q_segment_ids=jnp.asarray(seg),  # noqa: E731
                                    kv_segment_ids=jnp.asarray(seg), implementation="blockwise", local_block=16)
    _assert_values_and_gradients(run, q, k, v, seg, seg, False, 0, 0.3)
    with pytest.raises(ValueError, match="local_block"):
        attention(q, k, v, scale=0.3, causal=True, local_block=16)


# ---- accelerator kernels on CPU ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,segments", [(False, SEGMENTS), (True, LONG_SEGMENTS)])
def test_splash_in_the_pallas_interpreter_equals_reference(causal, segments):
    """The TPU splash kernel, run by Pallas' interpreter on CPU: our wrapper (scaling, GQA grouping, segment
    ids, padding the lengths to the kernel's 128-token tiles) gives the reference's values and gradients."""
    t = segments.shape[1]
    q, k, v = _qkv(2, t, t, 4, 2, 8, seed=5)
    seg = jnp.asarray(segments, jnp.int32)
    run = lambda q, k, v: attention_lib._splash(q, k, v, seg, seg, causal, 0.35, interpret=True)  # noqa: E731
    _assert_values_and_gradients(run, q, k, v, segments, segments, causal, 0, 0.35)


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_mask_translation_equals_reference(causal, monkeypatch):
    """cuDNN has no CPU kernel; what our wrapper adds (segment ids -> a [B, 1, T, S] mask, causality, GQA
    layout) is run through ``jax.nn.dot_product_attention``'s XLA implementation with the same arguments."""
    dot_product_attention = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation, **kw: dot_product_attention(*a, implementation="xla", **kw))
    q, k, v = _qkv(2, 37, 37, 6, 2, 8, seed=6)
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    run = lambda q, k, v: attention_lib._cudnn(q, k, v, seg, seg, causal, 0.35)  # noqa: E731
    _assert_values_and_gradients(run, q, k, v, SEGMENTS, SEGMENTS, causal, 0, 0.35)


def _decoder_shapes(t):
    """Abstract bfloat16 decoder attention inputs of Qwen2.5-7B's heads (28 query, 4 KV, head dim 128)."""
    q = jax.ShapeDtypeStruct((2, t, 28, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, t, 4, 128), jnp.bfloat16)
    return q, kv, kv, jax.ShapeDtypeStruct((2, t), jnp.int32)


@pytest.mark.parametrize("length", [1024, 200])
def test_splash_lowers_ahead_of_time_for_tpu(length):
    """Forward and backward lower to TPU kernels on a CPU-only machine (no TPU needed), also for a length
    that is not a multiple of the kernel's tiles."""

    def grads(q, k, v, seg):
        loss = lambda q, k, v: attention_lib._splash(q, k, v, seg, seg, True, 0.1).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(grads).trace(*_decoder_shapes(length)).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 3  # forward, dq, dk/dv kernels


def test_cudnn_lowers_ahead_of_time_for_cuda_where_jax_has_its_cuda_plugin():
    """JAX builds cuDNN attention only with its CUDA plugin installed: it reads the cuDNN library's version
    while tracing. Without the plugin (a CPU-only jax) it stops with "cuDNN is not detected." before any
    lowering, so the check cannot run there; with the plugin the call lowers to cuDNN's fused attention."""
    fn = jax.jit(lambda q, k, v, seg: attention_lib._cudnn(q, k, v, seg, seg, True, 0.1))
    try:
        traced = fn.trace(*_decoder_shapes(1024))
    except RuntimeError as err:
        assert str(err) == "cuDNN is not detected." and jax.default_backend() == "cpu", err
        pytest.skip("a CPU-only jax cannot trace cuDNN attention: RuntimeError('cuDNN is not detected.')")
    assert "__cudnn$fmha" in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_blockwise_bfloat16_runs_and_is_close():
    q, k, v = _qkv(2, 37, 37, 4, 2, 16, seed=4)
    seg = jnp.asarray(SEGMENTS)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = attention(*bf, scale=0.25, q_segment_ids=seg, kv_segment_ids=seg, causal=True, implementation="blockwise",
                    block_size=16)
    assert out.dtype == jnp.bfloat16
    ref = _reference(*bf, SEGMENTS, SEGMENTS, True, 0, 0.25)
    assert _rel(out.astype(jnp.float32), ref) <= 2e-2  # bfloat16 inputs and probabilities


def test_choice_is_validated_and_auto_picks_by_length():
    with pytest.raises(ValueError, match="model.attention='flash'"):
        ModelConfig(attention="flash")
    with pytest.raises(ValueError, match="model.remat"):
        ModelConfig(remat="everything")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a TPU"):
            resolve("splash", 128)
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            resolve("cudnn", 128)
        assert resolve("auto", 128) == "xla"
        assert resolve("auto", 8192) == "blockwise"


# ---- the ViT: frames of any size --------------------------------------------------------------------------------
def _vit(attention_impl, frame_block=0, scan=False):
    cfg = VisionConfig(depth=4, hidden_size=24, num_heads=2, intermediate_size=40, window_size=56,
                       fullatt_block_indexes=(1, 3), frame_block=frame_block)
    return VisionTransformer(cfg, rngs=nnx.Rngs(0), attention=attention_impl, attention_block=32,
                             scan_layers=scan), cfg


def _vit_inputs(cfg, grids, pad_to):
    lay = layout.vision_layout(np.array(grids), layout.LayoutSpec(window_size=cfg.window_size), pad_patches_to=pad_to)
    pixels = np.random.default_rng(1).standard_normal((pad_to, cfg.patch_dim)).astype(np.float32)
    return pixels, dict(pos_hw=lay["vision_pos_hw"], window_index=lay["vision_window_index"],
                        frame_segment=lay["vision_frame_segment"], window_segment=lay["vision_window_segment"]), lay


@pytest.mark.parametrize("impl,frame_block,scan", [("blockwise", 0, False), ("blockwise", 16, True), ("xla", 0, True)])
def test_vit_frames_larger_than_a_block_equal_dense(impl, frame_block, scan):
    """A 12x20-patch frame (240 patches) is many blocks long: still exact, no NaN, with or without scan."""
    grids = [(1, 12, 20), (2, 4, 8), (1, 2, 2)]
    dense, cfg = _vit("xla")
    dense.blocks[1].attn.band = dense.blocks[3].attn.band = None  # reference: plain dense frame masks
    for blk in (0, 2):
        dense.blocks[blk].attn.band = None  # and dense window masks
    other, _ = _vit(impl, frame_block, scan)
    nnx.update(other, nnx.state(dense))
    pixels, kw, lay = _vit_inputs(cfg, grids, 336)
    real = lay["vision_frame_segment"] >= 0
    ref = np.asarray(jax.jit(lambda p: dense(p, **kw))(pixels))[real]
    got = np.asarray(jax.jit(lambda p: other(p, **kw))(pixels))
    assert np.isfinite(got).all()
    assert _rel(got[real], ref) <= TOL


def test_vit_local_blocks_equal_the_masked_paths():
    """Images and a video of unequal sizes whose windows (16 patches) and frames lie whole in aligned blocks of
    16 and 64 patches: ``layout.local_blocks`` finds those sizes, and the ViT attending block by block equals
    the masked whole-axis paths (float32, rel 1e-5); a layout whose frames straddle every candidate gets none."""
    grids = [(1, 8, 8), (1, 4, 8), (2, 4, 4), (1, 4, 4), (1, 4, 12)]  # 64 | 32 16 16 | 16 48 patches
    model, cfg = _vit("blockwise")
    pixels, kw, lay = _vit_inputs(cfg, grids, 192)
    spec = layout.LayoutSpec(window_size=cfg.window_size)
    blocks = layout.local_blocks(lay["vision_frame_segment"], lay["vision_window_segment"], spec)
    assert blocks == (16, 64)
    masked = np.asarray(jax.jit(lambda p: model(p, **kw))(pixels))
    local = np.asarray(jax.jit(lambda p: model(p, **kw, local_blocks=blocks))(pixels))
    assert _rel(local, masked) <= TOL
    _, _, straddling = _vit_inputs(cfg, [(1, 12, 20), (2, 4, 8), (1, 2, 2)], 336)
    assert layout.local_blocks(straddling["vision_frame_segment"], straddling["vision_window_segment"],
                               spec) == (0, 0)


def test_vit_period_groups_window_and_full_layers():
    assert _period(32, {7, 15, 23, 31}) == 8
    assert _period(8, {3, 7}) == 4
    assert _period(2, {1}) == 2
    assert _period(5, {1}) == 5  # no repeating pattern: one group (the loop)


def test_auto_window_layers_shard_the_patch_axis_without_gathering_it():
    """On a patch axis split over 8 devices, 'auto' gives the window layers (a band) the banded blocks: the
    compiled gradient has halo exchanges but no all-gather, and equals one device's result. (Blockwise's scan
    over query blocks all-gathers q, k and v and repeats every block on every device.)"""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from emoqwen_jax.model.sharding import axis_rules

    t, n, h, band = 8 * 64, 2, 8, 16
    q, k, v = _qkv(1, t, t, n, n, h, seed=3)
    seg = jnp.asarray(np.repeat(np.arange(t // 12 + 1), 12)[:t][None], jnp.int32)  # windows of 12 (< band)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

    def loss(q, k, v):
        out = attention(q, k, v, scale=h**-0.5, q_segment_ids=seg, kv_segment_ids=seg, implementation="auto",
                        band=band)
        return (out * out).sum()

    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    split = NamedSharding(mesh, PartitionSpec(None, "data"))
    with axis_rules(mesh, [("units", "data")]):
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        args = [jax.device_put(x, split) for x in (q, k, v)]
        hlo = fn.lower(*args).compile().as_text()
        got = fn(*args)
    assert "all-gather" not in hlo and "collective-permute" in hlo
    for g, r in zip(got, want, strict=True):
        assert _rel(g, r) <= 1e-5
