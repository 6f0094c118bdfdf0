"""Run metrics: ``workdir/metrics.jsonl`` (one JSON object per logged step), TensorBoard event files, and a
loss-curve PNG per stage. Only process 0 writes."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def to_python(value: Any) -> Any:
    value = np.asarray(value)
    if value.ndim == 0:
        return value.item()
    return value.tolist()


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: to_python(v) if not isinstance(v, str) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record["global_step"])
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "global_step"):
                self._tb.add_scalar(f"{record['stage']}/{key}", value, step)
            elif isinstance(value, list) and key == "gate_weights":
                for e, w in enumerate(value):
                    self._tb.add_scalar(f"{record['stage']}/gate_weight_{e}", w, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_stage(workdir: str, stage: str) -> str:
    """PNG of loss, lm_loss and aux_loss against the stage's steps; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(workdir) if r.get("stage") == stage]
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    path = os.path.join(workdir, "plots", f"{stage}_loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "lm_loss", "aux_loss"):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_title(f"{stage}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
