"""The RL stage end to end (tiny model, demo clips): its metrics, resuming after kill -9 step for step, and
that the trainer refuses an RL stage without its runner."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from config_files import ROOT
from rl_configs import write_rl_config

from emoqwen_jax.train.trainer import train_and_evaluate

pytestmark = pytest.mark.slow  # trains RL stages

TIMINGS = ("rollout_s", "update_s")
PER_STEP = ("reward", "reward_format", "reward_vowels", "reward_std", "kl", "clip_fraction", "completion_length",
            "entropy", "loss", "grad_norm", "lr", "skipped")


def metric_rows(workdir) -> list[dict]:
    """metrics.jsonl rows; a last line still being written by a live process is ignored."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def train_cmd(cfg, workdir) -> list[str]:
    return [sys.executable, "-m", "emoqwen_jax.cli.train", f"--config={cfg}", f"--config.workdir={workdir}"]


def run_train(cfg, workdir) -> dict:
    """``emoqwen-train`` on ``cfg`` as a process that must succeed; its summary (the last JSON line)."""
    done = subprocess.run(train_cmd(cfg, workdir), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rl_demo_dir):
    """An uninterrupted 4-step run through emoqwen-train (a process like the interrupted ones: the tests'
    in-process matmul precision differs)."""
    root = tmp_path_factory.mktemp("rl_reference")
    workdir = str(root / "run")
    return workdir, run_train(write_rl_config(root / "cfg.py", rl_demo_dir), workdir)


def test_rl_stage_logs_every_metric_and_learns_from_its_rewards(reference):
    workdir, summary = reference
    rows = metric_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(PER_STEP + TIMINGS) <= set(r) and all(np.isfinite(r[k]) for k in PER_STEP + TIMINGS)
        assert r["reward"] == pytest.approx(r["reward_format"] + r["reward_vowels"], abs=1e-6)
        assert 0 <= r["clip_fraction"] <= 1 and r["kl"] >= 0 and r["skipped"] == 0
    assert all(r["reward_std"] > 0 for r in rows)  # groups with different rewards: non-zero advantages
    assert all(r["grad_norm"] > 0 for r in rows)
    assert all(r["kl"] > 0 for r in rows)  # after its first update the policy differs from the reference
    assert summary["final"] == os.path.join(workdir, "stages", "stage4_rl") and os.path.isdir(summary["final"])
    assert summary["final_loss"]["stage4_rl"] == rows[-1]["loss"]


@pytest.mark.slow
def test_kill_9_mid_stage_then_resume_gives_the_same_metrics_at_every_step(reference, tmp_path, rl_demo_dir):
    ref_dir, _ = reference
    cfg = write_rl_config(tmp_path / "cfg.py", rl_demo_dir)
    workdir = str(tmp_path / "run")
    cmd = train_cmd(cfg, workdir)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not any(r["step"] == 3 for r in metric_rows(workdir)):  # step 2 was checkpointed, 3 was not
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before step 3"
        assert time.time() < deadline, "step 3 was not logged in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in metric_rows(workdir)) == 3  # killed before the last step
    run_train(cfg, workdir)
    rows = metric_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]  # the restart resumed after step 2's checkpoint
    got = {r["step"]: r for r in rows}  # the last row of each step
    want = {r["step"]: r for r in metric_rows(ref_dir)}
    for step in (1, 2, 3, 4):
        for key in PER_STEP:
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])


def test_trainer_refuses_an_rl_stage_without_its_runner(tmp_path):
    sys.path.insert(0, str(ROOT / "configs"))
    import emotion_qwen

    config = emotion_qwen.get_config("tiny")
    config.run_stages = ("stage1_align", "stage4_rl")
    with pytest.raises(ValueError, match="kind 'rl' but no runner"):
        train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("weight", [1.0, -1.0])
def test_rounds_raise_a_learnable_reward_and_lower_it_when_its_weight_is_negative(tmp_path, rl_demo_dir, weight):
    """The whole loop learns from its rewards: 30 rounds from random weights move the share of vowels in the
    completions the way the reward's sign asks (measured: about 0.23 -> 0.49 with +1, 0.23 -> 0.04 with -1).
    The metrics test above checks that the weights move; this one checks that they move the right way."""
    cfg = write_rl_config(tmp_path / "cfg.py", rl_demo_dir, steps=30, every=100, extra=f"""
        s.rl.rewards = {{"vowels": {weight}}}
        s.rl.num_iterations = 1
        s.rl.normalization = "token"
        s.optimizer.learning_rate = 3e-2
        """)
    workdir = str(tmp_path / "run")
    run_train(cfg, workdir)
    share = [r["reward_vowels"] for r in metric_rows(workdir)]
    assert len(share) == 30
    first, last = np.mean(share[:5]), np.mean(share[-5:])
    assert (last - first) * weight > 0.1, (first, last)
