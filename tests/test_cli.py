"""The README's main command and the converter, run as a user runs them (subprocesses)."""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import hf_oracle as O
import pytest

from emoqwen_jax.model_dir import load_model

pytestmark = pytest.mark.slow  # runs the commands end to end

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_entry_points_are_installed():
    names = {e.name for e in metadata.entry_points(group="console_scripts")}
    assert {"emoqwen-run-sample", "emoqwen-convert", "emoqwen-data"} <= names


def test_run_sample_tiny():
    res = _run("emoqwen_jax.cli.run_sample", "--config=configs/emotion_qwen.py:tiny")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    batch, length, vocab = summary["logits_shape"]
    assert batch == 2 and vocab == 1024 and length > 40  # system prompt + question + vision tokens
    assert len(summary["gate_weights"]) == 2
    for row in summary["gate_weights"]:
        assert abs(sum(row) - 1.0) < 1e-3


def test_convert_from_hf_cli(tmp_path):
    hf = tmp_path / "hf"
    O.build_hf_model("base", seed=1).save_pretrained(hf)
    res = _run("emoqwen_jax.cli.convert", "from-hf", "--hf_dir", str(hf), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    model = load_model(info["out"])
    assert model.config.compressor.num_experts == 2 and info["parameters"] > 0
    again = _run("emoqwen_jax.cli.convert", "from-hf", "--hf_dir", str(hf), "--out", str(tmp_path / "out"))
    assert again.returncode == 2 and "already holds a model" in again.stderr
    missing = _run("emoqwen_jax.cli.convert", "from-hf", "--hf_dir", str(tmp_path / "nope"),
                   "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
