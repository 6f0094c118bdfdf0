"""Manifests of every format → records; every bad-input case → a named reason, counted, never a crash."""

import json
import logging
import os

import numpy as np
import pytest
from data_helpers import conv, write_manifest

from emoqwen_jax.data import manifests, vision
from emoqwen_jax.data.process import SampleProcessor
from emoqwen_jax.data.reasons import RejectCounter, TooManyRejectsError


def reasons_of(records):
    return [r.get("rejected") for r in records]


def test_jsonl_and_json_manifests(clip_dir, tmp_path):
    entries = [conv("video", "c10_25.mp4", sample_id="a"), conv("image", "img.png", sample_id="b")]
    entries[0]["subtitle"] = "I did it!"
    for jsonl in (True, False):
        path = write_manifest(tmp_path / ("m.jsonl" if jsonl else "m.json"), entries, jsonl=jsonl)
        recs = manifests.load_manifest(path, str(clip_dir))
        assert [r["id"] for r in recs] == ["a", "b"] and reasons_of(recs) == [None, None]
        assert recs[0]["media"] == [{"kind": "video", "path": os.path.realpath(clip_dir / "c10_25.mp4")}]
        assert recs[0]["subtitle"] == "I did it!" and recs[1]["media"][0]["kind"] == "image"


def test_bad_manifest_lines_become_reasons(clip_dir, tmp_path):
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"x")
    os.symlink(outside, clip_dir / "link_out.mp4") if not (clip_dir / "link_out.mp4").exists() else None
    lines = [json.dumps(conv("video", "c10_25.mp4", sample_id="ok")),
             '{"id": "broken", "video": ',  # malformed JSON line
             json.dumps(conv("video", "../outside.mp4", sample_id="dotdot")),
             json.dumps(conv("video", str(outside), sample_id="absolute")),
             json.dumps(conv("video", "link_out.mp4", sample_id="symlink")),
             json.dumps({"id": "empty", "video": "c10_25.mp4", "conversations": []}),
             json.dumps({"id": "noconv", "video": "c10_25.mp4"}),
             '[1, 2]']
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(b'{"id": "latin1", "video": "c10_25.mp4", "conversations": [{"role": "user", "content": "caf\xe9"}]}\n')
    recs = manifests.load_manifest(str(path), str(clip_dir))
    assert reasons_of(recs) == [None, "malformed_json", "path_escapes_root", "path_escapes_root",
                                "path_escapes_root", "empty_conversation", "empty_conversation", "malformed_json",
                                "non_utf8"]


def test_dfew_mafw_mer_csvs(clip_dir, tmp_path):
    (tmp_path / "dfew.csv").write_text("video_name,label\nc10_25,1\nc29_30,7\nc7_5,9\nc3_10,x\n")
    recs = manifests.load_manifest(str(tmp_path / "dfew.csv"), str(clip_dir))
    assert [r.get("label") for r in recs[:2]] == ["happy", "fear"]
    assert reasons_of(recs) == [None, None, "unknown_label", "unknown_label"]
    assert recs[0]["media"][0]["path"].endswith("c10_25.mp4")
    assert recs[0]["conversations"][1] == {"role": "assistant", "content": "happy"}
    assert "<video>" in recs[0]["conversations"][0]["content"]
    recs = manifests.load_manifest(str(tmp_path / "dfew.csv"), str(clip_dir), fmt="mafw")
    assert [r.get("label") for r in recs[:3]] == ["anger", "surprise", "anxiety"]  # MAFW ids 1, 7, 9
    assert "contempt" in recs[0]["conversations"][0]["content"]
    (tmp_path / "mer.csv").write_text("name,discrete\nc10_25,worried\nc7_5,joyful\n,happy\n")
    recs = manifests.load_manifest(str(tmp_path / "mer.csv"), str(clip_dir))
    assert recs[0]["label"] == "worried" and reasons_of(recs) == [None, "unknown_label", "malformed_row"]


