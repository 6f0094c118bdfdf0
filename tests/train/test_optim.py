"""``optim.adamw`` against optax's ``chain(clip_by_global_norm, adamw)``, its non-finite skip, the memory layout
it exists for (no copies of the donated moments), and the weight-decay mask (by path) on every leaf of the tiny
model, checked against optax's ``adamw(mask=...)``."""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerance import assert_close_rel

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model.lora import LoRAConfig, apply_lora
from emoqwen_jax.train.optim import (
    accumulate_tokens,
    adamw,
    decay_mask,
    decays,
    make_optimizer,
    path_str,
    select_trainable,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402
from config_files import optimizer_config

LR = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=8)
HYPER = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
MASK = {"w": True, "b": False, "experts": False}  # a 3-D leaf left undecayed: the mask, not the rank, decides


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {"w": jax.random.normal(keys[0], (4, 6)), "b": jax.random.normal(keys[1], (6,)),
            "experts": jax.random.normal(keys[2], (3, 5, 2))}


def _grads(step: int, scale: float):
    keys = jax.random.split(jax.random.key(100 + step), 3)
    shapes = {"w": (4, 6), "b": (6,), "experts": (3, 5, 2)}
    return {k: scale * jax.random.normal(kk, s) for kk, (k, s) in zip(keys, shapes.items(), strict=True)}


@pytest.mark.parametrize("pass_norm", [False, True])
def test_adamw_equals_optax_clip_and_adamw_with_clipping_on_and_off(pass_norm):
    ours = adamw(LR, clip_norm=1.0, mask=MASK, **HYPER)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, mask=MASK, **HYPER))
    p_ours = p_ref = _params()
    s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
    for step, scale in enumerate([0.01, 3.0, 0.2, 10.0, 0.05]):  # norms below and above clip_norm
        g = _grads(step, scale)
        norm = optax.global_norm(g) if pass_norm else None
        u, s_ours = ours.update(g, s_ours, p_ours, grad_norm=norm)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref), strict=True):
            assert_close_rel(a, b, 1e-6, what=f"parameters after step {step}")
    assert_close_rel(s_ours.mu["w"], s_ref[1][0].mu["w"], 1e-6, what="first moment")
    assert_close_rel(s_ours.nu["b"], s_ref[1][0].nu["b"], 1e-6, what="second moment")
    assert int(s_ours.count) == 5


def test_a_nonfinite_step_leaves_the_state_and_gives_zero_updates():
    tx = adamw(LR, clip_norm=1.0, **HYPER)
    p = _params()
    state = tx.update(_grads(0, 0.5), tx.init(p), p, finite=jnp.bool_(True))[1]  # moments no longer zero
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(1, 0.5))
    u, new = jax.jit(lambda g, s: tx.update(g, s, p, finite=jnp.bool_(False)))(bad, state)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(u))


