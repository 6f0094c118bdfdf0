"""Parameters sharded across processes: 2 jax.distributed CPU processes x 4 devices, FSDP over all 8, the three
stages, started through launch/local_multiprocess.sh as a user would.

One uninterrupted run (module fixture) is the reference for: the same run in ONE process with 8 devices (the
multi-host test: losses, gradient norms and final parameters agree), kill -9 of every process in the middle of
stage 2 then the same command again (bit-identical losses, gradient norms, gate weights and final parameters),
and SIGTERM to process 1 alone (both processes save the same step and exit 0; the restart resumes right after
that step and matches too).
Every launch shares one persistent compilation cache, so only the first compiles.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from config_files import ROOT, load_config
from flax import nnx
from train_configs import write_config

from emoqwen_jax.model import ModelConfig
from emoqwen_jax.model_dir import load_model
from emoqwen_jax.train.metrics import read_metrics
from emoqwen_jax.train.trainer import init_params

STAGES = ("stage1_align", "stage2_emotion", "stage3_video")
STEPS = 4  # per stage; checkpoints every 2
EXTRA = """
for name in c.run_stages:
    c.stages[name].batch_size = 8  # divisible by the 8-way FSDP batch split
c.mesh.num_devices = 0
c.mesh.update(data=1, fsdp=8)  # every parameter sharded over both processes' devices
c.data.num_shards = -1  # one shard per batch device (8): the same global batches in one process or two, and
# the ViT on each device's own patches (units_local)
"""
COMPARED = ("loss", "lm_loss", "aux_loss", "grad_norm", "gate_weights", "lr")
LAUNCH = str(ROOT / "launch" / "local_multiprocess.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_by_step(workdir) -> dict:
    """{(stage, step): row}, keeping the last row per step (a resumed run re-logs nothing before its
    checkpoint, but the step after a checkpoint may appear twice when a kill lands after logging it)."""
    return {(r["stage"], r["step"]): r for r in read_metrics(str(workdir))}


def final_params(workdir) -> dict:
    """The last stage's weights, restored onto ONE device (they were saved from 8 devices in 2 processes)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model(str(workdir / "stages" / STAGES[-1])),
                                                                nnx.Param)))


def latest_checkpoint(workdir) -> dict:
    steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    meta = json.loads((workdir / "checkpoints" / str(steps[-1]) / "meta" / "metadata").read_text())
    return meta


