"""The RL stage (``stages.<name>.kind = 'rl'``): GRPO rounds of rollout -> rewards -> advantages -> updates.

``emoqwen-train`` hands ``run_rl_stage`` to the trainer (``train_and_evaluate(stage_runners={'rl': …})``); the
trainer loads the incoming weights, swaps in LoRA adapters, and after the stage saves its weights and runs the
stage evaluation exactly as for the supervised stages. One round (``num_steps`` of them):

  1. prompts: ``batch_size / group_size`` data samples (the stage's mixture, split into data shards as the
     supervised stages split theirs), each cut before its answer, ``rl.format_instruction`` appended to the
     user turn;
  2. rollouts: ``group_size`` completions per prompt from the current policy (``rollout.Sampler``; by default
     the generation engine), seeded by the run's checkpointed key and the round, with the old policy's
     log-probabilities of the sampled tokens under the sampling distribution (temperature-scaled logits)
     recorded while sampling; the reference's when ``beta`` > 0;
  3. rewards (``rewards.score``, weighted by ``rl.rewards``) and group advantages (``grpo.group_advantages``);
  4. ``rl.num_iterations`` optimiser updates on the whole rollout batch with the clipped loss
     (``grpo.policy_loss``) through the trainer's step (frozen parts, stacked experts, LoRA, clipping and the
     non-finite skip as in every stage).

Checkpoints (every ``checkpoint.every_steps`` rounds, and the last) hold the policy and optimiser state, the
run's random key (the rollout seeds derive from it and the round) and the prompt iterators; the reference is
the stage's incoming weights, which the trainer rebuilds on resume from the previous stage's directory (or the
run's initial weights), so it is not stored again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from emoqwen_jax.data import data_config
from emoqwen_jax.data.pipeline import (
    Collate,
    as_records,
    load_sources,
    make_sample_dataset,
)
from emoqwen_jax.data.reasons import RejectCounter
from emoqwen_jax.data.tokenizer import tokenizer_info
from emoqwen_jax.infer.session import Session
from emoqwen_jax.model.emotion_qwen import audio_spec
from emoqwen_jax.model.sharding import axis_rules
from emoqwen_jax.parallel import check_divisibility, make_mesh
from emoqwen_jax.parallel.rules import batch_sharding
from emoqwen_jax.rl.grpo import NORMALIZATIONS, group_advantages, policy_loss
from emoqwen_jax.rl.rewards import RewardInput, check_rewards, score
from emoqwen_jax.rl.rollout import (
    EngineSampler,
    RolloutSettings,
    Sampler,
    completion_arrays,
    cut_at_media,
    media_token_ids,
    split_sample,
    update_sample,
)
from emoqwen_jax.train import batching
from emoqwen_jax.train.metrics import to_python
from emoqwen_jax.train.preemption import PreemptionWatch
from emoqwen_jax.train.run_state import ShardIterators, data_layout
from emoqwen_jax.train.step import StageStep, build_stage_step, state_shardings
from emoqwen_jax.train.trainer import (
    DataShards,
    Preempted,
    StageRun,
    data_shards,
    global_batch,
    resolve_mixture,
)

log = logging.getLogger(__name__)


def check_rl_config(name: str, sc: Any) -> None:
    """ValueError for settings the RL stage cannot run (each names the field and the valid values)."""
    rl = sc.rl
    if int(rl.group_size) < 2 or int(sc.batch_size) % int(rl.group_size):
        raise ValueError(f"stages.{name}: rl.group_size={rl.group_size} must be >= 2 and divide batch_size="
                         f"{sc.batch_size} (completions per round)")
    if rl.normalization not in NORMALIZATIONS:
        raise ValueError(f"stages.{name}.rl.normalization={rl.normalization!r}; choose one of {NORMALIZATIONS}")
    if int(sc.optimizer.grad_accum) != 1:
        raise ValueError(f"stages.{name}.optimizer.grad_accum={sc.optimizer.grad_accum}: an RL stage updates on "
                         f"whole rollout batches (1); use rl.num_iterations for several updates per batch")
    if float(rl.temperature) <= 0:
        raise ValueError(f"stages.{name}.rl.temperature={rl.temperature} must be > 0 (GRPO samples)")
    if int(rl.num_iterations) < 1 or float(rl.beta) < 0 or float(rl.clip_eps_high) < 0:
        raise ValueError(f"stages.{name}: rl.num_iterations >= 1, rl.beta >= 0 and rl.clip_eps_high >= 0 "
                         f"(got {rl.num_iterations}, {rl.beta}, {rl.clip_eps_high})")
    if int(rl.max_new_tokens) >= int(sc.max_length):
        raise ValueError(f"stages.{name}: rl.max_new_tokens={rl.max_new_tokens} must be below max_length="
                         f"{sc.max_length} (prompt + completion)")
    check_rewards(dict(rl.rewards))


def with_instruction(records: Any, instruction: str) -> grain.MapDataset:
    """The records with ``instruction`` appended to their first user turn."""
    def add(record: dict) -> dict:
        turns = [dict(t) for t in record.get("conversations") or []]
        first = next((t for t in turns if t.get("role") == "user"), None)
        if first is not None:
            first["content"] = first["content"] + instruction
        return {**record, "conversations": turns}

    return as_records(records).map(add)


def completion_logprobs(model, inputs, positions: jax.Array, tokens: jax.Array, temperature: float
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log π(token) float32[B, N], entropy float32[B, N], aux loss) of the completion tokens under the
    temperature-scaled logits (the sampling distribution); ``positions`` int[B, N] are the columns whose hidden
    states predict ``tokens`` int[B, N]. Only those N columns reach the LM head."""
    hidden, _, aux = model.hidden_states(inputs)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logits = model.language_model.logits(picked) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0] - logz
    probs = jnp.exp(logits - logz[..., None])
    entropy = logz - (probs * logits).sum(-1)
    return logp, entropy, aux["aux_loss"]


