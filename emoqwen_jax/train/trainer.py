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
import zlib
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
from emoqwen_jax.model.lora import ADAPTER_PATTERN, LoRAConfig, apply_lora, merge_lora
from emoqwen_jax.model.sharding import axis_rules
from emoqwen_jax.model_dir import is_model_dir, load_model, load_weights, save_model
from emoqwen_jax.parallel import DEFAULT_RULES, check_divisibility, hosts, make_mesh, pure_param_shardings
from emoqwen_jax.parallel.rules import batch_devices as count_batch_devices
from emoqwen_jax.parallel.rules import input_sharding, shard_batch
from emoqwen_jax.runtime import storage
from emoqwen_jax.train import batching, flops
from emoqwen_jax.train.metrics import MetricsWriter, plot_stage, to_python
from emoqwen_jax.train.optim import make_optimizer, stage_trainable
from emoqwen_jax.train.preemption import PreemptionWatch, watch_maintenance_events
from emoqwen_jax.train.run_state import Checkpointer, ShardIterators, check_data_layout, data_layout
from emoqwen_jax.train.step import init_state, make_train_step, state_shardings

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint; the CLI exits cleanly."""


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` from ``config.distributed`` or the usual environment (SLURM, TPU, or
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    dist = config.get("distributed", ml_collections.ConfigDict())
    env = os.environ
    coordinator = dist.get("coordinator_address", "") or env.get("JAX_COORDINATOR_ADDRESS", "")
    num = int(dist.get("num_processes", 0) or env.get("JAX_NUM_PROCESSES", 0) or 0)
    local = int(dist.get("local_device_count", 0) or 0)
    if local:  # CPU host devices per process (must precede backend start-up; ignored by TPU/GPU)
        jax.config.update("jax_num_cpu_devices", local)
    if coordinator and num > 1:
        pid = dist.get("process_id", -1)
        if pid < 0:
            pid = int(env.get("JAX_PROCESS_ID", env.get("SLURM_PROCID", 0)))
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    elif dist.get("auto", False):
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
    source = config.get("init_from", "")
    if not source:
        return init_params(mcfg, config.seed, shardings)
    model = load_weights(source, dtype=mcfg.dtype, param_dtype=mcfg.param_dtype,
                         compressor=dict(config.model.compressor), seed=config.seed, mesh=mesh)
    if model.config.text.vocab_size != mcfg.text.vocab_size:
        raise ValueError(f"init_from has vocab {model.config.text.vocab_size}, the config {mcfg.text.vocab_size}")
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def stage_micro_steps(config, name: str) -> int:
    sc = config.stages[name]
    return int(sc.num_steps) * int(sc.optimizer.get("grad_accum", 1))


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
    extra_trainable: tuple[str, ...] = ()


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
    wanted = [n for n in config.run_stages if config.stages[n].get("eval_suite")]
    if wanted and stage_eval is None:
        raise ValueError(f"stages {wanted} set eval_suite but no stage_eval hook was given; pass "
                         f"stage_eval=emoqwen_jax.eval.suites.stage_eval.run_stage_eval (emoqwen-train does)")
    runners = dict(stage_runners or {})
    for n in config.run_stages:
        kind = config.stages[n].get("kind", SUPERVISED)
        if kind != SUPERVISED and kind not in runners:
            raise ValueError(f"stage {n} has kind {kind!r} but no runner for it was given (have: "
                             f"{[SUPERVISED, *runners]}); emoqwen-train passes stage_runners={{'rl': "
                             f"emoqwen_jax.rl.stage.run_rl_stage}}")
    workdir = workdir or config.get("workdir", "")
    if not workdir:
        raise ValueError("set config.workdir (--config.workdir=DIR)")
    workdir = storage.normalize(workdir)
    check_demo_data(config)  # before any work: a larger preset must not train on the demo set by accident
    maybe_initialize_distributed(config)
    mcfg = ModelConfig.from_run_config(config)
    mesh = make_mesh(config.mesh)  # a mesh that does not divide the devices stops here, before any compute
    check_layouts(config, mcfg, mesh)
    hosts.check_shared_workdir(workdir)
    if config.train.get("watch_maintenance_events", False):
        watch_maintenance_events()  # TPU maintenance notice -> SIGTERM -> the agreed save below
    if config.get("init_from", ""):
        hosts.check_present(config.init_from, "init_from")
    spec = layout_spec(mcfg)
    abstract = nnx.eval_shape(lambda: EmotionQwen(mcfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    shardings = pure_param_shardings(abstract, mesh)
    ckpt = Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                        max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.get("async_save", True))
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
                                  setting=int(config.data.get("num_shards", 0)), step=int(resumed["global_step"]))
            if params is None:
                params = load_stage_params(previous, mcfg, mesh) if previous else \
                    initial_params(config, mcfg, shardings, mesh)
            stage_graphdef, params, stage_shardings, extra = stage_model(config, name, params, graphdef, mesh)
            run = StageRun(config, name, params, stage_graphdef, stage_shardings or shardings, mcfg, mesh, spec,
                           ckpt, writer, workdir, global_step, resumed, extra)
            kind = config.stages[name].get("kind", SUPERVISED)
            params, global_step, last = (_run_stage if kind == SUPERVISED else runners[kind])(run)
            model = nnx.merge(stage_graphdef, params)  # sharded arrays: each host writes its own shards
            # The data settings travel with the weights: describe/eval process inputs exactly as training did.
            save_model(model, stage_dir, meta={"stage": name, "global_step": global_step,
                                               "data": config.data.to_dict()}, overwrite=True)
            if stage_graphdef is not graphdef:
                params = nnx.to_pure_dict(nnx.state(merge_lora(model), nnx.Param))
            summary["stages"][name] = last
            if writer.enabled:
                summary["stages"][name]["plot"] = plot_stage(workdir, name)
            if config.stages[name].get("eval_suite"):
                summary["stages"][name]["eval"] = stage_eval(config, name, stage_dir, workdir, writer)
            resume = None
    finally:
        ckpt.close()
        writer.close()
    summary["final"] = storage.join(workdir, "stages", config.run_stages[-1])
    summary["metrics"] = writer.path
    return summary


def stage_lora(stage_cfg) -> LoRAConfig | None:
    """The stage's LoRA settings, or None when ``lora`` is absent or not ``enabled``."""
    lora = stage_cfg.get("lora")
    if lora is None or not lora.get("enabled", False):
        return None
    return LoRAConfig.from_dict(lora.to_dict() if hasattr(lora, "to_dict") else dict(lora))


