"""Self-consistency of the cached path: the prefill equals the uncached forward, and every decoded token is
the argmax of an uncached forward over prompt + the tokens before it (positions by the released rule over
the whole sequence, so the M-RoPE delta carried into decoding is checked too)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_rel

from emoqwen_jax.infer import SamplingConfig, generate, left_pad, prefill


def video_prompt(model, grid, text_before, text_after):
    c = model.config
    t, h, w = grid
    return text_before + [c.vision_start_token_id] + [c.video_token_id] * (t * h * w // 4) + \
        [c.vision_end_token_id] + text_after


def test_prefill_and_decode_match_uncached_forward(tiny):
    grid = (3, 4, 6)  # temporal span 2 * 1.5 * 2 = 6 > spatial: the delta differs from text-only rows
    rows = [video_prompt(tiny, grid, [11, 12], [13, 14, 15]), [21, 22, 23, 24]]
    vision = dict(pixel_values_videos=np.random.default_rng(0).standard_normal((72, 1176)).astype(np.float32),
                  video_grid_thw=np.array([grid]), second_per_grid_ts=np.array([1.5], np.float32))
    ids, mask = left_pad(rows, 0)
    inputs = tiny.prepare_inputs(ids, mask, **vision)
    assert len(set(inputs.text.rope_deltas.tolist())) == 2
    logits, _, _ = prefill(tiny, inputs.replace(rope_deltas=None), cache_len=ids.shape[1] + 4)
    full = np.asarray(tiny(ids, attention_mask=mask, **vision).logits)
    assert_close_rel(logits, full[:, -1], 1e-5, what="prefill vs uncached forward")

    n = 5
    out = generate(tiny, ids, mask, sampling=SamplingConfig(max_new_tokens=n), **vision)
    for b, row in enumerate(rows):
        seq = row + out.tokens[b].tolist()
        one = tiny(np.asarray([seq]), **(vision if b == 0 else {})).logits[0]
        step_logits = np.asarray(one)[len(row) - 1:len(seq) - 1]
        top2 = np.sort(step_logits, -1)[:, -2:]
        # no near-tie: the top-2 gap is 10x the cached-vs-uncached bound above, so equal argmax is meaningful
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-4 * np.abs(step_logits).max()
        want = step_logits.argmax(-1)
        np.testing.assert_array_equal(out.tokens[b], want)


@pytest.mark.parametrize("decode_steps", [1, 3])
def test_decode_step_reads_the_cache_in_place(tiny, decode_steps):
    """The engine's decode step writes one column per row and reads every layer's cache as it lies: the compiled
    program has no transpose or copy of a cache-sized array (the cache layout is the attention's), and the
    cache comes back in its donated buffers; also when several steps run in one call (the cache is the loop's
    carry)."""
    from emoqwen_jax.infer import engine_steps as steps

    cfg = tiny.config.text
    b, s = 3, 48  # sizes no weight has, so a cache-shaped result is the cache
    graphdef, state = nnx.split(tiny)
    cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), steps.cache_spec(tiny, b, s))
    step = jax.jit(steps.decode_step, static_argnums=(0,), static_argnames=("any_sampled", "steps"),
                   donate_argnums=(2,))
    zeros = np.zeros(b, np.int32)
    hlo = step.lower(graphdef, state, cache, zeros, zeros, zeros, steps.RowSampling.host(b, cfg.vocab_size),
                     any_sampled=False, steps=decode_steps).compile().as_text()
    cache_dims = sorted((b, cfg.num_kv_heads, s, cfg.head_dim))
    results = re.findall(r"%(\S+) = f32\[([\d,]+)\]\S* (\w+)\(", hlo)  # (name, dims, op) of every instruction
    cache_sized = [(name, op) for name, dims, op in results if sorted(map(int, dims.split(","))) == cache_dims]
    assert cache_sized, "the cache's shape should appear (its column writes)"
    relaid = [(name, op) for name, op in cache_sized if any(w in name or w == op for w in ("transpose", "copy"))]
    assert not relaid, relaid
    assert "input_output_alias" in hlo
