"""Resume after SIGKILL and after SIGTERM, checked so that neither test can pass by accident.

* The run is frozen (SIGSTOP) as soon as it logs a given step of a stage; the last step it logged is then read,
  so the test knows, rather than hopes, that the kill lands after that step and before the stage ends.
* The restarted process must start right after the checkpoint it resumes from (its first metrics row), and
  must not re-run a finished stage.
* Against an uninterrupted run of the same config: every logged step's loss, lm_loss, aux_loss, grad_norm, lr
  and gate weights are equal (float equality), the saved stage weights are bit-identical, and so are the
  parameters and optimizer state of every checkpoint both runs wrote after the interruption.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from config_files import ROOT, load_config
from flax import nnx
from tolerance import assert_close_rel
from train_configs import write_config

from emoqwen_jax.model_dir import load_model
from emoqwen_jax.train.trainer import train_and_evaluate

STEPS = 8  # per stage; checkpoints every 2 steps
COMPARED = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "gate_weights")


def metric_rows(workdir) -> list[dict]:
    """metrics.jsonl rows; a last line still being written by the live process is ignored."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    return rows


def by_step(rows) -> dict:
    """{(stage, step): row}, the last row per step (a resumed run re-logs steps after its checkpoint)."""
    return {(r["stage"], r["step"]): r for r in rows}


def assert_same_metrics(got_rows, want_rows):
    got, want = by_step(got_rows), by_step(want_rows)
    assert sorted(got) == sorted(want)
    for key in want:
        for name in COMPARED:
            assert got[key][name] == want[key][name], (key, name, got[key][name], want[key][name])


def assert_trees_identical(got, want, what):
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves], what
    assert got_leaves, what
    for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (what, path)
        assert a.tobytes() == b.tobytes(), (what, jax.tree_util.keystr(path))  # bit for bit


def stage_params(workdir, stage):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model(os.path.join(workdir, "stages", stage)),
                                                               nnx.Param)))


def checkpoint_steps(workdir) -> set[int]:
    root = os.path.join(workdir, "checkpoints")
    return {int(p) for p in os.listdir(root) if p.isdigit()} if os.path.isdir(root) else set()


def checkpoint_state(workdir, step):
    """The saved train state (params, optimizer state, counters, rng) as numpy, restored without a target."""
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def checkpoint_meta(workdir, step) -> dict:
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), item_names=("meta",),
                                    item_handlers={"meta": ocp.JsonCheckpointHandler()})
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def assert_checkpoints_identical(workdir, reference, after_step):
    common = sorted(s for s in checkpoint_steps(workdir) & checkpoint_steps(reference) if s > after_step)
    assert common, (checkpoint_steps(workdir), checkpoint_steps(reference), after_step)
    for step in common:
        assert_trees_identical(checkpoint_state(workdir, step), checkpoint_state(reference, step),
                               f"checkpoint {step}")
    return common


def train_cmd(cfg, workdir):
    return [sys.executable, "-m", "emoqwen_jax.cli.train", f"--config={cfg}", f"--config.workdir={workdir}"]


