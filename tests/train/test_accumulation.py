"""Gradient accumulation weighs micro-batches by their labelled tokens (transformers' Trainer with
``num_items_in_batch``): the window's gradient is the gradient of the whole batch's token-mean loss, checked
against one large batch; a non-finite micro-step is left out of its window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_files import optimizer_config
from flax import nnx
from tiny_model import tiny_model

from emoqwen_jax.tokens import IGNORE
from emoqwen_jax.train.loss import loss_fn
from emoqwen_jax.train.optim import AdamWState, make_optimizer, updates_applied
from emoqwen_jax.train.step import init_state, make_train_step

pytestmark = pytest.mark.slow  # compiles several train steps

B1 = 0.9
# No clipping, no decay: Adam's first moment after an update from zero is exactly (1 - b1) x the gradient.
OPT = optimizer_config(learning_rate=1e-2, warmup_fraction=0.0, weight_decay=0.0, b1=B1, b2=0.95, clip_norm=1e9,
                       grad_accum=2)
GRID = (1, 4, 4)  # one image per row pair: 16 patches, 4 merged tokens


@pytest.fixture(scope="module")
def setup():
    return tiny_model((r"^(compressor|language_model|visual)/",))


def _rows(mc, rng):
    """Four rows of one length (rows 1 and 3 right-padded); rows 0-1 hold 31 labelled targets, rows 2-3 hold 5."""
    image = [mc.vision_start_token_id] + [mc.image_token_id] * (int(np.prod(GRID)) // 4) + [mc.vision_end_token_id]
    text = lambda n: list(rng.integers(10, 900, n))  # noqa: E731
    rows = [text(3) + image + text(21), text(30), text(3) + image + text(21), text(30)]
    labelled = [range(9, 27), range(15, 28), range(24, 27), range(26, 28)]  # answer spans
    ids = np.array(rows, np.int32)
    labels = np.full_like(ids, IGNORE)
    for r, span in enumerate(labelled):
        labels[r, list(span)] = ids[r, list(span)]
    mask = np.ones_like(ids)
    mask[1, 28:] = mask[3, 28:] = 0  # right padding
    labels[mask == 0] = IGNORE
    return ids, mask, labels


def _batch(model, ids, mask, labels, rows, pixels):
    """``rows`` of the batch as model inputs; ``pixels[r]`` float[16, 1176] is row r's image."""
    images = [r for r in rows if r in pixels]
    inputs = model.prepare_inputs(ids[rows], mask[rows], np.concatenate([pixels[r] for r in images]),
                                  np.array([GRID] * len(images)), labels=labels[rows])
    return jax.tree.map(jnp.asarray, inputs)


@pytest.fixture(scope="module")
def batches(setup):
    model = setup[0]
    rng = np.random.default_rng(0)
    ids, mask, labels = _rows(model.config, rng)
    pixels = {r: rng.standard_normal((int(np.prod(GRID)), 1176)).astype(np.float32) for r in (0, 2)}
    full = _batch(model, ids, mask, labels, [0, 1, 2, 3], pixels)
    many = _batch(model, ids, mask, labels, [0, 1], pixels)
    few = _batch(model, ids, mask, labels, [2, 3], pixels)
    bad = _batch(model, ids, mask, labels, [2, 3], {2: np.full_like(pixels[2], np.nan)})  # NaN image: non-finite
    return full, many, few, bad


def _grad(graphdef, params, batch):
    """The gradient of ``loss_fn`` (the batch's token-mean loss) and its labelled-token count."""
    def loss(p):
        return loss_fn(nnx.merge(graphdef, p), batch)

    (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return grads, float(metrics["tokens"])


def _first_moment(state):
    """The trainable leaves' Adam first moments, as a flat list (the AdamW state holds one tree)."""
    found = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, AdamWState))
             if isinstance(s, AdamWState)]
    return [np.asarray(x) for x in jax.tree.leaves(found[0].mu)]


def _trainable_leaves(tree, trainable):
    return [np.asarray(g) for g, lab in zip(jax.tree.leaves(tree), jax.tree.leaves(trainable.labels), strict=True)
            if lab == "trainable"]


def _assert_close(got, want, tol=1e-5):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.abs(a - b).max() <= tol * np.abs(b).max(), (i, np.abs(a - b).max(), np.abs(b).max())


def test_accumulated_gradient_is_the_whole_batch_token_mean_gradient(setup, batches):
    _, graphdef, params, trainable = setup
    full, many, few, _ = batches
    g_full, n_full = _grad(graphdef, params, full)
    g_many, n_many = _grad(graphdef, params, many)
    g_few, n_few = _grad(graphdef, params, few)
    assert (n_many, n_few, n_full) == (31.0, 5.0, 36.0)  # unequal micro-batches
    want = _trainable_leaves(g_full, trainable)
    # The test can tell: the plain mean of the micro-batch gradients (what a per-micro-batch mean gives) is off.
    naive = [(a + b) / 2 for a, b in zip(_trainable_leaves(g_many, trainable), _trainable_leaves(g_few, trainable),
                                         strict=True)]
    assert max(np.abs(a - b).max() / np.abs(b).max()
               for a, b in zip(naive, want, strict=True) if np.abs(b).max() > 0) > 0.1

    tx, schedule = make_optimizer(OPT, 10, trainable)
    step = jax.jit(make_train_step(graphdef, tx, trainable, schedule, grad_accum=2))
    state = init_state(params, tx, 0)
    state, m1 = step(state, many)
    assert int(updates_applied(state.opt_state)) == 0 and float(m1["tokens"]) == 31.0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the first micro-step only accumulates
    state, _ = step(state, few)
    assert int(updates_applied(state.opt_state)) == 1
    _assert_close([m / (1 - B1) for m in _first_moment(state)], want)


def test_a_nonfinite_micro_step_is_left_out_and_an_all_bad_window_applies_nothing(setup, batches):
    """Window [many, bad]: the update is the token mean over ``many`` alone (the bad micro-batch adds neither
    gradient nor tokens) and still lands at the window's second micro-step. Window [bad, bad]: no update, the
    optimiser state as it was, the next window starts afresh."""
    _, graphdef, params, trainable = setup
    _, many, _, bad = batches
    g_many, _ = _grad(graphdef, params, many)
    tx, schedule = make_optimizer(OPT, 10, trainable)
    step = jax.jit(make_train_step(graphdef, tx, trainable, schedule, grad_accum=2))
    state = init_state(params, tx, 0)
    state, _ = step(state, many)
    state, m = step(state, bad)
    assert not bool(m["finite"]) and int(updates_applied(state.opt_state)) == 1
    _assert_close([x / (1 - B1) for x in _first_moment(state)], _trainable_leaves(g_many, trainable))
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(_trainable_leaves(state.params, trainable), _trainable_leaves(params, trainable),
                             strict=True)]
    assert max(moved) > 0  # applied on the non-finite micro-step

    before = state
    for _ in range(2):
        state, m = step(state, bad)
        assert not bool(m["finite"])
    assert int(updates_applied(state.opt_state)) == 1 and int(state.nonfinite) == 3 and int(state.step) == 4
    window = state.opt_state.inner_states["trainable"].inner_state
    assert int(window.mini_step) == 0 and float(window.tokens) == 0.0  # reset: the next window starts afresh
    for a, b in zip(jax.tree.leaves((state.params, _first_moment(state))),
                    jax.tree.leaves((before.params, _first_moment(before))), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