def make_rl_loss(rl: Any):
    """``loss(model, (inputs, rollout)) -> (scalar, metrics)`` for ``train.step.make_train_step``; ``rollout``
    holds tokens, positions, mask, old_logp, advantages and (beta > 0) ref_logp."""
    temperature, beta = float(rl.temperature), float(rl.beta)

    def loss(model, batch):
        inputs, r = batch
        logp, entropy, aux = completion_logprobs(model, inputs, r["positions"], r["tokens"], temperature)
        value, metrics = policy_loss(logp, r["old_logp"], r["advantages"], r["mask"], clip_eps=float(rl.clip_eps),
                                     clip_eps_high=float(rl.clip_eps_high), beta=beta, ref_logp=r.get("ref_logp"),
                                     normalization=rl.normalization)
        m = r["mask"].astype(jnp.float32)
        mean_entropy = jax.lax.stop_gradient((entropy * m).sum() / jnp.maximum(m.sum(), 1.0))
        return value + aux, dict(metrics, loss=value + aux, aux_loss=aux, entropy=mean_entropy)

    return loss


def rollout_seed(rng: jax.Array, step: int) -> int:
    """The round's sampling seed, from the run's checkpointed key data uint32[2] and the round."""
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(rng)), zlib.crc32(b"rollout") % 2**31)
    return int(jax.random.randint(jax.random.fold_in(key, step), (), 0, 2**31 - 1))


def _prompt_iterators(config, name: str, sc, workdir: str, shards, prompts_per_shard: int) -> ShardIterators:
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.update(max_length=int(sc.max_length))  # samples (prompt + reference answer) as a supervised stage
    sources = [(with_instruction(records, sc.rl.format_instruction), weight)
               for records, weight in load_sources(resolve_mixture(sc.mixture, workdir))]
    limits = (float(data_cfg.max_reject_fraction), int(data_cfg.reject_check_after))
    return ShardIterators([iter(make_sample_dataset(sources, data_cfg, shard_index=s, shard_count=shards.num_shards,
                                                    counter=RejectCounter(*limits))
                                .batch(prompts_per_shard, drop_remainder=True, batch_fn=list))
                           for s in shards.shard_ids])


def _mean(passes: list[dict], key: str) -> float:
    return float(np.mean([p[key] for p in passes]))


