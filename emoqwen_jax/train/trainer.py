"""Runs the configured stages: mesh -> data -> shapes -> sharded init -> donated jitted step -> restore -> loop.

Resume order (big_vision style): the latest checkpoint in ``workdir/checkpoints`` names its stage and step;
finished stages are skipped (their weights are in ``workdir/stages/<name>``); the stage in progress rebuilds
its optimiser, restores the state into its abstract shapes and shardings, restores the data iterators, and
continues at the next micro-step, so a killed run reproduces an uninterrupted one step for step. Every stage
checkpoints its final step before writing its weights, so a restart after a stage's last step goes on with the
next stage and retrains nothing.

Parameters are never gathered on one host: the initial model is built by a jitted init whose outputs carry the
mesh shardings (or restored / imported straight into them), and stage weights are written from the sharded
arrays by orbax. Preemption (``train/preemption.py``): a SIGTERM to any host makes all hosts save one agreed
step and stop. ``workdir`` and ``init_from`` may be URIs (``emoqwen_jax.runtime.storage``); before any compute every
host checks that it sees the same workdir and ``init_from`` (``parallel/hosts.py``).

LoRA stages (``stages.<name>.lora.enabled``): the stage swaps adapters into the incoming weights
(``emoqwen_jax.model.lora``), trains the adapters plus the stage's ``trainable`` regexes, and saves its model
directory WITH the adapters (meta ``lora``; ``emoqwen-convert merge-lora`` / ``to-hf --lora_adapter`` read it).
The next stage starts from the merged weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from emoqwen_jax import data as D
from emoqwen_jax.data.demo import build_demo, check_demo_data, demo_root, fill_demo
from emoqwen_jax.data.pipeline import load_sources, make_iterator
from emoqwen_jax.model import EmotionQwen, ModelConfig, layout_spec
from emoqwen_jax.model.emotion_qwen import audio_spec
from emoqwen_jax.model.lora import merge_lora
from emoqwen_jax.model.sharding import Rules, axis_rules
from emoqwen_jax.model_dir import is_model_dir, load_model, load_weights, save_model
from emoqwen_jax.parallel import check_divisibility, hosts, make_mesh, pure_param_shardings
from emoqwen_jax.parallel.rules import batch_devices as count_batch_devices
from emoqwen_jax.parallel.rules import input_sharding, shard_batch
from emoqwen_jax.runtime import storage
from emoqwen_jax.train import batching, flops
from emoqwen_jax.train.metrics import MetricsWriter, plot_stage, to_python
from emoqwen_jax.train.preemption import PreemptionWatch, watch_maintenance_events
from emoqwen_jax.train.run_state import Checkpointer, ShardIterators, check_data_layout, data_layout
from emoqwen_jax.train.step import (
    StageStep,
    TrainState,
    build_stage_step,
    stage_extra_trainable,
    stage_lora,
    state_shardings,
    with_stage_adapters,
)

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint; the CLI exits cleanly."""


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` from ``config.distributed`` or the usual environment (SLURM, TPU, or
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    dist = config.distributed
    env = os.environ
    coordinator = dist.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    num = int(dist.num_processes or env.get("JAX_NUM_PROCESSES", 0) or 0)
    if dist.local_device_count:  # CPU host devices per process (must precede backend start-up; ignored by TPU/GPU)
        jax.config.update("jax_num_cpu_devices", int(dist.local_device_count))
    if coordinator and num > 1:
        pid = dist.process_id
        if pid < 0:
            pid = int(env.get("JAX_PROCESS_ID", env.get("SLURM_PROCID", 0)))
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    elif dist.auto:
        jax.distributed.initialize()  # TPU pods and SLURM: JAX reads the cluster environment


def resolve_mixture(mixture, workdir: str) -> list[dict]:
    """``{demo}`` in a manifest or data_root means the bundled demo set (built once into workdir; with a remote
    workdir, into a local folder on every host)."""
    entries = [dict(e) for e in mixture]
    if any("{demo}" in str(v) for e in entries for v in e.values()):
        demo_dir = demo_root(workdir)  # a remote workdir: a local folder on every host
        if storage.is_uri(workdir) or jax.process_index() == 0:
            build_demo(demo_dir)
        hosts.barrier("demo_data")  # the others wait for process 0's build
        entries = fill_demo(entries, demo_dir)
    return entries


def init_params(mcfg: ModelConfig, seed: int, shardings: dict | None = None) -> dict:
    """A fresh model's parameters (pure dict), each created directly in its sharding: the init is jitted with
    ``out_shardings``, so no device ever holds the whole model (None: on the default device). The trainer's
    fresh start; the jitted init may differ from an eager ``EmotionQwen(...)`` in the last bit."""

    def init():
        return nnx.to_pure_dict(nnx.state(EmotionQwen(mcfg, rngs=nnx.Rngs(seed)), nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


def initial_params(config, mcfg: ModelConfig, shardings: dict, mesh) -> dict:
    """Stage 1's starting parameters, sharded: fresh, our model directory, or a Hugging Face import."""
    if not config.init_from:
        return init_params(mcfg, config.seed, shardings)
    model = load_weights(config.init_from, dtype=mcfg.dtype, param_dtype=mcfg.param_dtype,
                         compressor=dict(config.model.compressor), seed=config.seed, mesh=mesh)
    if model.config.text.vocab_size != mcfg.text.vocab_size:
        raise ValueError(f"init_from has vocab {model.config.text.vocab_size}, the config {mcfg.text.vocab_size}")
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def stage_micro_steps(config, name: str) -> int:
    sc = config.stages[name]
    return int(sc.num_steps) * int(sc.optimizer.grad_accum)


def check_mixtures(config) -> None:
    """Every stage to run names its data: ValueError naming the fields to set (the 7b, gpu and small presets
    have no default data)."""
    empty = [name for name in config.run_stages if not config.stages[name].mixture]
    if empty:
        fields = " ".join(f"--config.stages.{name}.mixture=\"({{'manifest': ..., 'data_root': ...}},)\""
                          for name in empty)
        raise ValueError(f"preset {config.preset!r} has no default data and stages {empty} have an empty mixture: "
                         f"set {fields} (docs/data.md)")


def load_stage_params(stage_dir: str, mcfg: ModelConfig, mesh) -> dict:
    """A finished stage's weights, restored into this run's shardings (a LoRA stage's adapters merged)."""
    model = merge_lora(load_model(stage_dir, dtype=mcfg.dtype, mesh=mesh))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))



# The per-stage evaluation hook: (config, stage name, stage model dir, workdir, metrics writer) -> report dict.
# ``emoqwen-train`` passes ``emoqwen_jax.eval.suites.stage_eval.run_stage_eval``; train never imports eval.
StageEval = Callable[[ml_collections.ConfigDict, str, str, str, MetricsWriter], dict]
SUPERVISED = "supervised"  # stages.<name>.kind of the next-token stages this module runs itself


@dataclasses.dataclass
class StageRun:
    """What a stage runner gets: the run's pieces for one stage (``train_and_evaluate`` builds it)."""

    config: ml_collections.ConfigDict
    name: str
    params: dict  # the stage's incoming parameters (sharded; adapters swapped in for a LoRA stage)
    graphdef: Any
    shardings: dict
    model_config: ModelConfig
    mesh: Any
    spec: Any  # the layout spec
    ckpt: Checkpointer
    writer: MetricsWriter
    workdir: str
    global_step: int
    resume: dict | None  # the checkpoint meta to resume from, or None
    rules: Rules  # the logical-axis rules (``config.mesh.rules``)
    extra_trainable: tuple[str, ...] = ()  # what trains besides the stage's fields (``stage_extra_trainable``)


# A stage runner of another kind (``stages.<name>.kind``): StageRun -> (final params, global step, last metrics
# record). ``emoqwen-train`` passes ``{"rl": emoqwen_jax.rl.stage.run_rl_stage}``; train never imports rl.
StageRunner = Callable[[StageRun], tuple[dict, int, dict]]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None, *,
                       stage_eval: StageEval | None = None,
                       stage_runners: dict[str, StageRunner] | None = None) -> dict[str, Any]:
    """Runs every stage of ``config.run_stages``; returns {stage: final metrics} and the output paths.

    ``stage_eval`` runs after each stage that sets ``stages.<name>.eval_suite``, on every process (with
    parameters sharded across hosts the evaluation is a collective computation; process 0 writes).
    ``stage_runners`` runs the stages whose ``kind`` is not 'supervised' (by kind)."""
    wanted = [n for n in config.run_stages if config.stages[n].eval_suite]
    if wanted and stage_eval is None:
        raise ValueError(f"stages {wanted} set eval_suite but no stage_eval hook was given; pass "
                         f"stage_eval=emoqwen_jax.eval.suites.stage_eval.run_stage_eval (emoqwen-train does)")
    runners = {SUPERVISED: _run_stage, **(stage_runners or {})}
    for n in config.run_stages:
        kind = config.stages[n].kind
        if kind not in runners:
            raise ValueError(f"stage {n} has kind {kind!r} but no runner for it was given (have: "
                             f"{list(runners)}); emoqwen-train passes stage_runners={{'rl': "
                             f"emoqwen_jax.rl.stage.run_rl_stage}}")
    workdir = workdir or config.workdir
    if not workdir:
        raise ValueError("set config.workdir (--config.workdir=DIR)")
    workdir = storage.normalize(workdir)
    check_mixtures(config)
    check_demo_data(config)  # before any work: a larger preset must not train on the demo set by accident
    maybe_initialize_distributed(config)
    mcfg = ModelConfig.from_run_config(config)
    mesh = make_mesh(config.mesh)  # a mesh that does not divide the devices stops here, before any compute
    rules = tuple(config.mesh.rules)
    check_layouts(config, mcfg, mesh)
    hosts.check_shared_workdir(workdir)
    if config.train.watch_maintenance_events:
        watch_maintenance_events()  # TPU maintenance notice -> SIGTERM -> the agreed save below
    if config.init_from:
        hosts.check_present(config.init_from, "init_from")
    spec = layout_spec(mcfg)
    abstract = nnx.eval_shape(lambda: EmotionQwen(mcfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    shardings = pure_param_shardings(abstract, mesh, rules)
    ckpt = Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                        max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    latest = ckpt.latest_step()
    resume = ckpt.read_meta(latest) if latest is not None else None
    summary: dict[str, Any] = {"workdir": workdir, "stages": {}, "process_index": jax.process_index(),
                               "process_count": jax.process_count(), "device_count": jax.device_count()}
    params, previous = None, None  # previous: the last skipped (finished) stage's directory
    global_step = int(resume["global_step"]) if resume else 0
    try:
        for name in config.run_stages:
            stage_dir = storage.join(workdir, "stages", name)
            resumed = resume if resume and resume["stage"] == name else None
            finished = resumed is not None and int(resumed["stage_step"]) >= stage_micro_steps(config, name)
            if is_model_dir(stage_dir) and (resumed is None or finished):
                params, previous = None, stage_dir  # loaded only if a later stage runs
                continue
            if resumed is not None:  # before any compute: the saved iterator states must get their own shards
                check_data_layout(resumed.get("data_layout"),
                                  data_layout(stage_num_shards(config, name, mesh), jax.process_count()),
                                  setting=int(config.data.num_shards), step=int(resumed["global_step"]))
            if params is None:
                params = load_stage_params(previous, mcfg, mesh) if previous else \
                    initial_params(config, mcfg, shardings, mesh)
            stage_graphdef, params, stage_shardings = stage_model(config, name, params, graphdef, mesh, rules)
            run = StageRun(config=config, name=name, params=params, graphdef=stage_graphdef,
                           shardings=stage_shardings or shardings, model_config=mcfg, mesh=mesh, spec=spec,
                           ckpt=ckpt, writer=writer, workdir=workdir, global_step=global_step, resume=resumed,
                           extra_trainable=stage_extra_trainable(config, name), rules=rules)
            params, global_step, last = runners[config.stages[name].kind](run)
            model = nnx.merge(stage_graphdef, params)  # sharded arrays: each host writes its own shards
            # The data settings travel with the weights: describe/eval process inputs exactly as training did.
            save_model(model, stage_dir, meta={"stage": name, "global_step": global_step,
                                               "data": config.data.to_dict()}, overwrite=True)
            if stage_graphdef is not graphdef:
                params = nnx.to_pure_dict(nnx.state(merge_lora(model), nnx.Param))
            summary["stages"][name] = last
            if writer.enabled:
                summary["stages"][name]["plot"] = plot_stage(workdir, name)
            if config.stages[name].eval_suite:
                summary["stages"][name]["eval"] = stage_eval(config, name, stage_dir, workdir, writer)
            resume = None
    finally:
        ckpt.close()
        writer.close()
    summary["final"] = storage.join(workdir, "stages", config.run_stages[-1])
    summary["metrics"] = writer.path
    return summary


def stage_model(config, name: str, params: dict, graphdef, mesh, rules: Rules):
    """(graphdef, params, shardings or None) of stage ``name``: unchanged without LoRA; with it, adapters
    (``train.step.with_stage_adapters``) swapped into the weights and their shardings from the same rules."""
    if stage_lora(config.stages[name]) is None:
        return graphdef, params, None
    model = with_stage_adapters(nnx.merge(graphdef, params), config, name)
    return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param)), \
        pure_param_shardings(model, mesh, rules)


def stage_num_shards(config, name: str, mesh, batch_size: int | None = None) -> int:
    """The data shards of stage ``name`` on ``mesh`` (``data.num_shards`` resolved), or a ValueError naming the
    setting when they cannot split the stage's batch (``batch_size``: its global rows, default the stage's). A
    global batch that does not divide the batch devices is fine: each step is padded with empty rows
    (``batching.layout_multiples``)."""
    processes, setting = jax.process_count(), int(config.data.num_shards)
    num_shards = batching.resolve_num_shards(setting, processes, count_batch_devices(mesh))
    batch_size = int(config.stages[name].batch_size if batch_size is None else batch_size)
    if num_shards % processes:
        raise ValueError(f"data.num_shards={setting} gives {num_shards} data shards, not a multiple of the {processes} "
                         f"processes; set --config.data.num_shards to a multiple of {processes} (or 0: one per "
                         f"process)")
    if batch_size % num_shards:
        what = f"data.num_shards={setting}" + (f" ({num_shards} shards: one per batch device)" if setting == -1 else "")
        raise ValueError(f"{what} does not divide stages.{name}.batch_size={batch_size} into equal shards; set "
                         f"--config.data.num_shards=0 (one shard per process) or "
                         f"--config.stages.{name}.batch_size to a multiple of {num_shards}")
    return num_shards


def check_layouts(config, mcfg: ModelConfig, mesh) -> None:
    """Every stage to run fits the mesh (heads, experts, data shards): errors before any compute."""
    check_divisibility(mcfg, mesh)
    for name in config.run_stages:
        stage_num_shards(config, name, mesh)


def global_batch(batches: list[dict], shard_ids: list[int], spec, batch_size: int, pad_id: int, mesh,
                 aspec=None, patch_buckets=(), num_shards: int = 1):
    """This host's shard batches (``emoqwen_jax.data`` batches, one per id in ``shard_ids``) -> (the global
    ModelInputs on ``mesh``, this host's ModelInputs), every shard padded to the sizes all shards agree on."""
    from jax.experimental import multihost_utils

    needs = np.array([batching.needs(b) for b in batches])
    if jax.process_count() > 1:
        needs = np.asarray(multihost_utils.process_allgather(needs)).reshape(-1, needs.shape[-1])
    patch_multiple, row_multiple = batching.layout_multiples(spec.merge_unit, num_shards, count_batch_devices(mesh))
    sizes = batching.agreed_sizes(needs.tolist(), batch_size, patch_buckets, patch_multiple, row_multiple)
    rows = -(-batch_size // row_multiple) * row_multiple
    local = batching.concat_shards([batching.shard_inputs(b, spec, sizes, shard_index=s, pad_id=pad_id,
                                                          audio_spec=aspec, rows=rows)
                                    for b, s in zip(batches, shard_ids, strict=True)])
    if jax.process_count() == 1:
        return shard_batch(local, mesh), local

    def place(field, value):
        if field.batch_dim is None:  # replicated, but still the concatenation over all hosts' shards
            return jnp.asarray(multihost_utils.process_allgather(value, tiled=True))
        return jax.make_array_from_process_local_data(input_sharding(field, value.ndim, mesh), value)

    return local.map_fields(place), local


@dataclasses.dataclass(frozen=True)
class DataShards:
    """How a stage's global batch splits into data shards, and which this host reads."""

    num_shards: int
    shard_ids: list[int]  # this host's
    shard_batch_size: int  # rows per shard
    batch_devices: int


def data_shards(config, name: str, mcfg: ModelConfig, mesh, batch_size: int | None = None) -> DataShards:
    """``config.data.num_shards`` resolved for stage ``name`` (``batch_size``: its global rows, default the
    stage's), checked against the processes, the batch and the mesh."""
    batch_size = int(config.stages[name].batch_size if batch_size is None else batch_size)
    processes, pid = jax.process_count(), jax.process_index()
    batch_devices = count_batch_devices(mesh)
    num_shards = stage_num_shards(config, name, mesh, batch_size)
    layout = data_layout(num_shards, processes)  # recorded in every checkpoint, checked on resume
    return DataShards(num_shards, layout["shard_ids"][pid], batch_size // num_shards, batch_devices)


@dataclasses.dataclass
class SupervisedStage:
    """A supervised stage set up to run (``_setup``): its data shards and iterators, its step and the layout of
    its state."""

    shards: DataShards
    iterators: ShardIterators
    counters: list  # the data iterators' reject counters
    built: StageStep
    state_sharding: Any  # TrainState of shardings
    local_vision: bool  # the ViT runs on each device's own patches (``batching.units_local``)


def _setup(run: StageRun) -> SupervisedStage:
    """The stage's data iterators (one per data shard this host reads) and its train step."""
    config, sc = run.config, run.config.stages[run.name]
    shards = data_shards(config, run.name, run.model_config, run.mesh)
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.update(batch_size=shards.shard_batch_size, max_length=sc.max_length)
    sources = load_sources(resolve_mixture(sc.mixture, run.workdir))
    made = [make_iterator(sources, data_cfg, shard_index=s, shard_count=shards.num_shards) for s in shards.shard_ids]
    built = build_stage_step(config, run.name, run.graphdef, run.params, run.model_config)
    state_shapes = jax.eval_shape(built.init, run.params)
    local_vision = batching.units_local(shards.num_shards, shards.batch_devices)
    _log_vision_layout(run.name, shards, local_vision)
    return SupervisedStage(shards, ShardIterators([m[0] for m in made]), [m[1] for m in made], built,
                           state_shardings(state_shapes, run.shardings, run.mesh), local_vision)


def _log_vision_layout(name: str, shards: DataShards, local_vision: bool) -> None:
    """Says (process 0, several batch devices) whether the ViT stays on each device's patches."""
    if shards.batch_devices == 1 or jax.process_index() != 0:
        return
    if local_vision:
        log.info("%s: %d data shards over %d batch devices: the ViT's attention and window permutation run on each "
                 "device's own patches", name, shards.num_shards, shards.batch_devices)
    else:
        log.warning("%s: %d data shards over %d batch devices: every device gathers the patch axis and repeats the "
                    "ViT's full-attention layers for the whole batch; data.num_shards=-1 (one shard per batch "
                    "device) keeps the ViT on each device's own patches", name, shards.num_shards,
                    shards.batch_devices)


def _init_or_restore(run: StageRun, stage: SupervisedStage) -> tuple[TrainState, int]:
    """(state, first micro-step): a fresh state, or the checkpoint's restored straight into the sharded layout
    (no throw-away optimiser state; the reject counts travel inside the data iterators' state)."""
    params = jax.device_put(run.params, run.shardings)
    if run.resume is None:
        return jax.jit(stage.built.init, out_shardings=stage.state_sharding)(params), 0
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(stage.built.init, params), stage.state_sharding)
    return run.ckpt.restore(int(run.resume["global_step"]), abstract, stage.iterators), int(run.resume["stage_step"])


def _compiled_step(run: StageRun, stage: SupervisedStage) -> Callable:
    """``train_step(state, batch)``: the jitted, donated step, compiled ahead of time per batch shape (bucket);
    after each compile every host waits for the others before the first run: hosts compile at different speeds (a
    persistent-cache hit on one, a miss on another) and the step's first collective must not wait on a host that
    is still compiling."""
    step_fn = jax.jit(stage.built.train_step, donate_argnums=0, out_shardings=(stage.state_sharding, None))
    compiled: dict = {}

    def train_step(state, batch):
        key = (jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch)))
        if key not in compiled:
            compiled[key] = step_fn.lower(state, batch).compile()
            hosts.barrier(f"{run.name}_compiled")
        return compiled[key](state, batch)

    return train_step


@dataclasses.dataclass
class Throughput:
    """Real tokens, row slots and model FLOPs since the last metrics record (all hosts), and when it began."""

    tokens: float = 0.0
    slots: float = 0.0
    flops: float = 0.0
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, local, mcfg: ModelConfig) -> None:
        """Counts one step's batch from this host's part (``local``), scaled to every host."""
        processes = jax.process_count()
        self.tokens += float(local.text.attention_mask.sum()) * processes
        self.slots += float(local.text.attention_mask.size) * processes
        self.flops += flops.batch_train_flops(mcfg, local) * processes  # model FLOPs of the real tokens


def _record(run: StageRun, stage: SupervisedStage, micro: int, global_step: int, metrics, seen: Throughput) -> dict:
    """The metrics row of micro-step ``micro`` (0-based): the step's metrics and the throughput since ``seen``."""
    m = jax.device_get(metrics)
    elapsed = max(time.perf_counter() - seen.t0, 1e-9)
    peak = float(run.config.train.peak_flops_per_device) * jax.device_count()
    record = {"stage": run.name, "step": micro + 1, "global_step": global_step,
              **{k: m[k] for k in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "gate_weights", "lb_loss",
                                   "z_loss", "dropped_tokens")},
              "skipped": int(not m["finite"]), "tokens_per_s": seen.tokens / elapsed,
              # real (not padding) tokens per row slot since the last record: what packing raises
              "real_token_fraction": seen.tokens / max(seen.slots, 1.0),
              "mfu": seen.flops / elapsed / peak,
              "data_rejected": sum(sum(c.summary()["rejected"].values()) for c in stage.counters),
              "nonfinite_in_a_row": int(m["nonfinite_in_a_row"])}
    return {k: v if isinstance(v, str) else to_python(v) for k, v in record.items()}


def _loop(run: StageRun, stage: SupervisedStage, state: TrainState, start: int) -> tuple[dict, int, dict]:
    """Micro-steps ``start``.. of the stage: batch, step, metrics rows, checkpoints, preemption; returns (final
    params, global step, the last record)."""
    config, name, mcfg, ckpt = run.config, run.name, run.model_config, run.ckpt
    shards = stage.shards
    info = D.tokenizer_info(mcfg.text.vocab_size)
    aspec = audio_spec(mcfg)
    layout = data_layout(shards.num_shards, jax.process_count())  # recorded in every checkpoint, checked on resume
    train_step = _compiled_step(run, stage)
    total = stage_micro_steps(config, name)
    log_every, max_bad = int(config.train.log_every), int(config.train.max_nonfinite_in_a_row)
    trained = {"trained_leaves": len(stage.built.trainable.paths),
               "trainable_params": stage.built.trainable.count(state.params)}
    global_step, last, seen = run.global_step, dict(trained), Throughput()
    bar = tqdm(total=total, initial=start, desc=name, disable=jax.process_index() != 0, dynamic_ncols=True)
    hosts.barrier(f"{name}_start")  # the first batch's all-gather must not wait on a host still compiling
    with PreemptionWatch() as preemption, axis_rules(run.mesh, run.rules, units_local=stage.local_vision):
        for micro in range(start, total):
            batch, local = global_batch(next(stage.iterators), shards.shard_ids, run.spec, shards.shard_batch_size,
                                        info.pad_id, run.mesh, aspec, config.data.patch_buckets, shards.num_shards)
            state, metrics = train_step(state, batch)
            global_step += 1
            seen.add(local, mcfg)
            bar.update(1)
            done = micro + 1 == total
            if (micro + 1) % log_every == 0 or done:
                record = _record(run, stage, micro, global_step, metrics, seen)
                bad = record.pop("nonfinite_in_a_row")
                run.writer.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                seen, last = Throughput(), dict(record, **trained)
                if bad >= max_bad:
                    raise RuntimeError(f"stage {name}: {bad} non-finite updates in a row at step {micro + 1}; "
                                       f"stopping (train.max_nonfinite_in_a_row={max_bad})")
            preempted = preemption.reached(global_step)  # every host, every step: they agree on the step
            due = (micro + 1) % ckpt.every_steps == 0 and int(jax.device_get(state.nonfinite)) == 0
            if due or done or preempted:  # the stage's final step is always checkpointed
                meta = {"stage": name, "stage_step": micro + 1, "global_step": global_step, "data_layout": layout}
                ckpt.save(global_step, state, meta, stage.iterators, force=done or preempted)
            if preempted:
                ckpt.wait()
                bar.close()
                raise Preempted(f"SIGTERM: saved step {global_step} of stage {name}; start again to resume")
    bar.close()
    ckpt.wait()
    return state.params, global_step, last


def _run_stage(run: StageRun) -> tuple[dict, int, dict]:
    """The supervised stage runner: setup, init or restore, the loop (which writes the records)."""
    stage = _setup(run)
    state, start = _init_or_restore(run, stage)
    return _loop(run, stage, state, start)
