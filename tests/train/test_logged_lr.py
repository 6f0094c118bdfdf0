"""The logged ``lr`` is the learning rate the update used, measured from the parameters themselves: with b1 = b2 = 0,
no decay and no clipping, AdamW moves every entry by lr * g / (|g| + eps), so the largest move of a leaf is the
applied rate. Through a warmup, a skipped (non-finite) step and gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_files import optimizer_config
from tiny_model import tiny_model

from emoqwen_jax.train.optim import make_optimizer, updates_applied
from emoqwen_jax.train.step import init_state, make_train_step

HEAD = r"^language_model/lm_head/"
SIGN_ADAM = optimizer_config(b1=0.0, b2=0.0, eps=1e-12, weight_decay=0.0, clip_norm=1e9)


@pytest.fixture(scope="module")
def tiny():
    model, graphdef, params, trainable = tiny_model((HEAD,))
    ids = np.random.default_rng(0).integers(10, 900, (2, 12)).astype(np.int32)
    batch = jax.tree.map(jnp.asarray, model.prepare_inputs(ids, labels=ids))
    return graphdef, params, trainable, batch


def _applied_lr(before, after) -> float:
    head = lambda s: np.asarray(s.params["language_model"]["lm_head"]["kernel"], np.float64)  # noqa: E731
    return float(np.abs(head(after) - head(before)).max())


def _poisoned(state, on: bool):
    """The state with the frozen final norm's scale NaN (on: a non-finite loss for that one step) or ones."""
    params = jax.tree.map(lambda x: x, state.params)
    weight = params["language_model"]["norm"]["weight"]
    params["language_model"]["norm"]["weight"] = jnp.full_like(weight, jnp.nan if on else 1.0)
    return type(state)(params=params, opt_state=state.opt_state, step=state.step, nonfinite=state.nonfinite,
                       rng=state.rng)


def test_logged_lr_is_the_applied_one_through_warmup_and_a_skipped_step(tiny):
    graphdef, params, trainable, batch = tiny
    opt = dict(SIGN_ADAM, learning_rate=0.05, warmup_fraction=0.5)  # 4 warmup steps of 8: 0, 0.0125, 0.025, ...
    tx, schedule = make_optimizer(opt, 8, trainable)
    step = jax.jit(make_train_step(graphdef, tx, trainable, schedule))
    state = init_state(params, tx, 0)
    bad_at = 2
    logged, applied, counts = [], [], []
    for i in range(6):
        state = _poisoned(state, i == bad_at)
        counts.append(int(updates_applied(state.opt_state)))
        new, metrics = step(state, batch)
        assert bool(metrics["finite"]) == (i != bad_at)
        logged.append(float(metrics["lr"]))
        applied.append(_applied_lr(state, new))
        state = new
    assert counts == [0, 1, 2, 2, 3, 4]  # the skipped step applied nothing
    want = [float(schedule(c)) for c in counts]
    np.testing.assert_allclose(logged, want, rtol=1e-6)
    assert len(set(want)) == 5 and want[0] == 0.0  # a warmup: every applied step has its own rate
    for i, (lr, moved) in enumerate(zip(logged, applied, strict=True)):
        if i == bad_at:
            assert moved == 0.0
        else:
            assert abs(moved - lr) <= 1e-5 * max(want), (i, moved, lr)


def test_logged_lr_with_accumulation_is_the_rate_of_the_window_update(tiny):
    """Both micro-steps of a window log the rate its update uses; it is applied at the window's last one."""
    graphdef, params, trainable, batch = tiny
    opt = dict(SIGN_ADAM, learning_rate=0.05, warmup_fraction=0.0, grad_accum=2)  # cosine from the peak
    tx, schedule = make_optimizer(opt, 3, trainable)
    step = jax.jit(make_train_step(graphdef, tx, trainable, schedule, grad_accum=2))
    state = init_state(params, tx, 0)
    logged, applied = [], []
    for _ in range(4):
        new, metrics = step(state, batch)
        logged.append(float(metrics["lr"]))
        applied.append(_applied_lr(state, new))
        state = new
    s0, s1 = float(schedule(0)), float(schedule(1))
    assert s0 > s1 > 0
    np.testing.assert_allclose(logged, [s0, s0, s1, s1], rtol=1e-6)
    assert applied[0] == applied[2] == 0.0
    assert abs(applied[1] - s0) <= 1e-5 * s0 and abs(applied[3] - s1) <= 1e-5 * s0