def test_a_nonfinite_micro_step_is_left_out_of_its_window():
    """With accumulation the bad micro-batch adds neither gradient nor tokens, the window still advances, and
    the inner optimiser is untouched."""
    tx = accumulate_tokens(adamw(LR, clip_norm=1.0, **HYPER), 3)
    p = _params()
    state = tx.update(_grads(0, 0.5), tx.init(p), p, finite=jnp.bool_(True), weight=4.0)[1]
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(1, 0.5))
    u, new = jax.jit(lambda g, s: tx.update(g, s, p, finite=jnp.bool_(False), weight=9.0))(bad, state)
    assert int(new.mini_step) == 2 and float(new.tokens) == 4.0
    for a, b in zip(jax.tree.leaves((new.grads, new.inner)), jax.tree.leaves((state.grads, state.inner)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(u))


def test_donated_update_does_not_copy_the_moments():
    """The reason ``adamw`` exists: optax's chain followed by the step's ``where(finite, new, old)`` makes XLA
    copy each donated moment before updating it in place (2x the memory traffic of the update)."""
    tx = adamw(LR, clip_norm=1.0, **HYPER)
    shape = (8, 64, 32)
    p = {"w": jnp.ones(shape)}

    def step(p, s, g):
        norm = optax.global_norm(g)
        finite = jnp.isfinite(norm)
        u, s = tx.update(g, s, p, finite=finite, grad_norm=norm)
        return jax.tree.map(lambda a, b: jnp.where(finite, a + b, a), p, u), s

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile().as_text()
    copies = [line for line in hlo.splitlines() if " copy(" in line and "f32[8,64,32]" in line]
    assert not copies, copies
    assert "f32[8,64,32]" in hlo



def test_accumulate_tokens_is_the_token_weighted_mean_in_float64():
    """Windows of 3 micro-steps with weights 5, 1, 0 / 2, (non-finite), 7 through an identity inner transform:
    each window's update is sum(n_i g_i) / sum(n_i) over its finite micro-steps (numpy float64), zero
    elsewhere; a window of weight 0 passes nothing on."""
    def identity(g, applied, params=None, *, finite=True, **unused):  # counts the updates it was told to apply
        return g, applied + jnp.asarray(finite, jnp.int32)

    tx = accumulate_tokens(optax.GradientTransformationExtraArgs(lambda p: jnp.zeros([], jnp.int32), identity), 3)
    p = _params()
    update = jax.jit(lambda g, s, finite, w: tx.update(g, s, p, finite=finite, weight=w))
    state = tx.init(p)
    steps = [(5.0, True), (1.0, True), (0.0, True), (2.0, True), (3.0, False), (7.0, True), (0.0, True),
             (4.0, False), (0.0, True)]
    grads = [_grads(i, 1.0 + i) for i in range(len(steps))]
    for i, ((w, finite), g) in enumerate(zip(steps, grads, strict=True)):
        if not finite:
            g = jax.tree.map(lambda x: x.at[0].set(jnp.inf), g)
        u, state = update(g, state, jnp.bool_(finite), jnp.float32(w))
        window = range(i - 2, i + 1)
        ok = [j for j in window if steps[j][1] and steps[j][0] > 0]
        for key in ("w", "b", "experts"):
            got = np.asarray(u[key], np.float64)
            if i % 3 != 2 or not ok:
                assert not got.any(), (i, key)
                continue
            want = sum(steps[j][0] * np.asarray(grads[j][key], np.float64) for j in ok) / sum(steps[j][0] for j in ok)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert int(state.mini_step) == 0 and float(state.tokens) == 0.0
    assert int(state.inner) == 2  # the third window (weights 0, non-finite, 0) applied nothing

# ---- weight decay by path ------------------------------------------------------------------------------------
MODES = {"paper": {}, "token": dict(routing="token", num_experts=4, expert_names=(), top_k=2), "audio": {}}


def _tiny_params(mode: str, lora: bool = False) -> tuple[dict, ModelConfig]:
    """The tiny model's parameter tree (shapes only) in ``mode``, optionally with LoRA adapters."""
    config = emotion_qwen.get_config("tiny")
    config.model.compressor.update(**MODES[mode])
    if mode == "audio":
        config.model.audio.update(enabled=True, gate_audio=True)
    mc = ModelConfig.from_run_config(config)

    def build():
        model = EmotionQwen(mc, rngs=nnx.Rngs(0))
        if lora:
            apply_lora(model, LoRAConfig(rank=3, alpha=3.0, dropout=0.0), rngs=nnx.Rngs(1))
        return model

    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(build), nnx.Param)), mc


def _random_like(tree, seed: int, scale: float) -> dict:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves, strict=True)])


