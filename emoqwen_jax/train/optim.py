"""The optimiser of a stage: AdamW with warmup + cosine, clipping, and freezing by parameter-path regexes and
expert roles.

Parameters are addressed by '/'-joined paths of the model's pure state dict, e.g.
``language_model/layers/3/self_attn/q_proj/kernel`` or ``compressor/gate/fc1/bias``. The compressor's experts
stay stacked ([E, ...], sharded over the ``expert`` mesh axis) in the optimiser too: a stacked leaf trains when
any of its experts does, and a per-expert mask keeps the others frozen (zero gradient, zero update, so their
values stay bit-identical; their Adam moments stay zero and keep the expert sharding). For the regexes each
expert appears under a virtual path ``compressor/experts/<param>/<expert name>`` (e.g.
``compressor/experts/mlp_0_kernel/emotion``); stages select experts by role instead (``ROLES``), so the same
preset freezes the general expert whatever E is. Fully frozen leaves go to ``optax.set_to_zero()``: no Adam
moments at all.

Weight decay follows the parameter's name (``decay_mask``), gradient accumulation weighs micro-batches by their
labelled tokens (``accumulate_tokens``); docs/training_math.md states both.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

EXPERTS = "compressor/experts/"
ROUTING_NETWORKS = ("compressor/gate/", "compressor/router/")
# 'general' / 'emotion': paper-mode experts (expert 0 / the others); 'routed': every scale-mode expert;
# 'gate': the paper-mode gating network or the scale-mode router.
ROLES = ("general", "emotion", "routed", "gate")


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# Weight decay is decided by a parameter's name, never by its rank: the stacked experts' biases and norm scales
# ([E, d]) are 2-D, and a layer-stacked model would make every norm scale 2-D.
DECAYED_NAMES = re.compile(r"(^|_)kernel$|^(embed_tokens|embed_positions|lora_a|lora_b)$")
BIAS_NAMES = re.compile(r"(^|_)bias$")
NORM_SCALE_NAMES = re.compile(r"^ln_\w*weight$|^(weight|scale)$")  # a norm's scale: ln_q_weight, or <norm>/weight


def decays(path: str) -> bool:
    """Whether weight decay applies to the parameter at ``path`` ('/'-joined, e.g.
    ``language_model/layers/0/mlp/up_proj/kernel``): kernels (dense, convolution, stacked experts'), embeddings
    and LoRA factors yes; biases and norm scales no (as transformers' Trainer leaves out biases and norms)."""
    *parents, name = path.split("/")
    if BIAS_NAMES.search(name):
        return False
    if NORM_SCALE_NAMES.search(name) and (name.startswith("ln_") or (parents and "norm" in parents[-1])):
        return False
    if DECAYED_NAMES.search(name):
        return True
    raise ValueError(f"parameter {path!r}: no weight-decay rule for the name {name!r}; decay_mask knows kernels "
                     f"(*kernel), embeddings (embed_tokens, embed_positions), LoRA factors (lora_a, lora_b), biases "
                     f"(*bias) and norm scales (weight of a *norm* module, ln_*weight)")


def decay_mask(params: Any) -> Any:
    """A Python bool per leaf of ``params`` (a pure state dict, or optax's masked view of one): True where AdamW
    applies weight decay (``decays`` of the leaf's path). The ``mask`` of ``adamw`` (ours or optax's)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_str(path)), params)


# Never trained, whatever a stage says: Whisper's fixed sinusoidal positions (HF keeps them requires_grad=False).
ALWAYS_FROZEN = (r"^audio_tower/embed_positions$",)
AUDIO_ENCODER = (r"^audio_tower/",)
AUDIO_PROJECTOR = (r"^audio_(projector|gate_proj)/",)  # the projector (and the gate's audio input): stage 3


def frozen_patterns(model_config: Any) -> tuple[str, ...]:
    """Paths no stage may train for this model: ``ALWAYS_FROZEN``, and the whole audio encoder while
    ``model.audio.freeze_encoder`` (the default)."""
    audio = getattr(model_config, "audio", None)
    return ALWAYS_FROZEN + (AUDIO_ENCODER if audio is not None and audio.freeze_encoder else ())


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What a stage trains. ``labels``: 'trainable' | 'frozen' per parameter leaf (same tree as the params);
    ``expert_masks``: path -> per-expert flags for stacked expert leaves of which only some experts train;
    ``paths``: what trains, one entry per leaf or per expert of a partly trained leaf."""

    labels: Any
    expert_masks: Mapping[str, tuple[bool, ...]]
    paths: tuple[str, ...]

    def count(self, params: Any) -> int:
        """Trained parameters (scalars) of ``params`` (arrays or ShapeDtypeStructs, the tree of ``labels``): whole
        trainable leaves, and the trained experts' share of partly trained stacked leaves."""
        def one(path, x, label):
            mask = self.expert_masks.get(path_str(path))
            size = math.prod(x.shape)
            return size * sum(mask) // len(mask) if mask is not None else size * (label == "trainable")

        return sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(one, params, self.labels)))


