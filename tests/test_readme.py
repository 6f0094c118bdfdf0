"""The documentation's commands run in CI: every ```bash block of README.md and docs/*.md is either run here or
marked illustrative with a reason. The convention (CONTRIBUTING.md, "Testing the docs"):

    <!-- readme-test: KEY -->            the block is run by ``test_readme_blocks_run`` below (``RUNS[KEY]``)
    <!-- readme-test: tests/x/test_y.py -->  the block is run by that test module, which reads it from the docs
    <!-- illustrative: REASON -->        the block is not run, for REASON (e.g. it needs the 7B weights)

on the line right above the block. Keys are unique across all the files. The runner executes the block's own
text, so an edit to a block changes what runs; the few substitutions (tiny step counts, a tiny checkpoint for a
7B path, the first alternative of ``a|b``) are listed per block and each must still match the text, or the test
fails and says so. Blocks run
with bash (``set -e``) in one scratch directory shared by the module (with ``configs/`` and ``bench/`` linked
in), so a checkpoint trained by one block is reused by the next, and a command already run there verbatim
(the demo training appears in three blocks) runs once.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Every file whose bash blocks are held to the convention: the README first, then docs/ in name order.
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*(readme-test|illustrative):\s*(.*?)\s*-->\s*$")
TIMEOUT = 1800  # the demo's full training, a few minutes alone, on a busy CI machine

# The demo preset trains at full length, as written: the inference-demo block checks that the trained model's
# answers each name a class, which a model trained for a few steps does not do (it answers nothing). The
# substitution changes nothing; it checks that the blocks still train into runs/demo, where later blocks read.
DEMO_TRAIN = ("--config.workdir=runs/demo", "--config.workdir=runs/demo")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    text: str
    kind: str | None  # 'readme-test', 'illustrative' or None
    arg: str
    path: Path = README  # the Markdown file that holds the block

    def __str__(self) -> str:
        first = next((ln for ln in self.text.splitlines() if ln.strip() and not ln.startswith("#")), "")
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{name} line {self.line} (`{first.strip()[:70]}`)"


def readme_blocks(path: Path = README) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = start - 1
            while prev >= 0 and not lines[prev].strip():
                prev -= 1
            match = MARK.match(lines[prev].strip()) if prev >= 0 else None
            blocks.append(Block(start + 1, "\n".join(body) + "\n", match.group(1) if match else None,
                                match.group(2) if match else "", path))
        i += 1
    return blocks


def doc_blocks() -> list[Block]:
    """The bash blocks of README.md and every docs/*.md page, in that order."""
    return [b for path in DOC_FILES for b in readme_blocks(path)]


def first_alternatives(text: str) -> str:
    """Synopsis -> command: ``[--opt a|b]`` becomes ``--opt a`` (optional groups taken, first choice)."""
    text = re.sub(r"\[([^\[\]]*)\]", r"\1", text)
    return re.sub(r"(\S+)\|\S+", r"\1", text)


def commands(text: str) -> list[str]:
    """A block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#[^'\"]*$", "", line.strip())  # a trailing comment (memo key: the command alone)
        if line and not line.startswith("#"):
            out.append(line)
    return out


# key -> (substitutions (old, new) applied in order, each must occur; fixtures the block needs; transform)
RUNS = {
    "quickstart": dict(subs=[("pip install torch==2.13.0 && pip install -e '.[test]' && ", ""),  # CI installed it
                             ("python -m pytest -q -n 2 tests", "true  # the suite that runs this test"),
                             DEMO_TRAIN]),
    "train-demo": dict(subs=[DEMO_TRAIN]),
    "config-override": dict(subs=[]),
    "convert-from-hf": dict(subs=[("/path/to/Qwen2.5-VL-7B-Instruct", "{hf_dir}")], synopsis=True, needs=["hf_dir"]),
    "convert-to-hf": dict(subs=[], synopsis=True, needs=["convert-from-hf"]),
    "inference-demo": dict(subs=[], needs=["quickstart"]),
    "general-eval": dict(subs=[DEMO_TRAIN, ("eval_out/a/report.json", "forgetting_out/before/report.json"),
                               ("eval_out/b/report.json", "forgetting_out/after/report.json")],
                         needs=["quickstart"]),
    "lora": dict(subs=[("configs/emotion_qwen.py:7b", "configs/emotion_qwen.py:demo"),
                       (" \\\n    --config.stages.stage3_lora.mixture=\"({'manifest': '/data/video.jsonl', "
                        "'data_root': '/data'},)\"", ""),  # the demo preset reads the demo set
                       ("--config.init_from=/ckpt/emoqwen-7b", "--config.init_from=runs/demo/stages/stage3_video"),
                       ("--config.run_stages='(\"stage3_lora\",)'",
                        "--config.run_stages='(\"stage3_lora\",)' --config.stages.stage3_lora.num_steps=2"),
                       ("/ckpt/", "root/ckpt/"), ("/hf/", "root/hf/")],  # absolute paths, under the scratch dir
                 needs=["quickstart"]),
    "plan-multislice": dict(subs=[]),
    "data": dict(subs=[("python bench/data_throughput.py", "python bench/data_throughput.py --clips 2 --workers 0")]),
}


RUN_TEXT: dict[str, str] = {}  # key -> the text that ran (after substitutions)


def test_every_bash_block_is_run_or_illustrative():
    problems, keys = [], []
    for b in doc_blocks():
        if b.kind is None:
            problems.append(f"{b}: no test runs it and it is not marked; put `<!-- readme-test: KEY -->` (and a "
                            f"runner in tests/test_readme.py) or `<!-- illustrative: REASON -->` right above it")
        elif b.kind == "illustrative" and len(b.arg) < 10:
            problems.append(f"{b}: `illustrative` needs a reason (why it cannot run in CI)")
        elif b.kind == "readme-test" and b.arg.endswith(".py"):  # run by another test module
            other, doc = ROOT / b.arg, str(b.path.relative_to(ROOT))
            if not other.is_file() or not ("README" in other.read_text() or doc in other.read_text()):
                problems.append(f"{b}: {b.arg} does not exist or does not read the docs")
        elif b.kind == "readme-test":
            if b.arg not in RUNS:
                problems.append(f"{b}: readme-test key {b.arg!r} has no runner; known: {sorted(RUNS)}")
            keys.append(b.arg)
    for key in RUNS:
        if keys.count(key) != 1:
            problems.append(f"runner {key!r} is used by {keys.count(key)} doc blocks (must be exactly 1)")
    assert not problems, "\n".join(problems)


def test_synopsis_and_command_parsing(tmp_path):
    assert first_alternatives("x --a [--dtype f32|bf16] [--overwrite]") == "x --a --dtype f32 --overwrite"
    assert commands("# c\na \\\n   b\n\nc\n") == ["a b", "c"]
    text = "```bash\nls\n```\n\n<!-- illustrative: needs the 7B weights -->\n```bash\nrm\n```\n"
    path = tmp_path / "README.md"
    path.write_text(text)
    first, second = readme_blocks(path)
    assert (first.kind, second.kind, second.arg) == (None, "illustrative", "needs the 7B weights")


class Workspace:
    """One scratch directory for every block; remembers the commands it already ran there."""

    def __init__(self, path: Path, env: dict):
        self.path, self.env, self.done, self.outputs = path, env, set(), {}

    def run(self, cmd: str) -> str:
        if cmd in self.done:
            return self.outputs[cmd]
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=self.path, env=self.env,
                             capture_output=True, text=True, timeout=TIMEOUT)
        if res.returncode != 0:
            raise AssertionError(f"doc command failed (exit {res.returncode}) in {self.path}:\n  {cmd}\n"
                                 f"stdout tail:\n{res.stdout[-2000:]}\nstderr tail:\n{res.stderr[-4000:]}")
        self.done.add(cmd)
        self.outputs[cmd] = res.stdout
        return res.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    path = tmp_path_factory.mktemp("readme")
    for name in ("configs", "bench"):
        (path / name).symlink_to(ROOT / name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu", PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    env.pop("XLA_FLAGS", None)  # the CLIs run as users run them: one CPU device
    return Workspace(path, env)


@pytest.fixture(scope="module")
def block_runner(workspace, tmp_path_factory):
    blocks = {b.arg: b for b in doc_blocks() if b.kind == "readme-test"}
    ran: dict[str, list[str]] = {}
    values: dict[str, str] = {}

    def hf_dir() -> str:
        import hf_oracle as O

        path = tmp_path_factory.mktemp("readme_hf")
        O.build_hf_model("base", seed=0).save_pretrained(path)
        return str(path)

    failed: set[str] = set()

    def run(key: str) -> list[str]:
        if key in ran:
            return ran[key]
        if key in failed:
            raise AssertionError(f"depends on the doc block [readme-test: {key}], which failed")
        try:
            return _run(key)
        except BaseException:
            failed.add(key)
            raise

    def _run(key: str) -> list[str]:
        if key not in blocks:
            pytest.fail(f"no block in README.md or docs/ is marked `<!-- readme-test: {key} -->`")
        spec = RUNS[key]
        for need in spec.get("needs", []):
            if need == "hf_dir":
                values.setdefault("hf_dir", hf_dir())
            else:
                run(need)
        text = blocks[key].text
        for old, new in spec["subs"]:
            if old not in text:
                pytest.fail(f"{blocks[key]} [readme-test: {key}]: the substitution {old!r} no longer matches the "
                            f"block's text; update RUNS[{key!r}] in tests/test_readme.py")
            text = text.replace(old, new.replace("{hf_dir}", values.get("hf_dir", "{hf_dir}")))
        if spec.get("synopsis"):
            text = first_alternatives(text)
        RUN_TEXT[key] = text
        ran[key] = [workspace.run(cmd) for cmd in commands(text)]
        return ran[key]

    return run


def _last_json(output: str) -> dict | list:
    return json.loads(output.strip().splitlines()[-1])


def requested_experts(command: str, ws: Path) -> int:
    """The compressor's expert count in the run config a command asks for: its ``--config=FILE:PRESET`` and
    ``--config.*`` overrides, parsed by ml_collections as the command line parses them."""
    from absl import flags
    from ml_collections import config_flags

    from emoqwen_jax.model import ModelConfig

    argv = ["emoqwen-run-sample", *(a.replace("--config=", f"--config={ws}/", 1) for a in shlex.split(command)
                                     if a.startswith("--config"))]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return ModelConfig.from_run_config(values.config).compressor.num_experts


def check_run_sample(text: str, output: str, ws: Path) -> None:
    """One row of gate weights per item (the sample's image and video), each a distribution over the experts
    the command's config asks for."""
    sample = _last_json(output)
    experts = requested_experts(commands(text)[-1], ws)
    assert sample["logits_shape"] and len(sample["gate_weights"]) == 2, sample
    for row in sample["gate_weights"]:
        assert len(row) == experts and min(row) >= 0 and abs(sum(row) - 1) < 1e-3, (row, experts)


def check_dfew_answers(describe_output: str, score_output: str, ws: Path) -> None:
    """describe's answer and every answer in the eval's file name exactly one DFEW class (the demo model learned
    the demo's expressions), and the score's UAR and WAR are what sklearn computes from that file and the
    label CSV (DFEW's ids 1..7 in its class order)."""
    import csv

    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from emoqwen_jax.eval.emotion.benchmarks import get_benchmark
    from emoqwen_jax.eval.parse import LabelParser

    classes = get_benchmark("dfew").classes
    parse = LabelParser(classes)
    answer = (describe_output.strip().splitlines() or [""])[-1]
    assert parse(answer).valid, f"describe answered {answer!r}, no single DFEW class"
    rows = [json.loads(line) for line in (ws / "eval_out/dfew/eval_dfew.jsonl").read_text().splitlines()]
    parsed = {row["id"]: parse(row["response"]) for row in rows}
    assert len(parsed) == len(rows), "an id answered twice"
    invalid = {k: (row["response"], p.reason) for (k, p), row in zip(parsed.items(), rows, strict=True) if not p.valid}
    assert not invalid, invalid
    with open(ws / "runs/demo/demo_data/eval_dfew.csv") as f:
        truth = {r["video_name"]: int(r["label"]) - 1 for r in csv.DictReader(f)}
    assert sorted(parsed) == sorted(truth)
    y_true = [truth[k] for k in parsed]
    y_pred = [classes.index(p.label) for p in parsed.values()]
    score = _last_json(score_output)
    assert score["n"] == len(rows) > 0 and score["invalid_rate"] == 0
    assert abs(score["uar"] - balanced_accuracy_score(y_true, y_pred)) <= 1e-6, score  # the report rounds to 6
    assert abs(score["war"] - accuracy_score(y_true, y_pred)) <= 1e-6, score


def check_outputs(key: str, outputs: list[str], ws: Path) -> None:
    """What each block must have produced, beyond exiting 0."""
    assert outputs and all(isinstance(o, str) for o in outputs)
    if key in ("quickstart", "train-demo"):
        for stage in ("stage1_align", "stage2_emotion", "stage3_video"):
            assert (ws / "runs/demo/stages" / stage / "config.json").exists()
    elif key == "config-override":
        check_run_sample(RUN_TEXT[key], outputs[-1], ws)
    elif key == "convert-from-hf":
        assert _last_json(outputs[-1])["dtype"] == "float32"
        assert (ws / "ckpt/emoqwen-7b/config.json").exists()
    elif key == "convert-to-hf":
        assert (ws / "hf/emoqwen-7b/config.json").exists()
        assert list((ws / "hf/emoqwen-7b").glob("*.safetensors"))
    elif key == "inference-demo":
        check_dfew_answers(outputs[0], outputs[-1], ws)
    elif key == "plan-multislice":
        report = _last_json(outputs[-1])
        assert report["num_slices"] == 2 and report["mesh"]["data"] == 2 and report["per_device_bytes"] > 0
    elif key == "general-eval":
        assert (ws / "forgetting_out/forgetting.md").exists()
        assert (ws / "forgetting_out/before/report.json").exists()
    elif key == "lora":
        assert (ws / "root/ckpt/emoqwen-7b-lora-merged/config.json").exists()
        assert (ws / "root/hf/emoqwen-7b-lora/adapter_config.json").exists()
    elif key == "data":
        assert _last_json(outputs[1])["ok"] > 0
        assert "machine" in _last_json(outputs[-1])


@pytest.mark.slow
def test_readme_blocks_run(block_runner, workspace):
    """Every `readme-test` block, in README then docs/ order, in one test (so one xdist worker shares the scratch
    directory and the trained demo checkpoint). Every failing block is reported, by line and key."""
    failures = []
    for block in doc_blocks():
        if block.kind != "readme-test" or block.arg not in RUNS:
            continue  # reported by test_every_bash_block_is_run_or_illustrative
        try:
            check_outputs(block.arg, block_runner(block.arg), workspace.path)
        except (AssertionError, subprocess.TimeoutExpired, pytest.fail.Exception) as e:
            failures.append(f"{block} [readme-test: {block.arg}]: {e}")
    assert not failures, "\n\n".join(failures)


def test_commands_are_split_as_bash_would():
    block = "emoqwen-x --a 1 \\\n    --b '(\"s\",)'   # trailing comment\n"
    (cmd,) = commands(block)
    assert shlex.split(cmd, comments=True) == ["emoqwen-x", "--a", "1", "--b", '("s",)']


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation but '-' and '_' dropped, spaces
    to '-'; fenced code is skipped."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_relative_links_in_the_docs_resolve():
    """Every relative link of README.md, CONTRIBUTING.md, bench/RESULTS.md and docs/*.md names a file of the
    repository, and its #anchor a heading of that file (pages in PLANNED may be linked before they exist)."""
    problems = []
    for page in [*DOC_FILES, ROOT / "CONTRIBUTING.md", ROOT / "bench" / "RESULTS.md"]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                if dest.relative_to(ROOT).as_posix() not in PLANNED:
                    problems.append(f"{page.relative_to(ROOT)}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
                problems.append(f"{page.relative_to(ROOT)}: link to {target}: no heading with that anchor")
    assert not problems, "\n".join(problems)


# docs/ pages that are written alongside the code they describe, linked from the README's table already.
PLANNED = {"docs/serving.md", "docs/engine.md", "docs/rl.md", "docs/training_math.md"}