def freeze_after(proc, workdir, stage, step, timeout=900):
    """Waits until the run logs ``step`` of ``stage``, stops the process (SIGSTOP) and returns the last
    (stage, step) it had logged: the point the interruption provably comes after."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (stage, step) in by_step(metric_rows(workdir)):
            proc.send_signal(signal.SIGSTOP)
            last = metric_rows(workdir)[-1]
            return last["stage"], last["step"]
        if proc.poll() is not None:
            pytest.fail(f"the training process exited (code {proc.returncode}) before logging {stage} step {step}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{stage} step {step} was not logged within {timeout} s")


def run_uninterrupted(cfg, workdir) -> None:
    """The uninterrupted run of ``cfg``, as a process like the interrupted ones: float equality needs the same
    XLA setup, and this test process differs (8 host devices from conftest, whose thread split changes the last
    bits of some CPU dot products)."""
    res = subprocess.run(train_cmd(cfg, workdir), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir):
    """The uninterrupted run: stage 1 and stage 2, STEPS steps each."""
    root = tmp_path_factory.mktemp("resume_ref")
    run_uninterrupted(write_config(root / "cfg.py", demo_dir, steps=STEPS), root / "run")
    return root / "run"


def rerun_and_check_resumed(cfg, workdir, stage: str, saved_step: int, steps: int) -> None:
    """Runs the same command again; it must log exactly ``stage``'s steps after ``saved_step`` up to ``steps``."""
    logged_before = len(metric_rows(workdir))
    res = subprocess.run(train_cmd(cfg, workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = metric_rows(workdir)[logged_before:]
    assert [(r["stage"], r["step"]) for r in resumed] == [(stage, s) for s in range(saved_step + 1, steps + 1)]


@pytest.mark.slow
def test_sigkill_mid_stage2_then_resume_matches_uninterrupted(reference, tmp_path, demo_dir):
    cfg = write_config(tmp_path / "cfg.py", demo_dir, steps=STEPS)
    workdir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(cfg, workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage, killed_after = freeze_after(proc, workdir, "stage2_emotion", 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stage == "stage2_emotion" and 3 <= killed_after < STEPS, (stage, killed_after)
    assert not (workdir / "stages" / "stage2_emotion").exists()
    assert (workdir / "stages" / "stage1_align").exists()
    latest = max(checkpoint_steps(workdir))
    meta = checkpoint_meta(workdir, latest)
    assert meta["stage"] == "stage2_emotion" and 2 <= meta["stage_step"] <= killed_after, meta
    # The restart resumes from that checkpoint: stage 1 is not re-run, stage 2 continues at the next step.
    rerun_and_check_resumed(cfg, workdir, "stage2_emotion", meta["stage_step"], STEPS)

    assert_same_metrics(metric_rows(workdir), metric_rows(reference))
    for name in ("stage1_align", "stage2_emotion"):
        assert_trees_identical(stage_params(workdir, name), stage_params(reference, name), name)
    assert_checkpoints_identical(workdir, reference, after_step=latest)


@pytest.mark.slow
def test_sigterm_checkpoint_is_resumed_and_matches_uninterrupted(tmp_path, demo_dir):
    steps = 12
    cfg = write_config(tmp_path / "cfg.py", demo_dir, stages=("stage1_align",), steps=steps, every=3)
    workdir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(cfg, workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, stopped_after = freeze_after(proc, workdir, "stage1_align", 2)
    proc.send_signal(signal.SIGTERM)  # delivered when the process continues
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in out
    saved = max(checkpoint_steps(workdir))
    meta = checkpoint_meta(workdir, saved)
    assert meta["stage"] == "stage1_align" and stopped_after <= meta["stage_step"] < steps, (meta, stopped_after)
    assert f"SIGTERM: saved step {saved} " in out
    assert not (workdir / "stages" / "stage1_align").exists()
    rerun_and_check_resumed(cfg, workdir, "stage1_align", meta["stage_step"], steps)

    run_uninterrupted(cfg, tmp_path / "uninterrupted")
    assert_same_metrics(metric_rows(workdir), metric_rows(tmp_path / "uninterrupted"))
    assert_trees_identical(stage_params(workdir, "stage1_align"),
                           stage_params(tmp_path / "uninterrupted", "stage1_align"), "stage1_align")
    assert_checkpoints_identical(workdir, tmp_path / "uninterrupted", after_step=saved)


def _run_in_process(cfg_path, workdir, *, devices: int, num_shards: int, steps: int):
    """One in-process run of ``cfg_path`` on the first ``devices`` devices with these data settings."""
    config = load_config(cfg_path)
    config.workdir = str(workdir)
    config.mesh.num_devices = devices
    config.data.num_shards = num_shards
    config.stages.stage1_align.num_steps = steps
    return train_and_evaluate(config)


@pytest.mark.slow
def test_resume_refuses_a_changed_data_layout(tmp_path, demo_dir, monkeypatch):
    """A run saved with one data shard (1 device, data.num_shards=-1) restarted on 2 devices would give the saved
    iterator state to shard 0 of 2: it stops before any compute and names the setting; with that setting the
    2-device restart reads the same data as a 1-device one (same losses)."""
    import shutil

    from emoqwen_jax.train import trainer

    cfg = write_config(tmp_path / "cfg.py", demo_dir, stages=("stage1_align",), steps=2)
    workdir = tmp_path / "run"
    _run_in_process(cfg, workdir, devices=1, num_shards=-1, steps=2)
    meta = checkpoint_meta(workdir, 2)
    assert meta["data_layout"] == {"num_shards": 1, "process_count": 1, "shard_ids": [[0]]}
    shutil.copytree(workdir, tmp_path / "one_device")
    rows, steps = metric_rows(workdir), checkpoint_steps(workdir)

    def no_compute(*args, **kwargs):
        raise AssertionError("compute started before the data layout was checked")

    with monkeypatch.context() as m:
        m.setattr(trainer, "initial_params", no_compute)
        m.setattr(trainer, "_run_stage", no_compute)
        # A finished stage restores no iterator: another mesh goes on to the next stage (none here).
        _run_in_process(cfg, workdir, devices=2, num_shards=-1, steps=2)
        with pytest.raises(ValueError, match=r"1 data shards over 1 process.*reads 2 shards.*"
                                             r"--config\.data\.num_shards=1\b"):
            _run_in_process(cfg, workdir, devices=2, num_shards=-1, steps=4)  # -1: one shard per device
        with pytest.raises(ValueError, match=r"reads 2 shards .*data\.num_shards=2 .*--config\.data\.num_shards=1\b"):
            _run_in_process(cfg, workdir, devices=1, num_shards=2, steps=4)  # an explicit other count
    assert metric_rows(workdir) == rows and checkpoint_steps(workdir) == steps  # nothing ran, nothing written

    # The named setting resumes on 2 devices; a 1-device run from the same checkpoint logs the same losses.
    _run_in_process(cfg, workdir, devices=2, num_shards=1, steps=4)
    _run_in_process(cfg, tmp_path / "one_device", devices=1, num_shards=-1, steps=4)
    got, want = metric_rows(workdir)[len(rows):], metric_rows(tmp_path / "one_device")[len(rows):]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 4]
    assert_close_rel([r["loss"] for r in got], [r["loss"] for r in want], 1e-5, what="losses after the resume")
    assert checkpoint_meta(workdir, 4)["data_layout"] == meta["data_layout"]


def test_data_layout_check_names_the_process_count():
    from emoqwen_jax.train.run_state import check_data_layout, data_layout

    saved = data_layout(4, 2)
    assert saved["shard_ids"] == [[0, 1], [2, 3]]
    check_data_layout(saved, data_layout(4, 2), setting=0, step=7)  # same layout: resumes
    check_data_layout(None, data_layout(8, 1), setting=-1, step=7)  # a checkpoint without a recorded layout
    with pytest.raises(ValueError, match=r"--config\.data\.num_shards=4 on 2 processes"):
        check_data_layout(saved, data_layout(4, 1), setting=4, step=7)  # same count, other shards per process
