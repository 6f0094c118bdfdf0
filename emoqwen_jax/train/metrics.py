"""Run metrics: ``workdir/metrics.jsonl`` (one JSON object per logged step), TensorBoard event files, and a
loss-curve PNG per stage. Only process 0 writes. ``workdir`` may be a URI (``emoqwen_jax.runtime.storage``): object
stores cannot append, so there the whole (small) metrics file is rewritten at each logged step."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from emoqwen_jax.runtime import storage


def to_python(value: Any) -> Any:
    value = np.asarray(value)
    if value.ndim == 0:
        return value.item()
    return value.tolist()


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = storage.join(workdir, "metrics.jsonl")
        self._tb = None
        self._lines: list[str] | None = None  # the whole file, for URIs (no append on object stores)
        if enabled:
            storage.makedirs(workdir)
            from tensorboardX import SummaryWriter

            if storage.is_uri(workdir):
                self._lines = storage.read_text(self.path).splitlines(True) if storage.exists(self.path) else []
                _register_tensorboard_scheme(storage.scheme(workdir))
            self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: to_python(v) if not isinstance(v, str) else v for k, v in record.items()}
        line = json.dumps(record) + "\n"
        if self._lines is None:
            with open(self.path, "a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            storage.write_text(self.path, "".join(self._lines))
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
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def plot_stage(workdir: str, stage: str) -> str:
    """PNG of loss, lm_loss and aux_loss (an RL stage: loss and reward) against the stage's steps; returns its
    path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(workdir) if r.get("stage") == stage]
    path = storage.join(workdir, "plots", f"{stage}_loss.png")
    storage.makedirs(storage.join(workdir, "plots"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in [k for k in ("loss", "lm_loss", "aux_loss", "reward") if rows and all(k in r for r in rows)]:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_title(f"{stage}")
    ax.legend()
    fig.tight_layout()
    with storage.open(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path


class _FsspecEventFile:
    """A TensorBoard event file on any fsspec filesystem (tensorboardX knows only local, gs:// and s3://)."""

    def __init__(self, path: str):
        self._f = storage.open(path, "wb")

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _FsspecFactory:
    def open(self, path: str) -> _FsspecEventFile:
        return _FsspecEventFile(path)

    def directory_check(self, path: str) -> None:
        storage.makedirs(path)


def _register_tensorboard_scheme(scheme: str) -> None:
    from tensorboardX import record_writer

    if scheme not in record_writer.REGISTERED_FACTORIES:
        record_writer.register_writer_factory(scheme, _FsspecFactory())
