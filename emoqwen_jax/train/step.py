"""The jitted train step: loss, gradients, optimiser update with frozen leaves, non-finite skipping.

State is plain pytrees (the model's pure params dict, the optax state, counters), so it shards, donates and
checkpoints like any array tree. The model is rebuilt inside the step with ``nnx.merge(graphdef, params)``.

``build_stage_step`` is the one way a stage's step is built from the run config: the trainer, ``emoqwen-plan``
(``train.plan``) and the benchmarks call it, so what they compile is what trains (LoRA adapters included:
``with_stage_adapters`` swaps them in, ``stage_extra_trainable`` names them trainable).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from emoqwen_jax.model.lora import ADAPTER_PATTERN, LoRAConfig, apply_lora, dropout_key
from emoqwen_jax.train.loss import loss_fn
from emoqwen_jax.train.optim import (
    Trainable,
    accumulates,
    freeze_experts,
    make_optimizer,
    path_str,
    stage_trainable,
    updates_applied,
)

LossFn = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: dict  # the model's pure nnx state (float32 master weights)
    opt_state: Any  # optax state over the params (no entries for frozen leaves; stacked experts stay stacked)
    step: jax.Array  # int32: micro-steps taken in this stage
    nonfinite: jax.Array  # int32: consecutive skipped (non-finite) updates
    rng: jax.Array  # uint32[2]: key data, folded with the step for any stochastic layer (LoRA dropout)


def _frozen_stop_gradient(params: dict, trainable: Trainable) -> dict:
    """stop_gradient on fully frozen leaves so XLA drops their weight-gradient matmuls; a stacked expert
    tensor with some frozen experts gets a per-expert mask instead."""
    stopped = jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == "frozen" else p, params,
                           trainable.labels)
    return freeze_experts(stopped, trainable.expert_masks)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformationExtraArgs, trainable: Trainable,
                    schedule: Callable, grad_accum: int = 1, loss: LossFn = loss_fn):
    """Returns ``train_step(state, batch) -> (state, metrics)`` (pure; jit it with donated state). ``tx`` is
    ``make_optimizer``'s: its update takes ``finite``, ``grad_norm`` and ``weight`` and keeps its state on a
    skipped step.

    ``loss(model, batch) -> (scalar, metrics)`` is the objective (default: the next-token ``loss_fn``); its
    ``metrics["tokens"]``, when present, weighs the micro-batch in gradient accumulation (else every micro-batch
    weighs 1). ``metrics["lr"]`` is the learning rate of the update this step applies — on a micro-step that
    only accumulates, the one its window's update will use; on a skipped step, the one it would have used:
    ``schedule`` at the count of updates applied before it (the optimiser's own step)."""

    def train_step(state: TrainState, batch: Any):  # what ``loss`` takes (ModelInputs for loss_fn)
        if accumulates(state.opt_state) != (grad_accum > 1):
            raise ValueError(f"make_train_step(grad_accum={grad_accum}) with an optimiser that "
                             f"{'accumulates' if grad_accum == 1 else 'does not accumulate'}; pass the "
                             f"optimizer's grad_accum to both make_optimizer and make_train_step")

        def loss_of(params):
            model = nnx.merge(graphdef, _frozen_stop_gradient(params, trainable))
            # A fresh dropout mask every micro-step, reproducible on resume (models without adapters ignore it).
            with dropout_key(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)):
                return loss(model, batch)

        (value, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        masked = jax.tree.map(lambda g, lab: g if lab == "trainable" else jnp.zeros((), g.dtype), grads,
                              trainable.labels)
        grad_norm = optax.global_norm(masked)  # frozen experts of a stacked leaf already have zero gradient
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        lr = schedule(updates_applied(state.opt_state))
        # The optimiser applies the non-finite skip to its own state (make_optimizer: in place, one pass per
        # moment) and returns exact zeros when it applies no update. The parameters take its updates as they
        # come: with accumulation a window's update (made of its finite micro-batches) may land on a non-finite
        # micro-step.
        updates, new_opt = tx.update(grads, state.opt_state, state.params, finite=finite, grad_norm=grad_norm,
                                     weight=metrics.get("tokens", jnp.ones((), jnp.float32)))
        new_params = jax.tree.map(lambda p, u: jnp.asarray(p + u).astype(p.dtype), state.params, updates)
        state = TrainState(params=new_params, opt_state=new_opt,
                           step=state.step + 1, nonfinite=jnp.where(finite, 0, state.nonfinite + 1), rng=state.rng)
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite, nonfinite_in_a_row=state.nonfinite, lr=lr)
        return state, metrics

    return train_step


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      nonfinite=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)))