def _expected(path: str) -> bool:
    """The rule, spelled out from the module names: a parameter named *bias, or the scale of a norm (a module
    named *norm*, or the compressor's ln_q), is never decayed; every other parameter is a weight matrix, an
    embedding table or a LoRA factor, and is."""
    *modules, name = path.split("/")
    if name.endswith("bias"):
        return False
    return not (name.startswith("ln_") or any("norm" in m for m in modules[-1:]))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_decay_mask_follows_the_path_on_every_leaf_of_the_tiny_model(mode):
    params, mc = _tiny_params(mode, lora=mode == "paper")
    mask = decay_mask(params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    flags = jax.tree.leaves(mask)
    assert len(flags) == len(leaves) and all(isinstance(f, bool) for f in flags)
    seen = {True: 0, False: 0}
    for (path, leaf), flag in zip(leaves, flags, strict=True):
        key = path_str(path)
        assert flag == _expected(key), key
        seen[flag] += 1
        if leaf.ndim == 1:
            assert not flag, key  # every vector of this model is a bias or a norm scale
    # The leaves the rank rule got wrong: the stacked experts' biases and norm scales ([E, d]).
    experts = params["compressor"]["experts"]
    for name in ("mlp_0_bias", "mlp_2_bias", "ln_q_weight"):
        assert experts[name].ndim == 2 and not decays(f"compressor/experts/{name}")
    for name in ("mlp_0_kernel", "mlp_2_kernel"):
        assert decays(f"compressor/experts/{name}")
    assert decays("language_model/embed_tokens") and decays("language_model/lm_head/kernel")
    assert not decays("language_model/norm/weight") and not decays("visual/blocks/0/norm1/weight")
    if mode == "audio":
        assert decays("audio_tower/conv1/kernel") and not decays("audio_tower/layer_norm/weight")
        assert not decays("audio_tower/layers/0/self_attn_layer_norm/bias")
    if mode == "paper":  # with LoRA adapters on the decoder's attention
        lora = [path_str(p) for p, _ in leaves if re.search(r"/lora_[ab]$", path_str(p))]
        assert len(lora) == 2 * 4 * mc.text.num_layers and all(decays(p) for p in lora)
    assert seen[True] > 0 and seen[False] > 0


def test_decay_mask_refuses_a_parameter_it_has_no_rule_for():
    with pytest.raises(ValueError, match="no weight-decay rule for the name 'gamma'"):
        decay_mask({"encoder": {"gamma": jnp.ones((2, 3))}})


@pytest.mark.parametrize("mode", sorted(MODES))
def test_one_update_equals_optax_adamw_with_the_same_mask(mode):
    """``make_optimizer``'s transform (clipping + our AdamW with ``decay_mask``, frozen leaves at zero) against
    optax's ``multi_transform`` of ``chain(clip_by_global_norm, adamw(mask=decay_mask))`` and ``set_to_zero``:
    two updates (the second has non-zero moments) over every leaf of the tiny model."""
    shapes, mc = _tiny_params(mode)
    params = _random_like(shapes, 3, 0.05)
    patterns = (r"^(compressor|language_model|visual)/",) + ((r"^audio_(projector|gate_proj)/",) if mode == "audio"
                                                            else ())
    trainable = select_trainable(params, patterns, expert_names=mc.expert_names, expert_roles=mc.expert_roles)
    opt = optimizer_config(learning_rate=3e-2, warmup_fraction=0.0, weight_decay=0.5, b1=0.8, b2=0.9, clip_norm=5.0)
    ours, lr = make_optimizer(opt, 10, trainable)
    ref = optax.multi_transform(
        {"trainable": optax.chain(optax.clip_by_global_norm(5.0),
                                  optax.adamw(lr, b1=0.8, b2=0.9, eps=1e-8, weight_decay=0.5, mask=decay_mask)),
         "frozen": optax.set_to_zero()}, trainable.labels)
    grads = [_random_like(params, 10 + step, 0.3 + step) for step in range(2)]

    def two_updates(tx, params):
        state, update = tx.init(params), jax.jit(tx.update)
        for g in grads:
            updates, state = update(g, state, params)
            params = jax.tree.map(jnp.add, params, updates)
        return params

    p_ours, p_ref = two_updates(ours, params), two_updates(ref, params)
    for (path, a), b, p0 in zip(jax.tree_util.tree_leaves_with_path(p_ours), jax.tree.leaves(p_ref),
                                jax.tree.leaves(params), strict=True):
        a, b, p0 = np.asarray(a), np.asarray(b), np.asarray(p0)
        moved = np.abs(b - p0).max()
        assert np.abs(a - b).max() <= 1e-5 * max(moved, 1e-30), path_str(path)