def _on_mesh(arrays: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows (its data shards, in order) -> global arrays over the batch axes of ``mesh``."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in arrays.items()}


def all_rows(rows: np.ndarray) -> np.ndarray:
    """This process's rows -> every process's, in data-shard order (the global batch's row order)."""
    if jax.process_count() == 1:
        return rows
    return np.asarray(multihost_utils.process_allgather(rows, tiled=True))


def reward_metrics(rewards: np.ndarray, parts: dict[str, np.ndarray], lengths: np.ndarray, group_size: int
                   ) -> dict[str, float]:
    """A round's reward metrics over every process's completions (this process's float[R] rewards, its
    rewards by name and int[R] completion lengths): ``reward``, ``reward_<name>``, ``reward_std`` (the mean of
    the groups' stds), ``groups_all_equal`` (the share of groups whose rewards are all equal: they add no policy
    gradient) and ``completion_length``."""
    rewards, lengths = all_rows(rewards), all_rows(lengths)
    groups = rewards.reshape(-1, group_size)
    return {"reward": float(rewards.mean()), **{f"reward_{k}": float(all_rows(v).mean()) for k, v in parts.items()},
            "reward_std": float(groups.std(axis=1, ddof=1).mean()),
            "groups_all_equal": float(np.mean(groups.min(axis=1) == groups.max(axis=1))),
            "completion_length": float(lengths.mean())}


def rollout_mesh(mesh):
    """Where rollouts sample: the run's mesh in one process; with several processes, this process's own devices
    (data-parallel over them, the run's tensor split where it fits), so each process samples its own prompts
    without waiting on the others."""
    if jax.process_count() == 1:
        return mesh
    local = jax.local_devices()
    return make_mesh({"data": -1, "tensor": math.gcd(int(mesh.shape["tensor"]), len(local))}, local)


def rollout_params(params: dict) -> dict:
    """The policy's weights for ``rollout_mesh``: themselves in one process; with several processes, gathered
    whole onto every process (host numpy arrays; a collective, so every process calls it)."""
    if jax.process_count() == 1:
        return params
    return multihost_utils.process_allgather(params, tiled=True)


@dataclasses.dataclass
class RLStage:
    """What every round of one RL stage uses (``_setup``): the prompt data, the built step and its jitted
    functions, the rollout session and sampler, the rewards."""

    run: StageRun
    settings: RolloutSettings
    shards: DataShards
    iterators: ShardIterators
    collate: Collate
    pad_id: int
    audio_spec: Any
    step_fn: Any  # jitted (state, (inputs, rollout)) -> (state, metrics), the state donated
    logprobs_fn: Any  # jitted (params, inputs, positions, tokens) -> (logp, entropy)
    reference: dict | None  # the frozen reference's params (beta > 0)
    session: Session
    sampler: Sampler
    first_row: int  # this process's first row of the global batch (row i samples with the round's seed + i)
    weights: dict[str, float]  # reward name -> weight
    media_ids: frozenset[int]


def run_rl_stage(run: StageRun, sampler: Sampler | None = None) -> tuple[dict, int, dict]:
    """Runs one RL stage (module docstring); returns (final params, global step, the last metrics record).
    ``sampler``: how rollouts are drawn (default: ``EngineSampler``, the generation engine on the run's mesh,
    which records the sampling log-probabilities)."""
    stage, state, start = _setup(run, sampler)
    sc = run.config.stages[run.name]
    global_step, last = run.global_step, {}
    local_vision = batching.units_local(stage.shards.num_shards, stage.shards.batch_devices)
    with PreemptionWatch() as preemption, axis_rules(run.mesh, run.rules, units_local=local_vision):
        for step in range(start, int(sc.num_steps)):
            t0 = time.perf_counter()
            inputs, rollout, completions, rewards, parts = _rollouts(stage, state, step)
            t1 = time.perf_counter()
            passes = []
            for _ in range(int(sc.rl.num_iterations)):
                state, metrics = stage.step_fn(state, (inputs, rollout))
                passes.append(metrics)
            passes = jax.device_get(passes)
            global_step += 1
            last = _record(stage, step, global_step, passes, rewards, parts, completions, (t0, t1,
                                                                                          time.perf_counter()))
            _save(stage, state, step, global_step, preemption)
    run.ckpt.wait()
    return state.params, global_step, last


def _setup(run: StageRun, sampler: Sampler | None) -> tuple[RLStage, Any, int]:
    """The stage's pieces, its state (fresh or restored) and the round to start from."""
    config, name, mesh = run.config, run.name, run.mesh
    sc = config.stages[name]
    rl = sc.rl
    check_rl_config(name, sc)
    settings = RolloutSettings.from_config(rl)
    shards = data_shards(config, name, run.model_config, mesh)
    # The rollout arrays (one row per completion) are split over the batch devices as they are: no padded rows.
    check_divisibility(run.model_config, mesh, int(sc.batch_size))
    prompts = int(sc.batch_size) // settings.group_size
    if prompts % shards.num_shards:
        raise ValueError(f"stages.{name}: {prompts} prompts per round (batch_size / rl.group_size) must split "
                         f"over data.num_shards={shards.num_shards}")
    iterators = _prompt_iterators(config, name, sc, run.workdir, shards, prompts // shards.num_shards)
    info = tokenizer_info(run.model_config.text.vocab_size)
    collate = Collate(shards.shard_batch_size, config.data.length_buckets, config.data.patch_buckets, info.pad_id,
                      config.data.audio.window_buckets)
    # The supervised stages' builder with the GRPO objective: the stage's trainables, LoRA and AdamW, one
    # optimiser update per pass over a round's rollouts.
    built = build_stage_step(config, name, run.graphdef, run.params, run.model_config, loss=make_rl_loss(rl),
                             num_updates=int(sc.num_steps) * int(rl.num_iterations))
    state, start, state_sharding, reference = _init_or_restore(run, built, iterators, float(rl.beta))
    temperature = float(rl.temperature)
    logprobs_fn = jax.jit(lambda p, inputs, positions, tokens: completion_logprobs(
        nnx.merge(run.graphdef, p), inputs, positions, tokens, temperature)[:2])
    known = data_config().to_dict()  # the session's settings (the trainer's own, e.g. num_shards, are not)
    session = Session(nnx.merge(run.graphdef, rollout_params(state.params)),
                      {k: v for k, v in config.data.to_dict().items() if k in known})
    local_rows = shards.shard_batch_size * len(shards.shard_ids)
    sampler = sampler or EngineSampler(session, max_batch=local_rows,
                                       max_len=int(sc.max_length) + settings.max_new_tokens, mesh=rollout_mesh(mesh))
    stage = RLStage(run=run, settings=settings, shards=shards, iterators=iterators, collate=collate,
                    pad_id=info.pad_id, audio_spec=audio_spec(run.model_config),
                    step_fn=jax.jit(built.train_step, donate_argnums=0, out_shardings=(state_sharding, None)),
                    logprobs_fn=logprobs_fn, reference=reference, session=session, sampler=sampler,
                    first_row=shards.shard_ids[0] * shards.shard_batch_size,
                    weights={k: float(v) for k, v in dict(rl.rewards).items()},
                    media_ids=media_token_ids(run.model_config))
    return stage, state, start


def _init_or_restore(run: StageRun, built: StageStep, iterators: ShardIterators, beta: float):
    """(state, first round, the state's shardings, the frozen reference or None): a fresh state over the
    stage's incoming weights, or the checkpoint ``run.resume`` names (the iterators restored with it)."""
    params = jax.device_put(run.params, run.shardings)
    # The frozen reference: the stage's incoming weights (copied: the policy's buffers are donated).
    reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=run.shardings)(params) if beta else None
    state_shapes = jax.eval_shape(built.init, params)
    state_sharding = state_shardings(state_shapes, run.shardings, run.mesh)
    if run.resume is None:
        return jax.jit(built.init, out_shardings=state_sharding)(params), 0, state_sharding, reference
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes,
                            state_sharding)
    state = run.ckpt.restore(int(run.resume["global_step"]), abstract, iterators)
    return state, int(run.resume["stage_step"]), state_sharding, reference