def select_trainable(params: Any, patterns: Sequence[str] = (), roles: Sequence[str] = (), *,
                     expert_names: Sequence[str] = (), expert_roles: Sequence[str] = (),
                     frozen: Sequence[str] = ALWAYS_FROZEN) -> Trainable:
    """A leaf (or one expert of a stacked leaf) trains if a regex in ``patterns`` ``re.search``es its path, or
    its role is in ``roles`` (an expert by ``expert_roles``; the gate and router by 'gate'), and no regex of
    ``frozen`` (paths no stage may train, ``frozen_patterns``) matches it.

    Every regex must match something (a typo would silently freeze the model); a role with no parameter in this
    model (e.g. 'routed' in paper mode, or 'emotion' with one expert) is fine."""
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"trainable roles {bad} are unknown; choose from {ROLES}")
    compiled = [re.compile(p) for p in patterns]
    never = [re.compile(p) for p in frozen]
    matched: set[str] = set()
    masks: dict[str, tuple[bool, ...]] = {}
    trained: list[str] = []

    def hit(path: str) -> bool:
        found = [p for p, c in zip(patterns, compiled, strict=True) if c.search(path)]
        matched.update(found)
        return bool(found)

    def label(path, leaf):
        key = path_str(path)
        if key.startswith(EXPERTS):
            if leaf.shape[0] != len(expert_names):
                raise ValueError(f"{key} stacks {leaf.shape[0]} experts but {len(expert_names)} names were given")
            flags = tuple(hit(f"{key}/{name}") | (role in roles)
                          for name, role in zip(expert_names, expert_roles, strict=True))
            if all(flags):
                trained.append(key)
            elif any(flags):
                masks[key] = flags
                trained.extend(f"{key}/{n}" for n, f in zip(expert_names, flags, strict=True) if f)
            return "trainable" if any(flags) else "frozen"
        on = hit(key) | ("gate" in roles and key.startswith(ROUTING_NETWORKS))
        on = on and not any(c.search(key) for c in never)
        if on:
            trained.append(key)
        return "trainable" if on else "frozen"

    labels = jax.tree_util.tree_map_with_path(label, params)
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ValueError(f"trainable patterns {unmatched} match no parameter; paths look like {paths[:3]} … and "
                         f"experts like {EXPERTS}<param>/<name> with names {tuple(expert_names)}")
    return Trainable(labels=labels, expert_masks=masks, paths=tuple(trained))


def stage_trainable(params: Any, stage: Mapping[str, Any], model_config: Any, extra_patterns: Sequence[str] = (),
                    patterns: Sequence[str] | None = None) -> Trainable:
    """``select_trainable`` for a stage config (``trainable`` regexes + ``trainable_roles``, + the audio projector
    when the stage has ``train_audio_projector`` and the model has audio) and a ``ModelConfig`` (expert names and
    roles, ``frozen_patterns``); ``patterns`` given replaces the stage's fields."""
    roles = tuple(stage["trainable_roles"]) if patterns is None else ()
    audio = getattr(model_config, "audio", None)
    audio_projector = (AUDIO_PROJECTOR if patterns is None and audio is not None and audio.enabled
                       and stage["train_audio_projector"] else ())
    patterns = tuple(stage.trainable if patterns is None else patterns) + tuple(extra_patterns) + audio_projector
    return select_trainable(params, patterns, roles, expert_names=model_config.expert_names,
                            expert_roles=model_config.expert_roles, frozen=frozen_patterns(model_config))


def _expert_mask(mask: tuple[bool, ...], ndim: int) -> jax.Array:
    return jnp.asarray(mask).reshape((-1,) + (1,) * (ndim - 1))


def freeze_experts(params: Any, expert_masks: Mapping[str, tuple[bool, ...]]) -> Any:
    """stop_gradient on the frozen experts of partly trained stacked leaves (values unchanged)."""
    def f(path, p):
        mask = expert_masks.get(path_str(path))
        return p if mask is None else jnp.where(_expert_mask(mask, p.ndim), p, jax.lax.stop_gradient(p))

    return jax.tree_util.tree_map_with_path(f, params)


