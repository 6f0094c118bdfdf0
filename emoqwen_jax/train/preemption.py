"""Preemption: a SIGTERM to any one host makes every host save the same step, then exit cleanly.

With several processes (``jax.distributed`` initialised), JAX's preemption service owns SIGTERM: the host that
receives it tells the coordinator, which picks one step (the largest step any host has reached, plus one) and
``multihost_utils.reached_preemption_sync_point(step)`` turns True on every host at that step and no other. So
all hosts enter the collective orbax save together; a host that acted on its own signal would wait in the save
for the others, which keep training (the job hangs). Cloud TPU maintenance events and SLURM's
``--signal=TERM@…`` arrive as that SIGTERM.

In one process a plain Python handler sets a flag checked after every step.
"""

from __future__ import annotations

import signal

import jax


def _sync_service_running() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None and \
        distributed.global_state.preemption_sync_manager is not None


class PreemptionWatch:
    """``with PreemptionWatch() as watch: ... if watch.reached(step): save and stop``.

    ``reached`` must be called at every step by every host, with steps that agree across hosts (the trainer's
    global step), as the sync protocol requires.
    """

    def __init__(self):
        self.received = False
        self._old = None
        self.synced = jax.process_count() > 1 and _sync_service_running()

    def __enter__(self) -> "PreemptionWatch":
        if self.synced:  # JAX's service installed its own SIGTERM handler at jax.distributed.initialize
            return self

        def handler(signum, frame):  # noqa: ARG001
            self.received = True

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. a test runner thread): no preemption handling
            self._old = None
        return self

    def reached(self, step: int) -> bool:
        """True at the step where every host saves (the same on all hosts)."""
        if self.synced:
            from jax.experimental import multihost_utils

            self.received = self.received or multihost_utils.reached_preemption_sync_point(int(step))
        return self.received

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


MAINTENANCE_URL = "http://metadata.google.internal/computeMetadata/v1/instance/maintenance-event"


def watch_maintenance_events(url: str = MAINTENANCE_URL, *, on_event=None, every_s: float = 5.0):
    """Starts a daemon thread that polls the GCE metadata server's maintenance-event every ``every_s`` seconds
    and, when it turns to anything but NONE (a TPU host about to be migrated or terminated), calls
    ``on_event(value)`` once — by default a SIGTERM to this process, which the preemption path above turns into
    an agreed save on every host. Returns the thread. (``config.train.watch_maintenance_events``;
    ``launch/tpu_pod.sh`` turns it on.)"""
    import os
    import threading
    import urllib.request

    def sigterm(value: str) -> None:  # noqa: ARG001
        os.kill(os.getpid(), signal.SIGTERM)

    on_event = on_event or sigterm
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})

    def poll() -> None:
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    value = response.read().decode().strip()
            except OSError:  # not on GCE, or a hiccup: keep polling
                value = "NONE"
            if value and value != "NONE":
                on_event(value)
                return
            threading.Event().wait(every_s)

    thread = threading.Thread(target=poll, name="maintenance-event-watch", daemon=True)
    thread.start()
    return thread