def launch(cfg, workdir, logs, env):
    cmd = [LAUNCH, "--num_processes", "2", "--devices_per_process", "4", "--port", str(_free_port()),
           "--log_dir", str(logs), "--", f"--config={cfg}", f"--config.workdir={workdir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summary_lines(logs) -> list[dict]:
    out = []
    for i in range(2):
        last = [line for line in (logs / f"process_{i}.log").read_text().splitlines() if line.startswith("{")]
        out.append(json.loads(last[-1]) if last else {})
    return out


def wait_for(cond, proc, timeout=1200):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def assert_same_run(workdir, reference, params_ref):
    got, want = rows_by_step(workdir), rows_by_step(reference)
    assert set(got) == set(want) == {(s, i) for s in STAGES for i in range(1, STEPS + 1)}
    for key in want:
        for field in COMPARED:
            assert got[key][field] == want[key][field], (key, field, got[key][field], want[key][field])
    params = final_params(workdir)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params_ref), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def pod(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("pod")
    cfg = write_config(root / "cfg.py", demo_dir, stages=STAGES, steps=STEPS, every=2, extra=EXTRA)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHON=sys.executable, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = launch(cfg, root / "ref", root / "ref_logs", env)
    assert proc.wait(timeout=1800) == 0, (root / "ref_logs" / "process_1.log").read_text()[-3000:]
    return root, cfg, env, final_params(root / "ref")


@pytest.mark.slow
def test_three_stages_complete_as_two_processes(pod):
    root, _, _, _ = pod
    summaries = summary_lines(root / "ref_logs")
    assert [s.get("process_index") for s in summaries] == [0, 1]
    assert all(s["process_count"] == 2 and s["device_count"] == 8 for s in summaries)
    assert set(summaries[0]["final_loss"]) == set(STAGES)
    for stage in STAGES:  # each stage ends with a checkpoint of its final step, then its weights
        assert (root / "ref" / "stages" / stage / "config.json").exists()
    # one data shard per batch device (8), four per process; the data layout travels with the checkpoint
    assert latest_checkpoint(root / "ref") == {"stage": STAGES[-1], "stage_step": STEPS,
                                               "global_step": STEPS * len(STAGES),
                                               "data_layout": {"num_shards": 8, "process_count": 2,
                                                               "shard_ids": [[0, 1, 2, 3], [4, 5, 6, 7]]}}


@pytest.mark.slow
def test_one_process_with_eight_devices_matches_two_processes(pod, tmp_path):
    """The same mesh and global batches in one process: losses and gradient norms at every step (stage 3 trains
    the LLM) agree to float32 rounding (the collectives sum in another order), and so do the final parameters,
    measured against how far training moved them: Adam normalises each element's update, so a rounding-level
    gradient difference in an element whose gradient is ~0 can show up as a step of up to ~lr. Leaves no stage
    trains are bit-identical."""
    root, cfg, env, params_ref = pod
    res = subprocess.run([sys.executable, "-m", "emoqwen_jax.cli.train", f"--config={cfg}",
                          f"--config.workdir={tmp_path / 'one'}", "--config.distributed.local_device_count=8"],
                         cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["process_count"] == 1
    one, two = rows_by_step(tmp_path / "one"), rows_by_step(root / "ref")
    assert set(one) == set(two)
    for key in two:
        for field in ("loss", "lm_loss", "grad_norm"):
            assert abs(one[key][field] - two[key][field]) <= 1e-5 * abs(two[key][field]), (key, field)
    config = load_config(cfg)
    init = jax.tree.leaves(jax.tree.map(np.asarray, init_params(ModelConfig.from_dict(config.model.to_dict()),
                                                                config.seed)))
    params, llm_moved = final_params(tmp_path / "one"), 0.0
    for (path, a), b, start in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params_ref), init,
                                   strict=True):
        name, moved = jax.tree_util.keystr(path), float(np.abs(b - start).max())
        if moved == 0:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert float(np.abs(a - b).max()) <= 1e-2 * moved, name
        llm_moved = max(llm_moved, moved) if "language_model" in name else llm_moved
    assert llm_moved > 0  # stage 3 trained the LLM, so the comparison covers its sharded update


@pytest.mark.slow
def test_kill9_every_process_mid_stage2_then_rerun_matches(pod, tmp_path):
    root, cfg, env, params_ref = pod
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    proc = launch(cfg, workdir, logs, env)
    # Stage 2's step 3 is logged only after its step-2 checkpoint is written (synchronous saves).
    reached = wait_for(lambda: ("stage2_emotion", 3) in rows_by_step(workdir), proc)
    for i in range(2):
        os.kill(int((logs / f"process_{i}.pid").read_text()), signal.SIGKILL)
    proc.kill()
    proc.wait()
    assert reached, "stage 2 never reached its step 3"
    assert ("stage2_emotion", STEPS) not in rows_by_step(workdir), "the kill landed after stage 2 ended"
    assert not (workdir / "stages" / "stage2_emotion" / "config.json").exists()
    assert latest_checkpoint(workdir)["stage"] == "stage2_emotion"  # the rerun resumes inside stage 2
    again = launch(cfg, workdir, logs, env)
    assert again.wait(timeout=1800) == 0, (logs / "process_1.log").read_text()[-3000:]
    steps = [(r["stage"], r["step"]) for r in read_metrics(str(workdir))]
    assert steps.count(("stage2_emotion", 2)) == 1  # resumed after the stage-2 checkpoint, not from scratch
    assert_same_run(workdir, root / "ref", params_ref)


