"""emoqwen-describe and emoqwen-eval end to end on the demo set with a tiny random checkpoint.

The commands run in-process (``main(argv)``) so the compiled programs are shared between tests; the
random model's answers are noise, so the tests check plumbing: one answer per clip, the files written,
the scores' bookkeeping, clear errors, and that inference prompts are exactly training's prompts.
"""

import json
import os

import numpy as np
import pytest
from eval_settings import SMALL_PIXELS

from emoqwen_jax.cli import describe
from emoqwen_jax.cli import eval as eval_cli
from emoqwen_jax.data.process import SampleProcessor
from emoqwen_jax.data.text import IGNORE
from emoqwen_jax.infer.session import Session

pytestmark = pytest.mark.slow  # runs the evaluation commands end to end


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def session(ckpt):
    return Session.from_checkpoint(ckpt, {"video_min_pixels": 3136, "video_max_pixels": 3136})


def test_session_reads_checkpoint_settings_and_overrides(session, ckpt):
    assert session.data["length_buckets"] == [128, 256]  # from config.json meta.data
    assert session.data["video_max_pixels"] == 3136  # the caller's override
    assert session.data["system_prompt"] == "You are a helpful assistant."  # a default
    with pytest.raises(ValueError, match="unknown data setting data.fpz"):
        Session(session.model, overrides={"fpz": 1.0})


def test_prompt_is_training_prompt(session, demo):
    """Inference tokens = the training sample's tokens up to the assistant's answer."""
    clip = str(demo / "videos" / "clip_001.mp4")
    question = "<video>\nHow does this person feel?"
    prompt = session.prompt(question, [("video", clip)])
    record = {"id": "x", "media": [{"kind": "video", "path": clip}],
              "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": "Sad."}]}
    sample = SampleProcessor(session.data).process(record)
    first_label = int(np.flatnonzero(sample["labels"] != IGNORE)[0])
    np.testing.assert_array_equal(prompt.input_ids, sample["input_ids"][:first_label])
    np.testing.assert_array_equal(prompt.vision["pixel_values_videos"], sample["pixel_values_videos"])


def test_batched_answers_equal_one_at_a_time(session, demo):
    prompts = [session.prompt("What emotion?", [("video", str(demo / "videos" / f"clip_00{i}.mp4"))],
                              subtitle="hello" * i) for i in range(2)]
    sampling = session.sampling(6)
    together = session.generate_ids(prompts, sampling)
    alone = [session.generate_ids([p], sampling)[0] for p in prompts]
    assert together == alone and all(len(ids) <= 6 for ids in together)


def test_describe_video_default_prompt(ckpt, demo, capsys):
    code = describe.main(["--ckpt", ckpt, "--video", str(demo / "videos" / "clip_000.mp4"), "--max_new_tokens",
                          "5", "--json", *SMALL_PIXELS])
    out, err = capsys.readouterr()
    assert code == 0, err
    got = last_json(out)
    assert isinstance(got["response"], str) and 0 < got["num_tokens"] <= 5 and got["prompt_tokens"] > 12


def test_describe_video_image_subtitle_and_sampling(ckpt, demo, capsys):
    args = ["--ckpt", ckpt, "--video", str(demo / "videos" / "clip_000.mp4"), "--max_new_tokens", "5", "--json",
            *SMALL_PIXELS, "--prompt", "Describe the emotion."]
    assert describe.main(args) == 0
    plain = last_json(capsys.readouterr()[0])
    assert describe.main(args + ["--image", str(demo / "images" / "face_000.png"), "--subtitle",
                                 "I am fine.", "--temperature", "0.8", "--top_p", "0.9", "--seed", "3"]) == 0
    both = last_json(capsys.readouterr()[0])
    assert both["prompt_tokens"] > plain["prompt_tokens"] + 15  # image tokens and the subtitle


@pytest.mark.parametrize("extra, match", [
    (["--video", "/nonexistent/clip.mp4"], "does not exist"),
    ([], "give --video"),
    (["--video", "{tmp}/garbage.mp4"], "corrupt_video"),
    (["--video", "{demo}/images/face_000.png"], "too_few_frames"),
])
def test_describe_errors(ckpt, demo, tmp_path, capsys, extra, match):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 20)
    extra = [e.replace("{demo}", str(demo)).replace("{tmp}", str(tmp_path)) for e in extra]
    assert describe.main(["--ckpt", ckpt, *extra]) == 2
    assert match in capsys.readouterr()[1]


