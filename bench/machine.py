"""What every benchmark prints beside its figures: the machine and how loaded it was.

A figure taken while the machine is busy with other work is not a figure (a 2-core machine loaded by parallel
jobs once turned a 0.73x train-step ratio into a reported 2.84x). Every ``bench/`` script calls
``machine_info()`` before and after timing and puts the result in its JSON line; a run whose 1-minute load
average exceeded the core count at either point is marked ``"reliable": false``.
"""

from __future__ import annotations

import os
import platform


def machine_info(before: dict | None = None) -> dict:
    """{"cores", "load_avg" [1, 5, 15 min], "cpu", "reliable"}; pass the dict taken before timing to judge
    the whole run (unreliable if the load exceeded the core count before or after)."""
    cores = os.cpu_count() or 1
    load = [round(x, 2) for x in os.getloadavg()]
    reliable = load[0] <= cores and (before is None or before.get("reliable", True))
    info = {"cores": cores, "load_avg": load, "cpu": platform.processor() or platform.machine(),
            "reliable": bool(reliable)}
    if before is not None:
        info["load_avg_before"] = before["load_avg"]
    return info


def describe(info: dict) -> str:
    """One human line, e.g. ``2 cores, load 0.41/0.30/0.22 (reliable)``."""
    flag = "reliable" if info["reliable"] else "UNRELIABLE: load above the core count"
    return f"{info['cores']} cores, load {'/'.join(f'{x:.2f}' for x in info['load_avg'])} ({flag})"
