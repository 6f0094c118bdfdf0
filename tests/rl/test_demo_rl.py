"""The demo_rl preset: its stages, and demo answers in the think/answer format that the rewards accept."""

import csv
import json
import os
import sys

import pytest
from config_files import ROOT

from emoqwen_jax.rl.rewards import RewardInput, accuracy, format_reward


def test_demo_rl_runs_the_demo_stages_then_rl_and_scores_stages_3_and_4():
    sys.path.insert(0, str(ROOT / "configs"))
    import emotion_qwen

    c = emotion_qwen.get_config("demo_rl")
    assert c.preset == "demo_rl" and c.allow_demo_data
    assert tuple(c.run_stages) == ("stage1_align", "stage2_emotion", "stage3_video", "stage4_rl")
    assert [c.stages[n].kind for n in c.run_stages] == ["supervised"] * 3 + ["rl"]
    assert c.stages.stage3_video.eval_suite and c.stages.stage4_rl.eval_suite == c.stages.stage3_video.eval_suite
    assert "train_format.jsonl" in c.stages.stage3_video.mixture[0]["manifest"]
    assert c.stages.stage4_rl.mixture == c.stages.stage3_video.mixture  # RL on the training clips
    # No more steps than the plain demo's stage 3 (which names every held-out clip); on think/answer text the
    # same steps leave a weak start (docs/rl.md, The demo).
    assert c.stages.stage3_video.num_steps <= emotion_qwen.get_config("demo").stages.stage3_video.num_steps
    assert "stage4_rl" not in emotion_qwen.get_config("demo").run_stages  # not run by default


@pytest.mark.parametrize("manifest", ["train_think.jsonl", "train_format.jsonl"])
def test_think_answers_earn_both_rewards_against_their_label(rl_demo_dir, manifest):
    rows = [json.loads(line) for line in open(rl_demo_dir / manifest)]
    plain = [json.loads(line) for line in open(rl_demo_dir / "train.jsonl")]
    assert [r["id"] for r in rows] == [r["id"] for r in plain]
    for row, ref in zip(rows, plain, strict=True):
        answer = row["conversations"][1]["content"]
        sample = RewardInput(answer, ref["conversations"][1]["content"], 20, 32, True)
        assert format_reward(sample) == 1.0 and accuracy(sample) == 1.0, answer
    thinks = {answer["conversations"][1]["content"].split("</think>")[0] for answer in rows}
    assert len(thinks) == (1 if manifest == "train_format.jsonl" else 5)  # one fixed text, or a cue per class


def test_every_bash_block_of_docs_rl_is_marked():
    lines = (ROOT / "docs" / "rl.md").read_text().splitlines()
    fences = [i for i, line in enumerate(lines) if line.strip() == "```bash"]
    assert fences
    for i in fences:
        assert lines[i - 1].startswith(("<!-- illustrative:", "<!-- readme-test:")), f"docs/rl.md line {i + 1}"


def test_the_held_out_fold_shares_no_clip_with_the_rl_training_data(rl_demo_dir):
    trained = {os.path.splitext(r.get("video") or r["image"])[0] for name in ("train_think.jsonl", "train_format.jsonl")
               for r in map(json.loads, open(rl_demo_dir / name))}
    held_out = {row["video_name"] for row in csv.DictReader(open(rl_demo_dir / "eval_dfew.csv"))}
    assert held_out and trained and not held_out & trained
    assert all(os.path.exists(rl_demo_dir / f"{name}.mp4") for name in held_out)
