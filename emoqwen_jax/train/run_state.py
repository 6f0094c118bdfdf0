"""A run's state on disk: orbax checkpoints of the train state, metadata (stage, steps, config) and the data
iterators' state.

    workdir/checkpoints/<global step>/{state, meta, data}   every ``config.checkpoint.every_steps`` (async)
    workdir/stages/<stage name>/                           each finished stage's weights (a model directory)

Every stage also checkpoints its final step (meta ``stage_step`` == the stage's micro-step count), before its
weights are written: a run stopped between the two finishes the stage from that checkpoint without training.
``workdir`` may be a URI (``gs://…``, see ``emoqwen_jax.runtime.storage``); all hosts must see the same one.

Resume order (read by the trainer): latest checkpoint -> its stage -> rebuild that stage's optimiser ->
restore state into the stage's abstract shapes and shardings -> restore the data iterators -> continue at the
next micro-step. Stages that finished before it are skipped; their final weights are on disk.

A data iterator's state belongs to one data shard (the shard index and count fix which samples it reads), so the
meta also records the data layout (``data_layout``): the global shard count and each process's shard indices. A
restart whose layout differs (another ``data.num_shards``, or another device or process count with
``data.num_shards=-1`` or 0) stops before any compute (``check_data_layout``) instead of feeding a saved state to
another slice of the data.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import grain
import orbax.checkpoint as ocp

from emoqwen_jax.runtime import storage


def data_layout(num_shards: int, process_count: int) -> dict:
    """The layout a run's iterator states belong to: ``num_shards`` global data shards, process p reading shards
    [p * n / P, (p + 1) * n / P) (``shard_ids[p]``; the trainer requires n to be a multiple of P). Stored in every
    checkpoint's meta as ``data_layout``."""
    per = num_shards // process_count
    return {"num_shards": num_shards, "process_count": process_count,
            "shard_ids": [list(range(p * per, (p + 1) * per)) for p in range(process_count)]}


def check_data_layout(saved: dict | None, current: dict, *, setting: int, step: int) -> None:
    """Stops a resume that would restore iterator states into other data shards: ValueError naming the
    ``data.num_shards`` (and process count) that gives the checkpoint's layout. ``saved``: the checkpoint meta's
    ``data_layout`` (None: a checkpoint written before layouts were recorded, not checked); ``setting``: this
    run's ``config.data.num_shards``."""
    if saved is None or (saved["num_shards"], saved["shard_ids"]) == (current["num_shards"], current["shard_ids"]):
        return
    n, processes = saved["num_shards"], saved["process_count"]
    fix = f"--config.data.num_shards={n}"
    if processes != current["process_count"]:
        fix += f" on {processes} processes (JAX_NUM_PROCESSES or --config.distributed.num_processes={processes})"
    raise ValueError(
        f"checkpoint {step} holds the data iterators of {n} data shards over {processes} process(es) (shards "
        f"{saved['shard_ids']} by process), but this run reads {current['num_shards']} shards over "
        f"{current['process_count']} (data.num_shards={setting} on this mesh and process count): the saved "
        f"iterator states would read other slices of the data. Resume with {fix}, or start a new workdir")


class ShardIterators:
    """The data iterators of this host's shards as one checkpointable object (grain's handler saves one
    JSON file per process)."""

    def __init__(self, iterators: Sequence[Any]):
        self.iterators = list(iterators)

    def __next__(self) -> list[dict]:
        return [next(it) for it in self.iterators]

    def get_state(self) -> bytes:
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state: bytes | str) -> None:
        states = json.loads(state)
        if len(states) != len(self.iterators):
            raise ValueError(f"checkpoint has {len(states)} data shards for this host, the run has "
                             f"{len(self.iterators)}; resume with the same mesh and process count")
        for it, s in zip(self.iterators, states, strict=True):
            it.set_state(s)

    def start_prefetch(self) -> None:
        """Called by grain's handler after a restore."""
        for it in self.iterators:
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


class Checkpointer:
    def __init__(self, workdir: str, *, every_steps: int, max_to_keep: int, async_save: bool = True):
        self.every_steps = int(every_steps)
        self.manager = ocp.CheckpointManager(
            storage.as_epath(storage.join(workdir, "checkpoints")),
            item_names=("state", "meta", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=int(max_to_keep),
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, data: ShardIterators, *, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(data)), force=force)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any, data: ShardIterators) -> Any:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
