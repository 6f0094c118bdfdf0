"""Orbax checkpoints of a run: train state, metadata (stage, steps, config) and the data iterators' state.

    workdir/checkpoints/<global step>/{state, meta, data}   every ``config.checkpoint.every_steps`` (async)
    workdir/stages/<stage name>/                           each finished stage's weights (a model directory)

Every stage also checkpoints its final step (meta ``stage_step`` == the stage's micro-step count), before its
weights are written: a run stopped between the two finishes the stage from that checkpoint without training.
``workdir`` may be a URI (``gs://…``, see ``emoqwen_jax.storage``); all hosts must see the same one.

Resume order (read by the trainer): latest checkpoint -> its stage -> rebuild that stage's optimiser ->
restore state into the stage's abstract shapes and shardings -> restore the data iterators -> continue at the
next micro-step. Stages that finished before it are skipped; their final weights are on disk.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import grain
import orbax.checkpoint as ocp

from emoqwen_jax import storage


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
        for it, s in zip(self.iterators, states):
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
