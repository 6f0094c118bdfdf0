"""emoqwen-eval --suite / general benchmarks, emoqwen-forgetting and the trainer's stage eval, end to end on
the synthetic general demo (every benchmark in its published layout) with tiny random checkpoints.

The random model's answers are noise (mostly invalid), so these check plumbing: every question answered
once, the report's metrics / counts / settings, the Markdown table, the chart, the metrics.jsonl row."""

import json

import emotion_qwen  # on sys.path via tests/eval/conftest.py
import ml_collections
import pytest
from flax import nnx

from emoqwen_jax.cli import eval as eval_cli
from emoqwen_jax.cli import forgetting as forgetting_cli
from emoqwen_jax.eval.general.demo import build_demo_general
from emoqwen_jax.eval.suites.report import read_report, write_report
from emoqwen_jax.eval.suites.stage_eval import resolve_eval_suite, run_stage_eval
from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model_dir import read_model_config, save_model
from emoqwen_jax.train.metrics import MetricsWriter, read_metrics

pytestmark = pytest.mark.slow  # runs the evaluation commands end to end

COUNTS = {"mmbench": 3, "mme": 16, "pope": 12, "scienceqa": 2, "seedbench": 3, "textvqa": 2, "vqav2": 6}


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def general_demo(tmp_path_factory, demo):
    root = tmp_path_factory.mktemp("general_demo")
    return root, build_demo_general(str(root), emotion_demo=str(demo))


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory, ckpt):
    """A second random checkpoint with the first one's data settings (the 'after' model)."""
    _, meta = read_model_config(ckpt)
    model = EmotionQwen(ModelConfig.from_run_config(emotion_qwen.get_config("tiny")), rngs=nnx.Rngs(1))
    return save_model(model, str(tmp_path_factory.mktemp("ckpt_b") / "tiny"), meta=meta)