def mask_expert_updates(expert_masks: Mapping[str, tuple[bool, ...]]) -> optax.GradientTransformation:
    """Zero updates for frozen experts (weight decay would otherwise move them)."""
    def update(updates, state, params=None):
        del params

        def f(path, u):
            mask = expert_masks.get(path_str(path))
            return u if mask is None else jnp.where(_expert_mask(mask, u.ndim), u, jnp.zeros_like(u))

        return jax.tree_util.tree_map_with_path(f, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def schedule(opt: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` over ``warmup_fraction`` of the steps, then cosine to
    ``end_lr_fraction`` × peak."""
    peak = float(opt["learning_rate"])
    end = float(opt["end_lr_fraction"])
    warmup = int(round(float(opt["warmup_fraction"]) * num_steps))
    if warmup == 0:  # no warmup: the first update already uses the peak rate
        return optax.cosine_decay_schedule(peak, decay_steps=max(num_steps, 1), alpha=end)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1),
        end_value=peak * end)


class AdamWState(NamedTuple):
    count: jax.Array  # int32: updates applied (bias correction; the schedule's step)
    mu: Any  # first moments, shaped like the trained params
    nu: Any  # second moments


def adamw(learning_rate: optax.Schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, clip_norm: float = 1.0, mask: Any = None
          ) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping + AdamW in one transform: the arithmetic of optax's ``chain(clip_by_global_norm,
    adamw(mask=mask))``, laid out for memory traffic. ``mask``: where weight decay applies, as optax's — a tree
    of Python bools shaped like the params, or a callable params -> such a tree (``decay_mask``); None: every
    leaf.

    ``update(grads, state, params, *, finite=True, grad_norm=None)``. ``finite`` False (the step's non-finite
    skip) leaves the state as it was and returns zero updates; ``grad_norm`` is the gradients' global norm when
    the caller already has it (computed here otherwise).

    Why not optax's: XLA:CPU fuses the new moments into each of their consumers, so the parameter update
    recomputes them from the old moments — which, with a donated state, the moments' own in-place update has
    already overwritten, so XLA copies both moments first; an outer ``where(finite, new, old)`` forces the
    same copies. Here the skip is applied inside the moment update and the new moments are materialised
    (``optimization_barrier``) before the parameter update reads them: one pass per moment, one per parameter
    — about half the traffic (64 M-element leaf, 2-core CPU: 183 → 76-92 ms)."""

    def init(params):
        zeros = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
        return AdamWState(count=jnp.zeros([], jnp.int32), mu=zeros(params), nu=zeros(params))

    def update(grads, state, params=None, *, finite=True, grad_norm=None, **unused):
        del unused
        norm = optax.global_norm(grads) if grad_norm is None else grad_norm
        # One scalar factor: a multiply is cheap enough for XLA to recompute in each moment's loop, where
        # optax's (g / norm) * clip_norm made it write the clipped gradients out and read them back twice.
        scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
        clip = lambda g: g * scale.astype(g.dtype)  # noqa: E731
        finite = jnp.asarray(finite)
        mu = jax.tree.map(lambda g, m: jnp.where(finite, (1 - b1) * clip(g) + b1 * m, m), grads, state.mu)
        nu = jax.tree.map(lambda g, v: jnp.where(finite, (1 - b2) * clip(g) ** 2 + b2 * v, v), grads, state.nu)
        mu, nu = jax.lax.optimization_barrier((mu, nu))
        count = optax.safe_increment(state.count)
        step_size = -learning_rate(state.count)

        def param_update(m, v, p, decayed):
            u = (m / (1 - b1 ** count).astype(m.dtype)) / (jnp.sqrt(v / (1 - b2 ** count).astype(v.dtype)) + eps)
            if weight_decay and decayed:
                u = u + weight_decay * p
            return jnp.where(finite, jnp.asarray(step_size, u.dtype) * u, jnp.zeros_like(u))

        decay = mask(params) if callable(mask) else mask
        decay = jax.tree.map(lambda _: True, params) if decay is None else decay
        updates = jax.tree.map(param_update, mu, nu, params, decay)
        return updates, AdamWState(count=jnp.where(finite, count, state.count), mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)


class AccumulationState(NamedTuple):
    mini_step: jax.Array  # int32: micro-steps taken in the current window (0 .. k-1)
    tokens: jax.Array  # float32: summed weight (labelled tokens) of the window's finite micro-batches
    grads: Any  # sum over the window's finite micro-batches of weight x gradient, shaped like the trained params
    inner: Any  # the inner transform's state


def accumulate_tokens(inner: optax.GradientTransformationExtraArgs, every_k: int
                      ) -> optax.GradientTransformationExtraArgs:
    """Gradient accumulation over windows of ``every_k`` micro-steps, each micro-batch weighted by its labelled
    tokens, as transformers' Trainer does with ``num_items_in_batch``: the gradient ``inner`` gets at a window's
    last micro-step is ``sum_i n_i g_i / sum_i n_i`` (``g_i`` the gradient of micro-batch i's token-mean loss,
    ``n_i`` its labelled tokens), which is the gradient of the token-mean loss over the window's whole batch.

    ``update(grads, state, params, *, finite=True, weight=1.0, **unused)``; ``weight`` is ``n_i``. A non-finite
    micro-step (``finite`` False) is left out of its window: neither its gradient nor its tokens are added, and
    the window still closes at its k-th micro-step with the token mean over its finite micro-batches (windows
    stay aligned with the micro-step count). A window without a finite micro-batch (or without a labelled
    token) applies no update: ``inner`` keeps its state, as on a skipped step without accumulation. Updates are
    zero except at a window's last micro-step."""
    if every_k < 1:
        raise ValueError(f"grad_accum={every_k}; it must be >= 1")

    def init(params):
        return AccumulationState(mini_step=jnp.zeros([], jnp.int32), tokens=jnp.zeros([], jnp.float32),
                                 grads=jax.tree.map(jnp.zeros_like, params), inner=inner.init(params))

    def update(grads, state, params=None, *, finite=True, weight=1.0, **unused):
        del unused
        finite = jnp.asarray(finite)
        weight = jnp.where(finite, jnp.asarray(weight, jnp.float32), 0.0)
        acc = jax.tree.map(lambda a, g: jnp.where(finite, a + weight.astype(g.dtype) * g, a), state.grads, grads)
        tokens = state.tokens + weight
        closes = state.mini_step == every_k - 1

        def apply(acc, inner_state):
            mean = jax.tree.map(lambda a: a / jnp.maximum(tokens, 1e-30).astype(a.dtype), acc)
            norm = optax.global_norm(mean)
            return inner.update(mean, inner_state, params, finite=(tokens > 0) & jnp.isfinite(norm), grad_norm=norm)

        def wait(acc, inner_state):
            return jax.tree.map(jnp.zeros_like, acc), inner_state

        updates, new_inner = jax.lax.cond(closes, apply, wait, acc, state.inner)
        zero = lambda x: jnp.where(closes, jnp.zeros_like(x), x)  # noqa: E731 (a closed window starts afresh)
        return updates, AccumulationState(mini_step=jnp.where(closes, 0, state.mini_step + 1), tokens=zero(tokens),
                                          grads=jax.tree.map(zero, acc), inner=new_inner)

    return optax.GradientTransformationExtraArgs(init, update)


def _find(opt_state: Any, kind: type) -> list:
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)]


def accumulates(opt_state: Any) -> bool:
    """Whether the optimiser state holds a gradient-accumulation window (``accumulate_tokens``)."""
    return bool(_find(opt_state, AccumulationState))


def updates_applied(opt_state: Any) -> jax.Array:
    """int32[]: the updates ``make_optimizer``'s transform has applied (AdamW's count): the schedule's step of
    the next update."""
    found = _find(opt_state, AdamWState)
    if len(found) != 1:
        raise ValueError(f"the optimiser state holds {len(found)} AdamW states; make_optimizer's holds one")
    return found[0].count


def make_optimizer(opt: Mapping[str, Any], num_steps: int, trainable: Trainable
                   ) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """AdamW (+ global-norm clipping over the trainable leaves) for 'trainable', ``set_to_zero`` for 'frozen';
    frozen experts of a trainable stacked leaf get zero updates. The transform's ``update`` takes the step's
    ``finite`` flag, ``grad_norm`` (see ``adamw``) and ``weight`` (the micro-batch's labelled tokens, see
    ``accumulate_tokens``): on a non-finite step its state stays as it was (with accumulation: the micro-batch
    is left out of its window).

    ``opt`` (``stages.<name>.optimizer``, where the defaults are): learning_rate, b1, b2, eps, weight_decay,
    clip_norm, warmup_fraction, end_lr_fraction, grad_accum (micro-batches per update: ``accumulate_tokens``
    inside the trainable branch, so its gradient accumulators exist only for trainable leaves). ``num_steps``
    counts optimiser updates. Weight decay applies by name (``decay_mask``): kernels and embeddings, never
    biases or norm scales.
    """
    lr = schedule(opt, num_steps)
    trained = optax.chain(
        adamw(lr, b1=float(opt["b1"]), b2=float(opt["b2"]), eps=float(opt["eps"]),
              weight_decay=float(opt["weight_decay"]), clip_norm=float(opt["clip_norm"]), mask=decay_mask),
        mask_expert_updates(trainable.expert_masks))
    accum = int(opt["grad_accum"])
    if accum > 1:
        trained = accumulate_tokens(trained, accum)
    return optax.multi_transform({"trainable": trained, "frozen": optax.set_to_zero()}, trainable.labels), lr
