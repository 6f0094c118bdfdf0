"""The optimiser of a stage: AdamW with warmup + cosine, clipping, and freezing by parameter-path regexes.

Parameters are addressed by '/'-joined paths of the model's pure state dict, e.g.
``language_model/layers/3/self_attn/q_proj/kernel`` or ``compressor/gate/fc1/bias``. The compressor's
experts are stored stacked ([E, ...]); the optimiser sees them split per expert as
``compressor/experts/<param>/<expert name>`` (e.g. ``compressor/experts/mlp_0_kernel/emotion``), so a stage can
train the emotion expert while the general expert stays frozen. Frozen leaves go to ``optax.set_to_zero()``:
they get no Adam moments at all, and their values stay bit-identical.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

EXPERTS = ("compressor", "experts")


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def to_opt_view(params: dict, expert_names: Sequence[str]) -> dict:
    """The optimiser's view of a pure params dict: stacked expert leaves split into {name: leaf[e]}."""
    experts = params.get(EXPERTS[0], {}).get(EXPERTS[1])
    if experts is None:
        return params
    split = {k: {name: v[e] for e, name in enumerate(expert_names)} for k, v in experts.items()}
    return {**params, EXPERTS[0]: {**params[EXPERTS[0]], EXPERTS[1]: split}}


def from_opt_view(view: dict, expert_names: Sequence[str]) -> dict:
    experts = view.get(EXPERTS[0], {}).get(EXPERTS[1])
    if experts is None:
        return view
    stacked = {k: jnp.stack([v[name] for name in expert_names]) for k, v in experts.items()}
    return {**view, EXPERTS[0]: {**view[EXPERTS[0]], EXPERTS[1]: stacked}}


# Never trained, whatever a stage says: Whisper's fixed sinusoidal positions (HF keeps them requires_grad=False).
ALWAYS_FROZEN = (r"^audio_tower/embed_positions$",)
AUDIO_ENCODER = (r"^audio_tower/",)
AUDIO_PROJECTOR = (r"^audio_(projector|gate_proj)/",)  # the projector (and the gate's audio input): stage 3


def frozen_patterns(model_config: Any) -> tuple[str, ...]:
    """Paths no stage may train for this model: ``ALWAYS_FROZEN``, and the whole audio encoder while
    ``model.audio.freeze_encoder`` (the default)."""
    audio = getattr(model_config, "audio", None)
    return ALWAYS_FROZEN + (AUDIO_ENCODER if audio is not None and audio.freeze_encoder else ())


def stage_patterns(stage_cfg: Any, model_config: Any, extra: Sequence[str] = ()) -> tuple[tuple[str, ...],
                                                                                            tuple[str, ...]]:
    """(trainable, frozen) regexes of a stage for a model: the stage's ``trainable`` (+ ``extra``, + the audio
    projector when the stage has ``train_audio_projector`` and the model has audio) and ``frozen_patterns``."""
    patterns = tuple(stage_cfg.trainable) + tuple(extra)
    audio = getattr(model_config, "audio", None)
    if audio is not None and audio.enabled and stage_cfg.get("train_audio_projector", False):
        patterns += AUDIO_PROJECTOR
    return patterns, frozen_patterns(model_config)


def trainable_labels(view: Any, patterns: Sequence[str], frozen: Sequence[str] = ALWAYS_FROZEN) -> Any:
    """'trainable' / 'frozen' per leaf of the optimiser view: a leaf trains if any regex of ``patterns``
    ``re.search``es its path and none of ``frozen`` does."""
    compiled = [re.compile(p) for p in patterns]
    never = [re.compile(p) for p in frozen]

    def label(path, _):
        p = path_str(path)
        return "trainable" if any(c.search(p) for c in compiled) and not any(c.search(p) for c in never) else "frozen"

    return jax.tree_util.tree_map_with_path(label, view)


def check_patterns(view: Any, patterns: Sequence[str]) -> list[str]:
    """Every trainable regex must match something (a typo would silently freeze the model)."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(view)]
    unmatched = [p for p in patterns if not any(re.search(p, path) for path in paths)]
    if unmatched:
        raise ValueError(f"trainable patterns {unmatched} match no parameter; paths look like {paths[:3]} …")
    return [p for p in paths if any(re.search(q, p) for q in patterns)]


def schedule(opt: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` over ``warmup_fraction`` of the steps, then cosine to
    ``end_lr_fraction`` × peak."""
    peak = float(opt["learning_rate"])
    end = float(opt.get("end_lr_fraction", 0.0))
    warmup = int(round(float(opt.get("warmup_fraction", 0.01)) * num_steps))
    if warmup == 0:  # no warmup: the first update already uses the peak rate
        return optax.cosine_decay_schedule(peak, decay_steps=max(num_steps, 1), alpha=end)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1),
        end_value=peak * end)


def make_optimizer(opt: Mapping[str, Any], num_steps: int, labels: Any) -> tuple[optax.GradientTransformation,
                                                                                 optax.Schedule]:
    """AdamW (+ global-norm clipping over the trainable leaves) for 'trainable', ``set_to_zero`` for 'frozen'.

    ``opt``: learning_rate, b1, b2, eps, weight_decay, clip_norm, warmup_fraction, end_lr_fraction,
    grad_accum (micro-batches per update: ``optax.MultiSteps`` inside the trainable branch, so its gradient
    accumulators exist only for trainable leaves). ``num_steps`` counts optimiser updates. Weight decay
    applies to matrices only (not biases or norm scales), as HF's Trainer does.
    """
    lr = schedule(opt, num_steps)
    adamw = optax.chain(
        optax.clip_by_global_norm(float(opt.get("clip_norm", 1.0))),
        optax.adamw(lr, b1=float(opt.get("b1", 0.9)), b2=float(opt.get("b2", 0.95)), eps=float(opt.get("eps", 1e-8)),
                    weight_decay=float(opt.get("weight_decay", 0.1)),
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    accum = int(opt.get("grad_accum", 1))
    if accum > 1:
        adamw = optax.MultiSteps(adamw, every_k_schedule=accum)
    return optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()}, labels), lr
