"""The command-line layer (emoqwen_jax/cli/args.py, runtime/commands.py): every console script's and
benchmark's --help ends with examples, and
``--config=FILE:ARG`` with ``--config.a.b=VALUE`` overrides parses as ml_collections' config_flags does (the
oracle: absl flags with ``config_flags.DEFINE_config_file``, the parser the commands used before)."""

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from emoqwen_jax.cli import args as cli_args

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT}/configs/emotion_qwen.py"
# setup.py's console_scripts, as this checkout declares them: (name, module, function).
SCRIPTS = re.findall(r'"(emoqwen-[\w-]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text())
SUBCOMMANDS = {"emoqwen-data": ["demo", "check", "prepare"], "emoqwen-convert": ["from-hf", "to-hf", "merge-lora"]}


def _help(module: str, function: str, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(argv)
    assert exit_info.value.code == 0, exit_info.value.code
    return out.getvalue()


@pytest.mark.parametrize("name,module,function", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_every_console_script_help_ends_with_examples_of_itself(name, module, function):
    for sub in [[], *([s] for s in SUBCOMMANDS.get(name, []))]:
        text = _help(module, function, [*sub, "--help"])
        head, sep, examples = text.rpartition("\nExamples:\n")
        assert sep and head.startswith("usage: " + " ".join([name, *sub])), text[:200]
        commands = [line.strip() for line in examples.splitlines() if line.startswith("  ") and
                    not line.startswith("    ")]
        assert commands and all(c.startswith(" ".join([name, *sub])) for c in commands), examples


# bench/eval_throughput.py keeps a plain parser: it must run on checkouts older than emoqwen_jax.runtime.commands.
BENCH = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name not in ("machine.py", "eval_throughput.py"))


@pytest.mark.parametrize("script", BENCH)
def test_every_benchmark_help_ends_with_examples_of_itself(script):
    done = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    head, sep, examples = done.stdout.rpartition("\nExamples:\n")
    assert sep and head.startswith(f"usage: python bench/{script}"), done.stdout[:200]
    commands = [line.strip() for line in examples.splitlines() if line.startswith("  ") and not line.startswith("    ")]
    assert commands and all(c.startswith(f"python bench/{script}") for c in commands), examples


def test_the_scripts_are_the_ten_commands():
    assert {s[0] for s in SCRIPTS} == {f"emoqwen-{c}" for c in ("run-sample", "train", "convert", "data", "describe",
                                                                "eval", "score", "plan", "forgetting", "serve")}


def _ours(argv: list[str]) -> ml_collections.ConfigDict:
    parser = argparse.ArgumentParser(prog="t")
    cli_args.add_config_arg(parser, f"{CONFIG}:tiny")
    return cli_args.parse_config_args(parser, argv).config


def _config_flags(argv: list[str]) -> ml_collections.ConfigDict:
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", f"{CONFIG}:tiny", flag_values=values, sys_argv=["t", *argv])
    values(["t", *argv])
    return values.config


OVERRIDES = [
    # the documented command lines' forms
    f"--config={CONFIG}:demo --config.workdir=runs/demo",
    f"--config={CONFIG}:7b --config.workdir=/ckpt/run1 --config.init_from=/ckpt/Qwen2.5-VL-7B-Instruct "
    "--config.mesh.fsdp=-1 --config.mesh.data=1",
    f"--config={CONFIG}:7b --config.run_stages='(\"stage3_lora\",)' --config.model.audio.enabled=True",
    f"--config={CONFIG}:7b --config.stages.stage1_align.mixture=\"({{'manifest': '/d/a.jsonl', 'data_root': '/d'}},)\"",
    f"--config={CONFIG}:tiny --config.model.dtype=bfloat16 --config.model.compressor.gate_input=tokens "
    "--config.model.compressor.num_experts=3",
    f"--config={CONFIG}:demo --config.stages.stage3_video.eval_suite='[{{\"benchmark\": \"pope\", \"limit\": 2}}]'",
    # a value as the next argument, negative numbers, bool spellings, a float field given an int
    f"--config {CONFIG}:tiny --config.workdir runs/x --config.mesh.fsdp -1 --config.data.packing=false",
    "--config.distributed.auto=1 --config.train.watch_maintenance_events=False --config.data.fps=3",
    "--config.data.packing --config.seed=7",
    "--noconfig.data.packing",
]


@pytest.mark.parametrize("command", OVERRIDES)
def test_overrides_equal_ml_collections_config_flags(command):
    argv = shlex.split(command)
    assert _ours(argv).to_dict() == _config_flags(argv).to_dict()


def test_override_types_nested_keys_and_order():
    c = _ours(["--config.seed=3", "--config.data.fps", "1", "--config.mesh.fsdp=-1", "--config.run_stages=a",
               "--config.model.compressor.num_experts=4", "--config.seed=5", "--config.data.packing=TRUE"])
    assert c.seed == 5 and isinstance(c.data.fps, float) and c.data.fps == 1.0  # the last one wins
    assert c.mesh.fsdp == -1 and c.run_stages == ("a",) and c.model.compressor.num_experts == 4
    assert c.data.packing is True
    assert cli_args.parse_value(None, "(1, 2)") == (1, 2) and cli_args.parse_value(None, "abc") == "abc"
    assert cli_args.parse_value("", "'quoted'") == "'quoted'"  # a str field keeps the text as given
    assert cli_args.parse_value((), "[1, 2]") == (1, 2)
    assert cli_args.parse_value(ml_collections.ConfigDict({"a": 1}), "{'b': 2}").to_dict() == {"b": 2}
    rest, overrides = cli_args.split_config_overrides(["--x", "1", "--config.a.b", "--", "--config.c=2"])
    assert rest == ["--x", "1", "--", "--config.c=2"] and overrides == [("a.b", None)]


@pytest.mark.parametrize("argv,message", [
    (["--config.mesh.nope=1"], r"--config.mesh.nope: config.mesh has no field 'nope'; its fields: .*data"),
    (["--config.seed.x=1"], r"config.seed has no field 'x'; it is a int, not a config"),
    (["--config.seed=abc"], r"--config.seed=abc: not a valid int"),
    (["--config.data.packing=maybe"], r"--config.data.packing=maybe: not a valid bool"),
    (["--config.data.fps"], r"--config.data.fps needs a value \(float field\)"),
    (["--config=configs/none.py:tiny"], r"no config file 'configs/none.py'"),
])
def test_bad_overrides_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _ours(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err), message
