"""``bench/train_step.py --packed`` times the same work as its padded row: the two conversations packed into one
row (segment ids, positions restarting) give the padded batch's loss and gradients (float32, 1e-5). And
``--rounds``: each round's ratio pairs the round's own torch and JAX medians."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "configs"))

import emotion_qwen  # noqa: E402
import train_step  # noqa: E402

from emoqwen_jax.model import EmotionQwen, ModelConfig  # noqa: E402
from emoqwen_jax.train.loss import loss_fn  # noqa: E402

pytestmark = pytest.mark.slow  # compiles the benchmark's train steps


def test_packed_bench_batch_equals_the_padded_one():
    mcfg = ModelConfig.from_run_config(emotion_qwen.get_config("tiny"))
    padded, packed = (train_step.make_batch(mcfg, packed=p)["jax"] for p in (False, True))
    assert padded.text.input_ids.shape[0] == 2 and packed.text.input_ids.shape[0] == 1
    assert int(packed.text.attention_mask.sum()) == int(padded.text.attention_mask.sum())  # no padding left
    model = EmotionQwen(mcfg, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model, nnx.Param)

    @jax.jit
    def value_and_grad(params, batch):
        return jax.value_and_grad(lambda p: loss_fn(nnx.merge(graph, p), batch)[0])(params)

    (loss_a, grads_a), (loss_b, grads_b) = value_and_grad(params, padded), value_and_grad(params, packed)
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        scale = max(float(np.abs(a).max()), 1e-12)
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale <= 1e-5


def test_round_ratio_pairs_each_round_with_its_own_torch_median():
    ours = {"jax E=1": [100.0, 90.0, 110.0], "jax E=2": [130.0], "jax E=1 packed": [80.0, 70.0, 75.0]}
    ratios = train_step.round_ratio(ours, {"torch": [300.0, 150.0, 200.0]}, first_experts=1)
    assert ratios == {"ratio": 2.0, "ratio_packed": 200.0 / 75.0}  # medians: torch 200, ours 100 and 75
    # without an E = 1 row the first expert count gives the ratio; no packed row, no packed ratio
    assert train_step.round_ratio({"jax E=2": [50.0]}, {"torch": [100.0]}, first_experts=2) == {"ratio": 2.0}