@pytest.mark.slow
def test_sigterm_to_process_1_saves_on_both_and_restart_matches(pod, tmp_path):
    root, cfg, env, params_ref = pod
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    proc = launch(cfg, workdir, logs, env)
    assert wait_for(lambda: ("stage2_emotion", 1) in rows_by_step(workdir), proc), "stage 2 never started"
    os.kill(int((logs / "process_1.pid").read_text()), signal.SIGTERM)  # one host only
    signalled = time.time()
    assert proc.wait(timeout=300) == 0
    took = time.time() - signalled
    saved = []
    for i in range(2):
        text = (logs / f"process_{i}.log").read_text()
        line = [x for x in text.splitlines() if x.startswith("SIGTERM: saved step")]
        assert line, f"process {i} did not save: {text[-2000:]}"
        saved.append(line[-1].split()[3])
    assert saved[0] == saved[1]  # both hosts saved the same agreed step
    assert took < 120, f"exit took {took:.0f} s after the signal"
    assert not (workdir / "stages" / STAGES[-1] / "config.json").exists()
    # The newest checkpoint is the step both processes saved, inside stage 2 or later (the signal came after
    # stage 2's first step), and the last row logged is that step.
    meta = latest_checkpoint(workdir)
    assert meta["global_step"] == int(saved[0]) and STAGES.index(meta["stage"]) >= 1, (meta, saved)
    before = read_metrics(str(workdir))
    assert (before[-1]["stage"], before[-1]["step"], before[-1]["global_step"]) == (
        meta["stage"], meta["stage_step"], meta["global_step"]), (before[-1], meta)
    again = launch(cfg, workdir, logs, env)
    assert again.wait(timeout=1800) == 0, (logs / "process_1.log").read_text()[-3000:]
    # The restart resumes from that checkpoint: its rows start right after it and run to the end, once each
    # (a restart from an earlier checkpoint or from scratch would log steps again).
    resumed = read_metrics(str(workdir))[len(before):]
    assert [(r["stage"], r["step"]) for r in resumed] == steps_after(meta["stage"], meta["stage_step"])
    assert resumed[0]["global_step"] == meta["global_step"] + 1, resumed[0]
    assert_same_run(workdir, root / "ref", params_ref)


def steps_after(stage: str, stage_step: int) -> list[tuple[str, int]]:
    """(stage, step) of every step after ``stage_step`` of ``stage``, to the last stage's end."""
    later = STAGES[STAGES.index(stage) + 1:]
    return [(stage, i) for i in range(stage_step + 1, STEPS + 1)] + [(s, i) for s in later for i in range(1, STEPS + 1)]


@pytest.mark.slow
def test_stage_eval_with_parameters_sharded_across_processes(demo_dir, tmp_path):
    """A stage with ``eval_suite`` in the 2-process fsdp=8 setting: both processes answer the held-out clips
    together with the stage's weights sharded over all 8 devices (none gathers the model), process 0 alone
    writes the report and the metrics row, and the answers are the ones the same weights give on one device."""
    from emoqwen_jax.eval.emotion.benchmarks import EVAL_MAX_NEW_TOKENS
    from emoqwen_jax.eval.suites.evaluate import evaluate

    labels = tmp_path / "heldout.csv"  # three clips: one generation batch
    labels.write_text("\n".join((demo_dir / "eval_dfew.csv").read_text().splitlines()[:4]) + "\n")
    specs = [{"benchmark": "dfew", "labels": str(labels), "video_root": str(demo_dir)}]
    eval_set = {"video_min_pixels": 56 * 56, "video_max_pixels": 112 * 112, "video_total_pixels": 0}
    extra = EXTRA + (f"c.stages['stage1_align'].eval_suite = {json.dumps(specs)!r}\n"
                     f"c.stages['stage1_align'].eval_set = {eval_set!r}\n"
                     f"c.stages['stage1_align'].eval_batch_size = 4\n")
    cfg = write_config(tmp_path / "cfg.py", demo_dir, stages=("stage1_align",), steps=2, every=2, extra=extra)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHON=sys.executable)
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    proc = launch(cfg, workdir, logs, env)
    assert proc.wait(timeout=1800) == 0, (logs / "process_1.log").read_text()[-3000:]
    assert [s.get("process_index") for s in summary_lines(logs)] == [0, 1]
    report = json.loads((workdir / "eval" / "stage1_align" / "report.json").read_text())
    assert report["benchmarks"]["dfew"]["n"] == 3
    assert report["settings"]["mesh"]["fsdp"] == 8  # answered with the weights sharded as in training
    rows = [r for r in read_metrics(str(workdir)) if r["stage"] == "stage1_align/eval"]
    assert len(rows) == 1 and rows[0]["dfew/n"] == 3 and rows[0]["global_step"] == 2  # one writer
    answers = (workdir / "eval" / "stage1_align" / "dfew" / "heldout.jsonl").read_text().splitlines()
    single = evaluate(str(workdir / "stages" / "stage1_align"), specs, str(tmp_path / "single"), overrides=eval_set,
                      suite="stage stage1_align", max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=4)
    assert single["benchmarks"]["dfew"]["n"] == 3
    assert (tmp_path / "single" / "dfew" / "heldout.jsonl").read_text().splitlines() == answers
