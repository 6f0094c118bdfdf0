"""Helpers shared by the data tests (imported by name: pytest puts this folder on sys.path)."""

import json

import numpy as np


def numbered_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """uint8[n, h, w, 3]: frame i is a flat grey of level 4 + 8·(i mod 30) plus a colour bar, so a decoded
    frame's index can be read back from its mean (mp4 is lossy, flat areas survive within ±2)."""
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = 4 + 8 * (i % 30)
        frames[i, : h // 4, : w // 4] = (255, 0, 0)
    return frames


def frame_number(frame: np.ndarray) -> int:
    """Inverse of ``numbered_frames`` for frames with i < 30 (reads the flat bottom-right quarter)."""
    h, w = frame.shape[:2]
    return int(round((float(frame[h // 2:, w // 2:].mean()) - 4) / 8))


def write_manifest(path, entries, jsonl=True):
    with open(path, "w") as f:
        if jsonl:
            for e in entries:
                f.write((e if isinstance(e, str) else json.dumps(e)) + "\n")
        else:
            json.dump(entries, f)
    return str(path)


def conv(media_key, rel, answer="The person is happy.", sample_id="s"):
    placeholder = f"<{media_key}>\n"
    return {"id": sample_id, media_key: rel, "conversations": [
        {"role": "user", "content": placeholder + "What emotion does the person show?"},
        {"role": "assistant", "content": answer}]}