def _rollouts(stage: RLStage, state, step: int):
    """One round's rollouts: (the update batch's inputs, the rollout arrays on the mesh, this process's
    completions, their float[R] rewards and rewards by name)."""
    run, settings, shards = stage.run, stage.settings, stage.shards
    rl, group = run.config.stages[run.name].rl, settings.group_size
    rollout_prompts = [split_sample(s, stage.session) for shard in next(stage.iterators) for s in shard]
    model = nnx.merge(run.graphdef, rollout_params(state.params))
    completions = [cut_at_media(c, stage.media_ids) for c in stage.sampler(
        model, [p.prompt for p in rollout_prompts], settings, rollout_seed(state.rng, step) + stage.first_row)]
    samples = [RewardInput(stage.session.decode(c.token_ids), rollout_prompts[i // group].reference,
                           len(c.token_ids), settings.max_new_tokens, c.stopped, int(rl.length_buffer))
               for i, c in enumerate(completions)]
    rewards, parts = score(samples, stage.weights)
    advantages = np.asarray(group_advantages(jnp.asarray(rewards), group, std_normalize=bool(rl.std_normalize)))
    rows = [update_sample(p, c, f"{p.sample_id}#{i % group}")
            for i, c in enumerate(completions) for p in [rollout_prompts[i // group]]]
    per = shards.shard_batch_size
    batches = [stage.collate(rows[k * per:(k + 1) * per]) for k in range(len(shards.shard_ids))]
    inputs, _ = global_batch(batches, shards.shard_ids, run.spec, per, stage.pad_id, run.mesh, stage.audio_spec,
                             run.config.data.patch_buckets, shards.num_shards)
    arrays = completion_arrays(rollout_prompts, completions, group, settings.max_new_tokens)
    has_logp = bool(arrays.pop("has_logp"))
    rollout = _on_mesh({**arrays, "advantages": advantages.astype(np.float32)}, run.mesh)
    if not has_logp:  # the sampler recorded none: the sampling policy's, right after sampling
        rollout["old_logp"] = stage.logprobs_fn(state.params, inputs, rollout["positions"], rollout["tokens"])[0]
    if stage.reference is not None:
        rollout["ref_logp"] = stage.logprobs_fn(stage.reference, inputs, rollout["positions"], rollout["tokens"])[0]
    jax.block_until_ready(rollout)
    return inputs, rollout, completions, rewards, parts


def _record(stage: RLStage, step: int, global_step: int, passes: list[dict], rewards, parts, completions,
            times: tuple[float, float, float]) -> dict:
    """Writes the round's metrics record (and returns it); stops the run after too many non-finite updates in a
    row."""
    run = stage.run
    t0, t1, t2 = times
    record = {"stage": run.name, "step": step + 1, "global_step": global_step,
              **{k: _mean(passes, k) for k in ("loss", "policy_loss", "grad_norm", "kl", "clip_fraction", "entropy")},
              "lr": float(passes[-1]["lr"]), "skipped": int(sum(not p["finite"] for p in passes)),
              **reward_metrics(rewards, parts, np.array([len(c.token_ids) for c in completions]),
                               stage.settings.group_size),
              "rollout_s": t1 - t0, "update_s": t2 - t1}
    record = {k: v if isinstance(v, str) else to_python(v) for k, v in record.items()}
    run.writer.write(record)
    max_bad = int(run.config.train.max_nonfinite_in_a_row)
    if int(passes[-1]["nonfinite_in_a_row"]) >= max_bad:
        raise RuntimeError(f"stage {run.name}: {int(passes[-1]['nonfinite_in_a_row'])} non-finite updates in a "
                           f"row at step {step + 1}; stopping (train.max_nonfinite_in_a_row={max_bad})")
    return record


def _save(stage: RLStage, state, step: int, global_step: int, preemption: PreemptionWatch) -> None:
    """Checkpoints when due, at the stage's end and on SIGTERM (then raises ``Preempted``)."""
    run = stage.run
    done = step + 1 == int(run.config.stages[run.name].num_steps)
    preempted = preemption.reached(global_step)
    due = (step + 1) % run.ckpt.every_steps == 0 and int(jax.device_get(state.nonfinite)) == 0
    if due or done or preempted:
        meta = {"stage": run.name, "stage_step": step + 1, "global_step": global_step,
                "reference": "the stage's incoming weights",
                "data_layout": data_layout(stage.shards.num_shards, jax.process_count())}
        run.ckpt.save(global_step, state, meta, stage.iterators, force=done or preempted)
    if preempted:
        run.ckpt.wait()
        raise Preempted(f"SIGTERM: saved step {global_step} of stage {run.name}; start again to resume")