def test_describe_bad_checkpoint(tmp_path, capsys):
    assert describe.main(["--ckpt", str(tmp_path), "--video", "x.mp4"]) == 2
    assert "not a model directory" in capsys.readouterr()[1]


def test_eval_dfew_one_file_with_a_missing_clip(ckpt, demo, tmp_path, capsys):
    labels = tmp_path / "set_1.csv"
    labels.write_text("video_name,label\nvideos/clip_000,1\nvideos/clip_001,2\nvideos/clip_002.mp4,3\n"
                      "videos/gone,4\n")
    out_dir = tmp_path / "out"
    code = eval_cli.main(["--ckpt", ckpt, "--benchmark", "dfew", "--labels", str(labels), "--video_root", str(demo),
                          "--out", str(out_dir), "--batch_size", "2", *SMALL_PIXELS])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = last_json(out)
    assert summary["n"] == 4 and summary["invalid_rate"] >= 0.25  # the missing clip counts, as invalid
    lines = [json.loads(line) for line in (out_dir / "set_1.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["videos/clip_000", "videos/clip_001", "videos/clip_002.mp4", "videos/gone"]
    assert lines[-1] == {"id": "videos/gone", "response": None, "error": "missing_file"}
    assert all(isinstance(r["response"], str) for r in lines[:3])
    assert (out_dir / "set_1.confusion.png").exists() and "videos/gone" in (out_dir / "set_1.invalid.csv").read_text()
    run = json.loads((out_dir / "run.json").read_text())
    assert run["settings"]["data"]["fps"] == 3.0 and run["settings"]["sampling"]["temperature"] == 0.0
    assert run["settings"]["overrides"] == {"video_min_pixels": 3136, "video_max_pixels": 3136}
    assert "departs from the standard" in err


def test_eval_folds_mean(ckpt, demo, tmp_path, capsys):
    for k in range(1, 6):
        (tmp_path / f"set_{k}.csv").write_text(f"video_name,label\nvideos/clip_00{k % 4},{k}\n")
    code = eval_cli.main(["--ckpt", ckpt, "--benchmark", "dfew", "--labels", str(tmp_path / "set_1.csv"),
                          "--video_root", str(demo), "--out", str(tmp_path / "out"), "--folds", "--batch_size", "2",
                          "--max_new_tokens", "4", *SMALL_PIXELS])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = last_json(out)
    assert summary["n"] == 5 and len(summary["folds"]) == 5
    assert summary["war"] == pytest.approx(np.mean([f["war"] for f in summary["folds"]]), abs=1e-6)
    assert all((tmp_path / "out" / f"fold{k}.jsonl").exists() for k in range(1, 6))


def test_eval_emer(ckpt, demo, tmp_path, capsys):
    refs = tmp_path / "emer.csv"
    refs.write_text("name,english\nvideos/clip_000,The person smiles: happy.\nvideos/clip_001,She looks sad.\n")
    code = eval_cli.main(["--ckpt", ckpt, "--benchmark", "emer", "--labels", str(refs), "--video_root", str(demo),
                          "--out", str(tmp_path / "out"), "--max_new_tokens", "4", *SMALL_PIXELS])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = last_json(out)
    assert summary["n"] == 2 and 0.0 <= summary["f1"] <= 1.0
    assert os.path.exists(tmp_path / "out" / "emer.judge_requests.jsonl")


@pytest.mark.parametrize("extra, match", [
    (["--labels", "{tmp}/nope.csv", "--video_root", "{demo}"], "does not exist"),
    (["--labels", "{tmp}/set_1.csv", "--video_root", "{tmp}/no_root"], "not a directory"),
    (["--labels", "{tmp}/set_1.csv", "--video_root", "{tmp}"], "none of the 1 clips"),
    (["--labels", "{tmp}/set_1.csv", "--video_root", "{demo}", "--folds"], "missing label files"),
])
def test_eval_errors(ckpt, demo, tmp_path, capsys, extra, match):
    (tmp_path / "set_1.csv").write_text("video_name,label\nvideos/clip_000,1\n")
    extra = [e.replace("{tmp}", str(tmp_path)).replace("{demo}", str(demo)) for e in extra]
    assert eval_cli.main(["--ckpt", ckpt, "--benchmark", "dfew", *extra, "--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr()[1]
