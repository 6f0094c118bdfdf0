"""Multi-host coordination: barriers through the coordination service, and checks that every host sees the same
run before any compute (a shared workdir and the starting weights).

A workdir that is a local folder on each host looks fine until the first collective checkpoint, which then
writes half a checkpoint per host and can never be resumed. Each host writes a marker file under
``workdir/.hosts/<token>/`` (the token is drawn by process 0 and broadcast, so old markers never count);
process 0 lists them and every host raises the same error when some are missing.
"""

from __future__ import annotations

import socket

import jax
import numpy as np

from emoqwen_jax.runtime import storage

_BARRIERS = [0]  # barrier ids must be unique: every host calls barrier() in the same order


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process gets here, through the coordination service (no device collective): a long
    compile on one host then cannot time out another host's first collective (gloo on CPU gives up after 30 s)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    _BARRIERS[0] += 1
    distributed.global_state.client.wait_at_barrier(f"emoqwen_{name}_{_BARRIERS[0]}", timeout_s * 1000)


def _gather(flag: bool) -> np.ndarray:
    """``flag`` of every process, in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).reshape(-1)


def check_shared_workdir(workdir: str) -> None:
    """Raises ValueError on every host when process 0 does not see all hosts' markers in ``workdir``."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    pid, count = jax.process_index(), jax.process_count()
    token = int(multihost_utils.broadcast_one_to_all(
        np.asarray(np.random.default_rng().integers(1, 2**31 - 1), np.int32)))
    markers = storage.join(workdir, ".hosts", f"{token:08x}")
    storage.write_text(storage.join(markers, f"process_{pid}"), socket.gethostname())
    barrier("workdir_markers")
    seen = np.ones(count, np.int32)
    if pid == 0:
        seen = np.asarray([storage.exists(storage.join(markers, f"process_{i}")) for i in range(count)], np.int32)
    seen = np.asarray(multihost_utils.broadcast_one_to_all(seen))
    barrier("workdir_checked")
    if pid == 0:
        storage.remove(storage.join(workdir, ".hosts"))
    missing = [i for i in range(count) if not seen[i]]
    if missing:
        raise ValueError(f"workdir {workdir!r} is not shared across hosts: process 0 does not see the marker files "
                         f"of processes {missing}. Give every host the same shared location (a gs:// URI, NFS, "
                         f"Lustre); a per-host local folder cannot hold one multi-host checkpoint")


def check_present(path: str, what: str) -> None:
    """Raises ValueError (on every host) naming the processes on which ``path`` does not exist."""
    here = storage.exists(path)
    if jax.process_count() == 1:
        if not here:
            raise ValueError(f"{what} {path!r} does not exist")
        return
    present = _gather(here)
    missing = [i for i, ok in enumerate(present) if not ok]
    if missing:
        raise ValueError(f"{what} {path!r} does not exist on processes {missing} (of {len(present)}); every host "
                         f"must see it (copy it to each host or use a shared location such as gs://)")