def test_suite_general_report(ckpt, general_demo, tmp_path, capsys):
    _, suite = general_demo
    out = tmp_path / "out"
    code = eval_cli.main(["--ckpt", ckpt, "--suite", "general", "--suite_config", suite, "--out", str(out),
                          "--max_new_tokens", "3"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = last_json(stdout)
    assert {k: v["n"] for k, v in summary.items()} == COUNTS
    report = read_report(str(out))
    assert list(report["benchmarks"]) == list(COUNTS)
    for name, result in report["benchmarks"].items():
        assert result["kind"] == "general" and 0.0 <= result["invalid_rate"] <= 1.0
        assert result[result["headline"]] >= 0.0
        lines = (out / name / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == result.get("num_answers", result["n"])  # one answer per question (MMBench: variant)
    assert report["benchmarks"]["mmbench"]["num_answers"] == 12  # 3 questions x 4 rotations
    s = report["settings"]
    assert s["data"]["fps"] == 3.0 and s["data"]["image_max_pixels"] == 112 * 112  # the suite's "set"
    assert s["sampling"]["max_new_tokens"] == 3 and s["sampling"]["temperature"] == 0.0
    assert "single word or phrase" in s["prompts"]["pope"] and "option's letter" in s["prompts"]["mmbench"]
    assert s["overrides"] == {"image_min_pixels": 3136, "image_max_pixels": 12544, "video_min_pixels": 3136,
                              "video_max_pixels": 12544}
    md = (out / "report.md").read_text()
    assert all(f"| {name} | **" in md for name in COUNTS) and "subtasks.color.acc_plus" in md
    assert "invalid rate" in md and "- fps: `3.0`" in md and "decoding" in md


def test_one_general_benchmark(ckpt, general_demo, tmp_path, capsys):
    root, _ = general_demo
    code = eval_cli.main(["--ckpt", ckpt, "--benchmark", "pope", "--root", str(root / "POPE"), "--limit", "5",
                          "--out", str(tmp_path), "--max_new_tokens", "3", "--set", "image_max_pixels=3136"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    result = last_json(stdout)
    assert result["n"] == 5 and set(result["splits"]) == {"random", "popular"}  # the first 5 questions
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["result"]["headline"] == "f1" and run["settings"]["overrides"] == {"image_max_pixels": 3136}
    assert (tmp_path / "pope.jsonl").exists() and (tmp_path / "report.md").exists()
    assert "departs from the standard" in err
    assert result["yes_no_rule"] == "strict" and "read by the strict rule" in (tmp_path / "report.md").read_text()


def test_pope_official_rule_flag_rescores_the_same_answers(ckpt, general_demo, tmp_path, capsys):
    """--yes_no_rule official: the same greedy answers, read by POPE's script; the report names the rule."""
    from emoqwen_jax.eval.general import benchmarks as general

    root, _ = general_demo
    code = eval_cli.main(["--ckpt", ckpt, "--benchmark", "pope", "--root", str(root / "POPE"), "--limit", "5",
                          "--out", str(tmp_path), "--max_new_tokens", "3", "--set", "image_max_pixels=3136",
                          "--yes_no_rule", "official"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    result = last_json(stdout)
    assert result["yes_no_rule"] == "official" and result["invalid_rate"] == 0.0  # every answer is yes or no
    assert "read by the official rule" in (tmp_path / "report.md").read_text()
    spec = {"benchmark": "pope", "root": str(root / "POPE"), "limit": 5}
    items = general.load_items(spec, str(tmp_path))
    strict = general.score_predictions(spec, items, str(tmp_path / "pope.jsonl"))
    assert strict["yes_no_rule"] == "strict" and strict["n"] == result["n"]
    with pytest.raises(ValueError, match="yes/no rule 'lenient'"):
        general.check_spec({**spec, "yes_no_rule": "lenient"})


@pytest.mark.parametrize("argv, match", [
    (["--suite", "general"], "needs --suite_config"),
    (["--benchmark", "pope"], "give the benchmark's folder"),
    (["--benchmark", "pope", "--root", "{tmp}/nope"], "does not exist"),
    (["--benchmark", "dfew", "--root", "{tmp}"], "needs --labels and --video_root"),
    (["--benchmark", "mme", "--root", "{tmp}", "--yes_no_rule", "official"], "--yes_no_rule applies to pope"),
    (["--suite", "all", "--suite_config", "{tmp}/nope.json"], "does not exist"),
])
def test_eval_errors(ckpt, tmp_path, capsys, argv, match):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert eval_cli.main(["--ckpt", ckpt, *argv, "--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr()[1]


def fake_report(ckpt, values, fps=3.0):
    benchmarks = {}
    for name, (head, value, extra) in values.items():
        benchmarks[name] = {"kind": "general", "benchmark": name, "headline": head, head: value, "n": 10,
                            "invalid_rate": 0.1, **extra}
    return {"settings": {"ckpt": ckpt, "data": {"fps": fps}, "sampling": {"temperature": 0.0}},
            "benchmarks": benchmarks}


def test_forgetting_from_two_reports(tmp_path, capsys):
    before = fake_report("A", {"pope": ("f1", 0.80, {"accuracy": 0.7}),
                               "mme": ("perception", 1500.0, {"perception_max": 2000, "cognition": 300.0}),
                               "vqav2": ("accuracy", 0.5, {})})
    after = fake_report("B", {"pope": ("f1", 0.75, {"accuracy": 0.72}),
                              "mme": ("perception", 1400.0, {"perception_max": 2000, "cognition": 320.0}),
                              "dfew": ("uar", 0.4, {})}, fps=2.0)
    r1, _ = write_report(before, str(tmp_path / "a"))
    r2, _ = write_report(after, str(tmp_path / "b"))
    out = tmp_path / "f"
    code = forgetting_cli.main(["--before_report", r1, "--after_report", str(tmp_path / "b"), "--out", str(out),
                                "--all_metrics"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rows = {r["benchmark"]: r for r in last_json(stdout)["rows"]}
    assert rows["pope"]["delta"] == pytest.approx(-0.05) and rows["mme"]["delta"] == pytest.approx(-100.0)
    assert rows["mme"]["max"] == 2000 and set(rows) == {"pope", "mme"}
    assert "| pope | **f1** | 0.8000 | 0.7500 | -0.0500 |" in stdout
    assert "| mme | cognition | 300.0000 | 320.0000 | +20.0000 |" in stdout  # --all_metrics
    assert "in one report only (not compared): vqav2, dfew" in stdout
    assert "WARNING: the reports differ in data" in stdout
    assert (out / "forgetting.png").stat().st_size > 1000 and (out / "forgetting.md").exists()
    saved = json.loads((out / "forgetting.json").read_text())
    assert saved["unmatched"] == ["vqav2", "dfew"] and saved["settings_differ"] == ["data"]


@pytest.mark.parametrize("argv, match", [
    ([], "give --before and --after"),
    (["--before", "x"], "give --before and --after"),
    (["--before", "x", "--after", "y"], "need --suite_config"),
    (["--before_report", "{tmp}/r1", "--after_report", "{tmp}/r2"], "does not exist"),
])
def test_forgetting_errors(tmp_path, capsys, argv, match):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert forgetting_cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr()[1]


def test_forgetting_two_checkpoints_suite_all(ckpt, ckpt_b, general_demo, tmp_path, capsys):
    root, suite = general_demo
    blob = json.loads(open(suite).read())
    small = {"set": blob["set"], "general": [{"benchmark": "mme", "root": str(root / "MME_Benchmark_release_version"),
                                              "limit": 2}],
             "emotion": [dict(blob["emotion"][0], labels=str(root / blob["emotion"][0]["labels"]),
                              video_root=str(root / blob["emotion"][0]["video_root"]))]}
    (tmp_path / "suite.json").write_text(json.dumps(small))
    out = tmp_path / "f"
    code = forgetting_cli.main(["--before", ckpt, "--after", ckpt_b, "--suite", "all", "--suite_config",
                                str(tmp_path / "suite.json"), "--out", str(out), "--max_new_tokens", "3"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rows = last_json(stdout)["rows"]
    assert [(r["benchmark"], r["metric"]) for r in rows] == [("mme", "perception"), ("dfew", "uar")]
    for which in ("before", "after"):
        report = read_report(str(out / which))
        assert report["benchmarks"]["dfew"]["n"] == 4 and report["benchmarks"]["mme"]["n"] == 4
        assert report["benchmarks"]["dfew"]["kind"] == "emotion"
    assert (out / "forgetting.png").exists() and "WARNING" not in stdout


def test_stage_eval_logs_to_metrics(ckpt, general_demo, tmp_path):
    root, suite = general_demo
    config = ml_collections.ConfigDict({"stages": {
        "s1": {"eval_suite": ({"benchmark": "pope", "root": str(root / "POPE"), "limit": 2},),
               "eval_set": {"image_max_pixels": 3136}},
        "s2": {"eval_suite": ""},
        "s3": {"eval_suite": json.dumps([{"benchmark": "mme", "root": str(root / "MME_Benchmark_release_version"),
                                          "limit": 1}]), "eval_set": {"image_max_pixels": 3136}},
        "s4": {"eval_suite": suite + ":emotion"}}})
    writer = MetricsWriter(str(tmp_path))
    report = run_stage_eval(config, "s1", ckpt, str(tmp_path), writer)
    assert run_stage_eval(config, "s2", ckpt, str(tmp_path), writer) == {}
    assert run_stage_eval(config, "s3", ckpt, str(tmp_path), writer)["benchmarks"]["mme"]["n"] == 2
    assert resolve_eval_suite(config.stages.s4.eval_suite)[0][0]["benchmark"] == "dfew"  # the file's emotion list
    writer.close()
    assert report["benchmarks"]["pope"]["n"] == 2
    rows = read_metrics(str(tmp_path))
    assert [r["stage"] for r in rows] == ["s1/eval", "s3/eval"] and rows[0]["global_step"] == 0
    assert "pope/f1" in rows[0] and "pope/splits.random.accuracy" in rows[0] and rows[0]["pope/n"] == 2
    assert (tmp_path / "eval" / "s1" / "report.md").exists() and any((tmp_path / "tensorboard").iterdir())


def test_general_eval_suite_report_and_forgetting_on_uris(ckpt, demo, scratch, capsys):
    """Benchmark roots, suite config, outputs and reports all on scratch:// (the test filesystem standing in for
    gs://): the demo writer, one general benchmark, a suite report (relative roots resolved against the
    config's URI; MMBench's image cache written there), the stage-eval suite form and a forgetting report."""
    from emoqwen_jax.runtime import storage

    suite_path = build_demo_general(storage.join(scratch, "general"), emotion_demo=str(demo))
    assert suite_path == "scratch://bucket/general/suite.json"
    blob = storage.read_json(suite_path)
    assert blob["emotion"][0]["video_root"] == str(demo)  # a local emotion demo is named by its absolute path
    code = eval_cli.main(["--ckpt", ckpt, "--benchmark", "pope", "--root", storage.join(scratch, "general", "POPE"),
                          "--limit", "2", "--out", storage.join(scratch, "one"), "--max_new_tokens", "2",
                          "--set", "image_max_pixels=3136"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert last_json(stdout)["n"] == 2
    assert storage.read_json(storage.join(scratch, "one", "run.json"))["result"]["n"] == 2
    assert len(storage.read_text(storage.join(scratch, "one", "pope.jsonl")).splitlines()) == 2
    assert storage.isfile(storage.join(scratch, "one", "pope.score.json"))

    small = {"set": blob["set"], "general": [{"benchmark": "mmbench", "root": "../general/MMBench", "limit": 1},
                                             {"benchmark": "mme", "root": "../general/MME_Benchmark_release_version",
                                              "limit": 1}]}
    small_path = storage.join(scratch, "configs", "small.json")
    storage.write_json(small_path, small)
    specs, _ = resolve_eval_suite(small_path + ":general")  # the trainer's eval_suite string form
    assert [s["root"] for s in specs] == ["scratch://bucket/general/MMBench",
                                          "scratch://bucket/general/MME_Benchmark_release_version"]
    out = storage.join(scratch, "suite_out")
    code = eval_cli.main(["--ckpt", ckpt, "--suite", "general", "--suite_config", small_path, "--out", out,
                          "--max_new_tokens", "2"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    report = read_report(out)
    assert {k: v["n"] for k, v in report["benchmarks"].items()} == {"mmbench": 1, "mme": 2}
    # the TSV's base64 images (all three rows; the limit applies after reading), cached beside the answers
    assert storage.listdir(storage.join(out, "mmbench", "images")) == ["0.png", "1.png", "2.png"]
    assert "| mme | **" in storage.read_text(storage.join(out, "report.md"))

    code = forgetting_cli.main(["--before_report", storage.join(out, "report.json"), "--after_report", out,
                                "--out", storage.join(scratch, "forgetting")])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert [r["delta"] for r in last_json(stdout)["rows"]] == [0.0, 0.0]  # a report against itself
    assert {"forgetting.json", "forgetting.md", "forgetting.png"} <= set(storage.listdir(
        storage.join(scratch, "forgetting")))