def stage_lora(stage_cfg) -> LoRAConfig | None:
    """The stage's LoRA settings (``stages.<name>.lora``), or None when not ``enabled``."""
    return LoRAConfig.from_dict(stage_cfg.lora.to_dict()) if stage_cfg.lora.enabled else None


def stage_extra_trainable(config, name: str) -> tuple[str, ...]:
    """Regexes stage ``name`` trains besides its own fields: its LoRA adapters when it has them."""
    return (ADAPTER_PATTERN,) if stage_lora(config.stages[name]) else ()


def with_stage_adapters(model: nnx.Module, config, name: str) -> nnx.Module:
    """``model`` with stage ``name``'s LoRA adapters swapped in (in place; ``lora_b`` = 0, so the stage starts at
    the incoming model; initialised from the run's seed folded with the stage name); unchanged without LoRA.
    ``model`` may be abstract (inside ``nnx.eval_shape``)."""
    lora = stage_lora(config.stages[name])
    if lora is not None:
        key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()) % 2**31)  # per-stage init
        apply_lora(model, lora, rngs=nnx.Rngs(params=key))
    return model


@dataclasses.dataclass(frozen=True)
class StageStep:
    """A stage's train step and its parts (``build_stage_step``)."""

    train_step: Callable  # pure (state, batch) -> (state, metrics); jit it with the state donated
    tx: optax.GradientTransformationExtraArgs
    schedule: Callable  # optimiser updates applied -> learning rate
    trainable: Trainable
    seed: int

    def init(self, params: dict) -> TrainState:
        """The stage's first state over ``params`` (jit it with the state's shardings as ``out_shardings``)."""
        return init_state(params, self.tx, self.seed)


def build_stage_step(config, name: str, graphdef: nnx.GraphDef, params: dict, model_config, *,
                     loss: LossFn = loss_fn, num_updates: int | None = None,
                     trainable: tuple[str, ...] | None = None) -> StageStep:
    """Stage ``name``'s train step over a model ``graphdef`` with pure ``params`` (arrays or ShapeDtypeStructs;
    adapters already swapped in by ``with_stage_adapters``): what trains is the stage's ``trainable`` regexes and
    ``trainable_roles``, its LoRA adapters and, with audio, its projector (``trainable`` regexes given replace the
    stage's fields); AdamW as ``stages.<name>.optimizer`` over ``num_updates`` optimiser updates (default: the
    stage's ``num_steps``), with its gradient accumulation; ``loss`` as in ``make_train_step``."""
    sc = config.stages[name]
    selected = stage_trainable(params, sc, model_config, stage_extra_trainable(config, name), patterns=trainable)
    tx, schedule = make_optimizer(sc.optimizer, int(sc.num_steps if num_updates is None else num_updates), selected)
    step = make_train_step(graphdef, tx, selected, schedule, int(sc.optimizer.grad_accum), loss=loss)
    return StageStep(step, tx, schedule, selected, int(config.seed))


def state_shardings(state_shapes: TrainState, param_shardings: dict, mesh) -> TrainState:
    """Shardings of a whole TrainState: ``params`` by the rules (``param_shardings``, shaped like the params
    dict); every optimiser leaf (Adam moments, accumulators) like the parameter it mirrors — the parameter path
    that ends its own path, with the same shape (stacked experts keep their expert sharding) — and scalars /
    counters replicated. Without this, XLA may lay freshly initialised moments out replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {path_str(path): (tuple(shape.shape), _get(param_shardings, path))
               for path, shape in jax.tree_util.tree_leaves_with_path(state_shapes.params)}

    def opt_leaf(path, x):
        p = path_str(path)
        for q in sorted(by_path, key=len, reverse=True):
            shape, sh = by_path[q]
            if (p == q or p.endswith("/" + q)) and tuple(x.shape) == shape:
                return sh
        return replicated

    return TrainState(params=param_shardings,
                      opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state_shapes.opt_state),
                      step=replicated, nonfinite=replicated, rng=replicated)


def _get(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", k))]
    return tree