def stage_model(config, name: str, params: dict, graphdef, mesh):
    """(graphdef, params, shardings or None, extra trainable regexes) of stage ``name``: unchanged without
    LoRA; with it, adapters (``lora_b`` = 0, so the stage starts at the incoming model) swapped into the
    weights, their shardings from the same logical-axis rules, and the adapter leaves made trainable."""
    lora = stage_lora(config.stages[name])
    if lora is None:
        return graphdef, params, None, ()
    model = nnx.merge(graphdef, params)
    key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()) % 2**31)  # per-stage init
    apply_lora(model, lora, rngs=nnx.Rngs(params=key))
    return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param)), pure_param_shardings(model, mesh), \
        (ADAPTER_PATTERN,)


def stage_num_shards(config, name: str, mesh, batch_size: int | None = None) -> int:
    """The data shards of stage ``name`` on ``mesh`` (``data.num_shards`` resolved), or a ValueError naming the
    setting when they cannot split the stage's batch (``batch_size``: its global rows, default the stage's). A
    global batch that does not divide the batch devices is fine: each step is padded with empty rows
    (``batching.layout_multiples``)."""
    processes, setting = jax.process_count(), int(config.data.get("num_shards", 0))
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


def _run_stage(run: StageRun):
    config, name, params, graphdef, shardings, mcfg, mesh, spec, ckpt, writer, workdir, global_step, resume, \
        extra_trainable = (run.config, run.name, run.params, run.graphdef, run.shardings, run.model_config, run.mesh,
                           run.spec, run.ckpt, run.writer, run.workdir, run.global_step, run.resume,
                           run.extra_trainable)
    sc = config.stages[name]
    processes, pid = jax.process_count(), jax.process_index()
    shards = data_shards(config, name, mcfg, mesh)
    num_shards, shard_ids, shard_batch_size = shards.num_shards, shards.shard_ids, shards.shard_batch_size
    batch_devices = shards.batch_devices
    layout = data_layout(num_shards, processes)  # recorded in every checkpoint, checked on resume
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.update(batch_size=shard_batch_size, max_length=sc.max_length)
    sources = load_sources(resolve_mixture(sc.mixture, workdir))
    made = [make_iterator(sources, data_cfg, shard_index=s, shard_count=num_shards) for s in shard_ids]
    iterators, counters = ShardIterators([m[0] for m in made]), [m[1] for m in made]
    info = D.tokenizer_info(mcfg.text.vocab_size)
    aspec = audio_spec(mcfg)

    trainable = stage_trainable(params, sc, mcfg, extra_trainable)
    trained = trainable.paths
    accum = int(sc.optimizer.get("grad_accum", 1))
    tx, schedule = make_optimizer(sc.optimizer, sc.num_steps, trainable)
    params = jax.device_put(params, shardings)
    init = lambda p: init_state(p, tx, config.seed)  # noqa: E731
    state_shapes = jax.eval_shape(init, params)
    state_sharding = state_shardings(state_shapes, shardings, mesh)
    start = 0
    if resume is None:
        state = jax.jit(init, out_shardings=state_sharding)(params)
    else:  # restore straight into the sharded layout; no throw-away optimiser state (the reject counts
        # travel inside the data iterators' state)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes,
                                state_sharding)
        state = ckpt.restore(int(resume["global_step"]), abstract, iterators)
        start = int(resume["stage_step"])
    step_fn = jax.jit(make_train_step(graphdef, tx, trainable, schedule, accum), donate_argnums=0,
                      out_shardings=(state_sharding, None))
    compiled: dict = {}  # one executable per batch shape (bucket)

    def train_step(state, batch):
        """Compiles ahead of time, then waits for every host before the first run: hosts compile at different
        speeds (a persistent-cache hit on one, a miss on another) and the step's first collective must not wait
        on a host that is still compiling."""
        key = (jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch)))
        if key not in compiled:
            compiled[key] = step_fn.lower(state, batch).compile()
            hosts.barrier(f"{name}_compiled")
        return compiled[key](state, batch)

    total = stage_micro_steps(config, name)
    log_every = int(config.train.log_every)
    peak = float(config.train.peak_flops_per_device) * jax.device_count()
    max_bad = int(config.train.max_nonfinite_in_a_row)
    last: dict[str, Any] = {"trained_leaves": len(trained)}
    tokens_seen, slots_seen, flops_seen, t0 = 0.0, 0.0, 0.0, time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=name, disable=pid != 0, dynamic_ncols=True)
    hosts.barrier(f"{name}_start")  # the first batch's all-gather must not wait on a host still compiling
    local_vision = batching.units_local(num_shards, batch_devices)
    if batch_devices > 1 and pid == 0:
        if local_vision:
            log.info("%s: %d data shards over %d batch devices: the ViT's attention and window permutation run on "
                     "each device's own patches", name, num_shards, batch_devices)
        else:
            log.warning("%s: %d data shards over %d batch devices: every device gathers the patch axis and repeats "
                        "the ViT's full-attention layers for the whole batch; data.num_shards=-1 (one shard per "
                        "batch device) keeps the ViT on each device's own patches", name, num_shards, batch_devices)
    with PreemptionWatch() as preemption, axis_rules(mesh, DEFAULT_RULES, units_local=local_vision):
        for micro in range(start, total):
            batch, local = global_batch(next(iterators), shard_ids, spec, shard_batch_size, info.pad_id, mesh,
                                         aspec, config.data.patch_buckets, num_shards)
            state, metrics = train_step(state, batch)
            global_step += 1
            tokens = float(local.text.attention_mask.sum()) * processes
            tokens_seen += tokens
            slots_seen += float(local.text.attention_mask.size) * processes
            flops_seen += flops.batch_train_flops(mcfg, local) * processes  # model FLOPs of the real tokens
            bar.update(1)
            done = micro + 1 == total
            if (micro + 1) % log_every == 0 or done:
                m = jax.device_get(metrics)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                rejected = sum(sum(c.summary()["rejected"].values()) for c in counters)
                record = {"stage": name, "step": micro + 1, "global_step": global_step,
                          **{k: m[k] for k in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "gate_weights",
                                               "lb_loss", "z_loss", "dropped_tokens")},
                          "skipped": int(not m["finite"]), "tokens_per_s": tokens_seen / elapsed,
                          # real (not padding) tokens per row slot since the last record: what packing raises
                          "real_token_fraction": tokens_seen / max(slots_seen, 1.0),
                          "mfu": flops_seen / elapsed / peak, "data_rejected": rejected}
                record = {k: v if isinstance(v, str) else to_python(v) for k, v in record.items()}
                writer.write(record)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}")
                tokens_seen, slots_seen, flops_seen, t0 = 0.0, 0.0, 0.0, time.perf_counter()
                last = dict(record, trained_leaves=len(trained))
                if int(m["nonfinite_in_a_row"]) >= max_bad:
                    raise RuntimeError(f"stage {name}: {int(m['nonfinite_in_a_row'])} non-finite updates in a row "
                                       f"at step {micro + 1}; stopping (train.max_nonfinite_in_a_row={max_bad})")
            preempted = preemption.reached(global_step)  # every host, every step: they agree on the step
            due = (micro + 1) % ckpt.every_steps == 0 and int(jax.device_get(state.nonfinite)) == 0
            if due or done or preempted:  # the stage's final step is always checkpointed
                meta = {"stage": name, "stage_step": micro + 1, "global_step": global_step, "data_layout": layout}
                ckpt.save(global_step, state, meta, iterators, force=done or preempted)
            if preempted:
                ckpt.wait()
                bar.close()
                raise Preempted(f"SIGTERM: saved step {global_step} of stage {name}; start again to resume")
    bar.close()
    ckpt.wait()
    return state.params, global_step, last


