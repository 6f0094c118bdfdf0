"""emoqwen-data demo / check / prepare, and the pipeline reading a prepared (TFDS array_record) dataset."""

import json

import numpy as np
import pytest
from data_helpers import conv, write_manifest

from emoqwen_jax.cli import data as cli
from emoqwen_jax.data import demo, manifests, pipeline, prepare, video_io
from emoqwen_jax.data.process import SampleProcessor


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo.build_demo(str(out))
    return out


def tiny_args(tok_cache):
    return ["--set", "tokenizer_vocab_size=1024", "--set", f"tokenizer_cache_dir={tok_cache!r}",
            "--set", "video_min_pixels=3136", "--set", "video_max_pixels=12544"]


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_set_is_deterministic_and_labelled(demo_dir, tmp_path):
    again = tmp_path / "again"
    demo.build_demo(str(again))
    assert (again / "train.jsonl").read_text() == (demo_dir / "train.jsonl").read_text()
    first = video_io.read_video(str(demo_dir / "videos/clip_003.mp4"), lambda n, f: np.arange(n))[0]
    second = video_io.read_video(str(again / "videos/clip_003.mp4"), lambda n, f: np.arange(n))[0]
    np.testing.assert_array_equal(first, second)
    recs = manifests.load_manifest(str(demo_dir / "train.jsonl"), str(demo_dir))
    assert len(recs) == 70 and all(r["label"] in demo.EMOTIONS for r in recs)
    # The DFEW question (with the medium's placeholder), answered by the one class word.
    prompt = manifests.benchmark_prompt("dfew")
    assert all(r["conversations"][0]["content"] == prompt.replace("video", r["media"][0]["kind"])
               and r["conversations"][1]["content"] == r["label"] for r in recs)
    fold = manifests.load_manifest(str(demo_dir / "eval_dfew.csv"), str(demo_dir))
    assert [r["label"] for r in fold] == list(demo.EMOTIONS) * 5  # 25 held-out clips, 5 per class
    trained = {m["path"] for r in recs for m in r["media"]}
    assert not trained & {m["path"] for r in fold for m in r["media"]}  # held out: never in train.jsonl
    assert "SMOKE-TEST" in (demo_dir / "README.txt").read_text()


def test_cli_demo_and_check(tmp_path, tok_cache, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert last_json(capsys)["train"].endswith("train.jsonl")
    code = cli.main(["check", "--manifest", str(tmp_path / "d/train.jsonl"), "--data_root", str(tmp_path / "d")]
                    + tiny_args(tok_cache))
    assert code == 0 and last_json(capsys) == {"ok": 70, "rejected": {}, "examples": {}}


def test_cli_check_reports_reasons_and_fails_past_the_limit(clip_dir, tmp_path, tok_cache, capsys):
    path = write_manifest(tmp_path / "m.jsonl", [conv("video", "c10_25.mp4", sample_id="good"),
                                                 conv("video", "truncated.mp4", sample_id="cut"), "{oops"])
    code = cli.main(["check", "--manifest", path, "--data_root", str(clip_dir), "--set", "max_reject_fraction=0.5"]
                    + tiny_args(tok_cache))
    summary = last_json(capsys)
    assert code == 1 and summary["ok"] == 1
    assert summary["rejected"] == {"corrupt_video": 1, "malformed_json": 1}
    assert summary["examples"]["corrupt_video"][0].startswith("cut:")


def test_cli_rejects_unknown_setting_and_missing_manifest(tmp_path):
    with pytest.raises(SystemExit, match="unknown data config field"):
        cli.main(["check", "--manifest", "x", "--data_root", str(tmp_path), "--set", "nope=1"])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["check", "--manifest", str(tmp_path / "none.jsonl"), "--data_root", str(tmp_path)])


def test_prepared_dataset_round_trips_through_the_pipeline(demo_dir, tmp_path, cfg, capsys, tok_cache):
    bad = write_manifest(tmp_path / "m.jsonl", [json.loads(line) for line in open(demo_dir / "train.jsonl")]
                         + [conv("video", "videos/missing.mp4", sample_id="missing")])
    assert cli.main(["prepare", "--manifest", bad, "--data_root", str(demo_dir), "--out", str(tmp_path / "p")]) == 0
    assert last_json(capsys)["rejected"] == {"missing_file": 1}
    assert cli.main(["check", "--prepared", str(tmp_path / "p")] + tiny_args(tok_cache)) == 0
    n = sum(1 for _ in open(demo_dir / "train.jsonl"))  # every demo sample
    assert last_json(capsys)["ok"] == n

    prepared = prepare.load_prepared(str(tmp_path / "p"))
    from_files = {r["id"]: r for r in manifests.load_manifest(str(demo_dir / "train.jsonl"), str(demo_dir))}
    proc = SampleProcessor(cfg)
    assert sorted(r["id"] for r in prepared) == sorted(from_files)
    for rec in [prepared[0], prepared[7]]:  # bytes from the array_record == the files' processing
        a, b = proc.map(rec), proc.map(from_files[rec["id"]])
        for k in ("input_ids", "labels", "pixel_values", "pixel_values_videos", "video_grid_thw"):
            np.testing.assert_array_equal(a[k], b[k])
    cfg.num_epochs, cfg.batch_size, cfg.drop_remainder = 1, 4, False
    it, counter = pipeline.make_iterator(prepared, cfg)
    batches = list(it)
    assert counter.summary()["ok"] == n and sum(int(b["sample_mask"].sum()) for b in batches) == n
    # The same data as a config mixture: the prepared set and the manifest, weighted 1:1.
    sources = pipeline.load_sources([{"prepared": str(tmp_path / "p")},
                                     {"manifest": str(demo_dir / "train.jsonl"), "data_root": str(demo_dir)}])
    assert [len(r) for r, _ in sources] == [n, n] and [w for _, w in sources] == [1.0, 1.0]
    with pytest.raises(ValueError, match="needs"):
        pipeline.load_sources([{"weight": 2.0}])
    with pytest.raises(FileNotFoundError, match="emoqwen-data prepare"):
        prepare.load_prepared(str(tmp_path / "nothing"))


def test_demo_placeholder_fills_nested_specs():
    spec = [{"benchmark": "dfew", "labels": "{demo}/eval_dfew.csv", "video_root": "{demo}", "folds": False}]
    assert demo.fill_demo(spec, "/w/demo_data") == [{"benchmark": "dfew", "labels": "/w/demo_data/eval_dfew.csv",
                                                    "video_root": "/w/demo_data", "folds": False}]
    assert demo.fill_demo(("{demo}/a", 3), "/r") == ("/r/a", 3) and demo.demo_root("/w") == "/w/demo_data"
