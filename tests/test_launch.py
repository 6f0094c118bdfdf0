"""The cluster launchers' --dry-run output: the exact commands they would run (parsed back with shlex)."""

import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TPU = ["--tpu", "pod", "--zone", "us-east5-a", "--repo", "https://example.org/me/emoqwen_jax.git"]
FLAGS = ["--config=configs/emotion_qwen.py:7b", "--config.workdir=gs://bucket/run"]


def run(script, *args, env=None):
    res = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})), timeout=60)
    return res.returncode, [shlex.split(line) for line in res.stdout.splitlines() if line.strip()], res.stderr


def remote(argv):
    """(workers, remote shell command) of a printed `gcloud compute tpus tpu-vm ssh` command."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    workers = [a.split("=", 1)[1] for a in argv if a.startswith("--worker=")]
    return workers[0], argv[argv.index("--command") + 1]


def test_tpu_pod_train_installs_py311_venv_then_starts_in_background_everywhere():
    rc, cmds, err = run("tpu_pod.sh", "--dry-run", *TPU, "train", "--", *FLAGS)
    assert rc == 0, err
    (w1, install), (w2, start) = map(remote, cmds)
    assert w1 == w2 == "all"
    assert "uv venv --allow-existing --python 3.11 $HOME/emoqwen/venv" in install
    assert "git clone https://example.org/me/emoqwen_jax.git $HOME/emoqwen/repo" in install
    assert "uv pip install --python $HOME/emoqwen/venv/bin/python -e '.[tpu,gcs]'" in install
    assert "JAX_COMPILATION_CACHE_DIR=gs://bucket/run/jax_cache nohup $HOME/emoqwen/venv/bin/python -m " \
           "emoqwen_jax.cli.train --config=configs/emotion_qwen.py:7b --config.workdir=gs://bucket/run " \
           "--config.distributed.auto=True --config.train.watch_maintenance_events=True >> $HOME/emoqwen/train.log " \
           "2>&1 < /dev/null &" in start
    assert "echo $! > $HOME/emoqwen/train.pid" in start
    assert "emoqwen-train" not in install + start  # ~/.local/bin is not on a non-login ssh's PATH


def test_tpu_pod_requires_repo_and_workdir():
    rc, _, err = run("tpu_pod.sh", "--dry-run", "--tpu", "pod", "--zone", "z", "train", "--", *FLAGS)
    assert rc == 2 and "--repo is required" in err
    rc, _, err = run("tpu_pod.sh", "--dry-run", *TPU, "start", "--", FLAGS[0])
    assert rc == 2 and "--config.workdir" in err
    rc, _, err = run("tpu_pod.sh", "--dry-run", *TPU, "launch")
    assert rc == 2 and "unknown option launch" in err


def test_tpu_pod_status_logs_stop():
    rc, cmds, _ = run("tpu_pod.sh", "--dry-run", "--tpu", "pod", "--zone", "z", "status")
    workers, cmd = remote(cmds[0])
    assert rc == 0 and workers == "all" and "kill -0 $(cat $HOME/emoqwen/train.pid)" in cmd
    rc, cmds, _ = run("tpu_pod.sh", "--dry-run", "--tpu", "pod", "--zone", "z", "logs", "--worker", "3", "--follow")
    assert rc == 0 and remote(cmds[0]) == ("3", "tail -n 200 -F $HOME/emoqwen/train.log")
    rc, cmds, _ = run("tpu_pod.sh", "--dry-run", "--tpu", "pod", "--zone", "z", "stop")
    workers, cmd = remote(cmds[0])
    assert rc == 0 and workers == "all" and "kill -TERM $(cat $HOME/emoqwen/train.pid)" in cmd


def test_slurm_one_task_per_node_with_per_task_logs_requeue_and_term_signal():
    env = {"SLURM_JOB_NODELIST": "gpu017", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "eq"}
    rc, cmds, err = run("slurm_gpu.sbatch", "--dry-run", *FLAGS, env=env)
    assert rc == 0, err
    (argv,) = cmds
    assert argv[:3] == ["srun", "--ntasks=2", "--ntasks-per-node=1"]
    assert "--output=logs/eq-4242-task%t.log" in argv
    assert "JAX_COORDINATOR_ADDRESS=gpu017:12355" in argv and "JAX_NUM_PROCESSES=2" in argv
    assert argv[-len(FLAGS) - 3:] == ["python3", "-m", "emoqwen_jax.cli.train", *FLAGS]
    header = (ROOT / "launch" / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --requeue" in header and re.search(r"#SBATCH --signal=TERM@\d+", header)
    assert "scontrol requeue" in header


def test_local_multiprocess_dry_run():
    rc, cmds, err = run("local_multiprocess.sh", "--dry-run", "--num_processes", "2", "--devices_per_process", "4",
                        "--", "--config=configs/emotion_qwen.py:demo", "--config.mesh.fsdp=8",
                        env={"PYTHON": "python3"})
    assert rc == 0, err
    assert len(cmds) == 2
    for i, argv in enumerate(cmds):
        assert f"JAX_PROCESS_ID={i}" in argv and "JAX_NUM_PROCESSES=2" in argv
        assert argv[-6:] == ["python3", "-m", "emoqwen_jax.cli.train", "--config=configs/emotion_qwen.py:demo",
                             "--config.mesh.fsdp=8", "--config.distributed.local_device_count=4"]
