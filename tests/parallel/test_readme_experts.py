"""Every example in README.md and docs/*.md that sets ``num_experts`` runs as written (workdirs moved under
tmp_path)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains from the README's commands

ROOT = Path(__file__).resolve().parents[2]
# The README and the docs pages, one text (the scale-mode examples live in docs/sharding.md).
README = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
MODULES = {"emoqwen-train": "emoqwen_jax.cli.train", "emoqwen-run-sample": "emoqwen_jax.cli.run_sample",
           "emoqwen-plan": "emoqwen_jax.cli.plan"}


def bash_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if cmd.strip() and not cmd.lstrip().startswith("#"):
                out.append(" ".join(cmd.split()))
    return out


EXPERT_COMMANDS = [c for c in bash_commands(README) if "num_experts" in c and c.startswith("emoqwen-train")]
# Inline examples: a backticked run of --config overrides that sets num_experts.
INLINE = re.findall(r"`((?:--config\.\S+ ?)*--config\.model\.compressor\.num_experts=\d+(?: --config\.\S+)*)`", README)


def run(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def to_argv(cmd: str, tmp_path: Path) -> list[str]:
    args = shlex.split(cmd)
    args = [re.sub(r"^--config\.workdir=(.*)$", lambda m: f"--config.workdir={tmp_path / m.group(1)}", a)
            for a in args]
    return [sys.executable, "-m", MODULES[args[0]], *args[1:]]


def test_readme_has_the_expert_examples():
    assert len(EXPERT_COMMANDS) >= 2, EXPERT_COMMANDS  # scale mode and paper mode
    assert any("routing=token" in c for c in EXPERT_COMMANDS)
    assert INLINE, "the num_experts override example (docs/training.md, Configs) is gone"


@pytest.mark.parametrize("flags", INLINE)
def test_inline_override_example_runs(flags):
    res = run([sys.executable, "-m", MODULES["emoqwen-run-sample"], "--config=configs/emotion_qwen.py:tiny",
               *flags.split()], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    n = int(re.search(r"num_experts=(\d+)", flags).group(1))
    assert re.search(r"experts \((?:'[^']+', ){%d}'[^']+'\)" % (n - 1), res.stdout), res.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", EXPERT_COMMANDS)
def test_expert_training_example_runs_three_stages(cmd, tmp_path):
    res = run(to_argv(cmd, tmp_path), timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(summary["final_loss"]) == {"stage1_align", "stage2_emotion", "stage3_video"}