def test_processor_turns_good_records_into_consistent_samples(clip_dir, tmp_path, cfg, tiny_tok):
    _, info = tiny_tok
    path = write_manifest(tmp_path / "m.jsonl", [conv("video", "c29_30.mp4", sample_id="v"),
                                                 conv("image", "img.png", sample_id="i")])
    proc = SampleProcessor(cfg)
    v, i = [proc.map(r) for r in manifests.load_manifest(path, str(clip_dir))]
    assert v["id"] == "v" and v["input_ids"].dtype == np.int32 and v["pixel_values"].shape == (0, 1176)
    gt = vision.smart_nframes(29, 30.0, fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames) // 2
    assert v["video_grid_thw"].tolist() == [[gt, 4, 4]]  # 64×48 px → smart_resize to the fixed 112×112 bound
    assert v["pixel_values_videos"].shape == (gt * 4 * 4, 1176)
    assert (v["input_ids"] == info.video_pad_id).sum() == gt * 4 * 4 // 4
    assert v["second_per_grid_ts"].shape == (1,) and v["second_per_grid_ts"][0] > 0
    assert (i["input_ids"] == info.image_pad_id).sum() == np.prod(i["image_grid_thw"][0]) // 4
    assert i["pixel_values"].shape[0] == np.prod(i["image_grid_thw"][0]) and i["video_grid_thw"].shape == (0, 3)
    np.testing.assert_array_equal(v["attention_mask"], np.ones_like(v["input_ids"]))


BAD_CASES = {  # sample id → (manifest entry or raw line, reason); every case the manifest reader must reject.
    "truncated": (conv("video", "truncated.mp4"), "corrupt_video"),
    "truncated_fast": (conv("video", "truncated_faststart.mp4"), "corrupt_video"),
    "empty_file": (conv("video", "empty.mp4"), "corrupt_video"),
    "zero_frames": (conv("video", "zero_frames.mp4"), "zero_frames"),
    "missing": (conv("video", "nope.mp4"), "missing_file"),
    "unreadable_image": (conv("image", "broken.jpg"), "unreadable_image"),
    "one_frame": (conv("video", "one_frame.mp4"), "too_few_frames"),
    "aspect": (conv("image", "sliver.png"), "bad_aspect_ratio"),
    "malformed": ('{"id": "malformed", ', "malformed_json"),
    "empty": ({"video": "c10_25.mp4", "conversations": []}, "empty_conversation"),
    "roleless": ({"video": "c10_25.mp4", "conversations": [{"content": "<video>"}, {"content": "x"}]}, "bad_role"),
    "non_utf8": ({"video": "c10_25.mp4", "conversations": [{"role": "user", "content": "\udcff"},
                                                           {"role": "assistant", "content": "x"}]}, "non_utf8"),
    "escape": (conv("video", "../../etc/passwd"), "path_escapes_root"),
    "long": (conv("video", "c10_25.mp4", answer="very " * 600), "too_long"),
}


def test_every_bad_input_gets_its_reason_and_is_counted(clip_dir, tmp_path, cfg, caplog):
    lines = []
    for sample_id, (entry, _) in BAD_CASES.items():
        if isinstance(entry, dict):
            entry = dict(entry, id=sample_id)
            lines.append(json.dumps(entry))
        else:
            lines.append(entry)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n" + json.dumps(conv("video", "c10_25.mp4", sample_id="good")) + "\n")
    proc = SampleProcessor(cfg)
    counter = RejectCounter()
    got = {}
    with caplog.at_level(logging.WARNING):
        for rec in manifests.load_manifest(str(path), str(clip_dir)):
            out = proc.map(rec)
            if "rejected" in out:
                counter.add_rejected(out["rejected"], out["id"], out["detail"])
                got[out["id"]] = out["rejected"]
            else:
                counter.add_ok()
    want = {k: v[1] for k, v in BAD_CASES.items()}
    line = list(BAD_CASES).index("malformed") + 1
    got["malformed"] = got.pop(f"bad.jsonl:{line}")  # a line that is not JSON has no id: file and line name it
    assert got == want
    summary = counter.summary()
    assert summary["ok"] == 1 and sum(summary["rejected"].values()) == len(BAD_CASES)
    assert summary["rejected"]["corrupt_video"] == 3 and summary["examples"]["too_long"][0].startswith("long:")
    # Warned once per reason, not once per sample.
    warnings = [r for r in caplog.records if "rejecting samples for reason" in r.getMessage()]
    assert len(warnings) == len(set(want.values()))


def test_reject_fraction_stops_with_examples():
    counter = RejectCounter(max_reject_fraction=0.25, check_after=4)
    for _ in range(3):
        counter.add_ok()
    counter.add_rejected("corrupt_video", "clip_a", "truncated")  # 1/4 = 25%: allowed
    with pytest.raises(TooManyRejectsError, match="clip_b"):
        counter.add_rejected("missing_file", "clip_b")  # 2/5 = 40%
    restored = RejectCounter()
    restored.set_state(counter.get_state())
    assert restored.summary() == counter.summary()
