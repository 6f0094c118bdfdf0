"""A deterministic synthetic demo set — a SMOKE-TEST set, not emotion data.

Cartoon faces (OpenCV drawing) whose mouth and brows show one of five emotions, bobbing and drifting over a
short clip, plus stills of the same faces. It lets every README command and the main job run on a fresh
machine with no download, and is learnable enough for a tiny model's loss to fall. Nothing about real
emotion recognition can be concluded from it.

Written under ``out``::

    videos/clip_XXX.mp4      12 clips, 16 frames at 8 fps, 112×112 (H.264), an AAC track (data/demo_audio.py)
    images/face_XXX.png      6 stills, 96×128
    train.jsonl              conversations (official format) over all clips and stills
    eval_dfew.csv            a DFEW-style fold (video_name,label with DFEW ids) over the clips
    README.txt               this description
"""

from __future__ import annotations

import json
import os

import numpy as np

from emoqwen_jax.data.demo_audio import write_demo_clip
from emoqwen_jax.data.manifests import BENCHMARK_CLASSES

EMOTIONS = ("happy", "sad", "neutral", "angry", "surprise")  # all are DFEW classes
QUESTIONS = ("What emotion does the person show?", "How does this person feel?",
             "Describe the facial expression in one word.")


def draw_face(h: int, w: int, emotion: str, *, cx: float, cy: float, hue: int) -> np.ndarray:
    """uint8[h, w, 3] RGB cartoon face showing ``emotion`` centred at (cx, cy) (fractions of the frame)."""
    import cv2  # noqa: PLC0415

    img = np.full((h, w, 3), (40 + hue % 60, 60, 90 + hue % 100), np.uint8)
    r = int(min(h, w) * 0.32)
    c = (int(cx * w), int(cy * h))
    cv2.circle(img, c, r, (235, 200, 160), -1)
    eye_dy, eye_dx = r // 3, r // 2 - 2
    eye_r = max(2, r // (5 if emotion == "surprise" else 8))
    for sx in (-1, 1):
        eye = (c[0] + sx * eye_dx, c[1] - eye_dy)
        cv2.circle(img, eye, eye_r, (30, 30, 30), -1)
        if emotion in ("angry", "sad"):  # slanted brows: inner end down for angry, up for sad
            inner = (c[0] + sx * (eye_dx // 3), eye[1] - eye_r - (2 if emotion == "angry" else 9))
            outer = (c[0] + sx * (eye_dx + eye_r), eye[1] - eye_r - (9 if emotion == "angry" else 2))
            cv2.line(img, inner, outer, (30, 30, 30), 2)
    mouth = (c[0], c[1] + r // 2)
    axes = (r // 2, r // 4)
    if emotion == "happy":
        cv2.ellipse(img, mouth, axes, 0, 0, 180, (150, 30, 30), 2)
    elif emotion in ("sad", "angry"):
        cv2.ellipse(img, (mouth[0], mouth[1] + r // 5), axes, 0, 180, 360, (150, 30, 30), 2)
    elif emotion == "surprise":
        cv2.ellipse(img, mouth, (r // 5, r // 4), 0, 0, 360, (120, 20, 20), -1)
    else:
        cv2.line(img, (mouth[0] - r // 2, mouth[1]), (mouth[0] + r // 2, mouth[1]), (150, 30, 30), 2)
    return img


def demo_clip(index: int, emotion: str, frames: int = 16, size: int = 112) -> np.ndarray:
    """uint8[frames, size, size, 3]: the face bobs and drifts (seeded by ``index``)."""
    rng = np.random.default_rng(index)
    x0, y0, dx = rng.uniform(0.4, 0.6), rng.uniform(0.45, 0.55), rng.uniform(-0.1, 0.1)
    t = np.linspace(0, 1, frames)
    return np.stack([draw_face(size, size, emotion, cx=x0 + dx * ti, cy=y0 + 0.04 * np.sin(6.3 * ti), hue=index * 37)
                     for ti in t])


def build_demo(out: str, *, num_clips: int = 12, num_images: int = 6) -> dict[str, str]:
    """Writes the demo set under ``out`` (idempotent, deterministic); returns the paths of its manifests."""
    from PIL import Image  # noqa: PLC0415

    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    entries, fold = [], ["video_name,label"]
    for i in range(num_clips):
        emotion = EMOTIONS[i % len(EMOTIONS)]
        rel = f"videos/clip_{i:03d}.mp4"
        write_demo_clip(os.path.join(out, rel), demo_clip(i, emotion), 8.0, emotion, i)  # with its label's sound
        entries.append({"id": f"clip_{i:03d}", "video": rel, "label": emotion, "conversations": [
            {"role": "user", "content": f"<video>\n{QUESTIONS[i % len(QUESTIONS)]}"},
            {"role": "assistant", "content": f"The person looks {emotion}."}]})
        fold.append(f"videos/clip_{i:03d},{BENCHMARK_CLASSES['dfew'].index(emotion) + 1}")
    for i in range(num_images):
        emotion = EMOTIONS[(i + 2) % len(EMOTIONS)]
        rel = f"images/face_{i:03d}.png"
        Image.fromarray(draw_face(96, 128, emotion, cx=0.5, cy=0.5, hue=i * 53)).save(os.path.join(out, rel))
        entries.append({"id": f"face_{i:03d}", "image": rel, "label": emotion, "conversations": [
            {"role": "user", "content": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
            {"role": "assistant", "content": f"The person looks {emotion}."}]})
    paths = {"train": os.path.join(out, "train.jsonl"), "eval_dfew": os.path.join(out, "eval_dfew.csv")}
    with open(paths["train"], "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    with open(paths["eval_dfew"], "w") as f:
        f.write("\n".join(fold) + "\n")
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(__doc__)
    return paths
