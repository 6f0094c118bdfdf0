"""Sampling filters, input checks and seeded sampling on a tiny random model (no HF needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emoqwen_jax.infer import SamplingConfig, check_left_padded, generate, left_pad, sample_logits


def draws(logits, n=4000, **kw):
    logits = jnp.tile(jnp.log(jnp.asarray(logits, jnp.float32))[None], (n, 1))
    kw = {"temperature": jnp.float32(1.0), "top_p": jnp.float32(1.0), "top_k": 0, **kw}
    return np.asarray(sample_logits(logits, jax.random.key(0), kw["temperature"], kw["top_p"], kw["top_k"]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    got = draws([0.5, 0.3, 0.2], top_p=jnp.float32(0.7))  # mass before token 2 is 0.8 >= 0.7: dropped
    assert set(got.tolist()) == {0, 1}
    assert abs((got == 0).mean() - 0.5 / 0.8) < 0.03


def test_top_p_tiny_keeps_the_best_token_and_top_k_cuts():
    assert set(draws([0.2, 0.5, 0.3], top_p=jnp.float32(1e-6)).tolist()) == {1}
    assert set(draws([0.2, 0.5, 0.3], top_k=2).tolist()) == {1, 2}


def test_temperature_sharpens():
    hot = draws([0.6, 0.4], temperature=jnp.float32(2.0))
    cold = draws([0.6, 0.4], temperature=jnp.float32(0.25))
    assert (cold == 0).mean() > 0.8 > 0.6 > (hot == 0).mean() > 0.5


def test_sampling_config_and_padding_errors():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="not left-padded"):
        check_left_padded(np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match="shorter"):
        left_pad([[1, 2, 3]], 0, length=2)
    ids, mask = left_pad([[4, 5], [6]], 9, length=3)
    assert ids.tolist() == [[9, 4, 5], [9, 9, 6]] and mask.tolist() == [[0, 1, 1], [0, 0, 1]]


def test_seeded_sampling_is_reproducible_and_left_padding_is_invisible(tiny):
    prompt = [11, 12, 13, 14, 15]
    ids, mask = left_pad([prompt], 0)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.5, top_p=0.9)
    a = generate(tiny, ids, mask, sampling=cfg, rng=7).tokens
    assert (a == generate(tiny, ids, mask, sampling=cfg, rng=7).tokens).all()
    assert not (a == generate(tiny, ids, mask, sampling=cfg, rng=8).tokens).all()
    # Greedy: a row's output does not depend on how much left padding or which batch-mates it has.
    greedy = SamplingConfig(max_new_tokens=6)
    alone = generate(tiny, ids, mask, sampling=greedy).tokens[0]
    ids2, mask2 = left_pad([prompt, [3, 4, 5, 6, 7, 8, 9, 10]], 0, length=12)
    np.testing.assert_array_equal(generate(tiny, ids2, mask2, sampling=greedy).tokens[0], alone)
