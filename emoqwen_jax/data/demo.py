"""A deterministic synthetic demo set — a SMOKE-TEST set, not emotion data.

Cartoon faces (OpenCV drawing) whose mouth, brows and eyes show one of five emotions, bobbing and drifting
over a short clip, plus stills of the same faces. It lets every README command and the main job run on a
fresh machine with no download, and it is learnable: the demo preset's tiny model, trained from scratch,
names the expression of clips it never saw (README command 1 ends by scoring exactly that). Nothing about
real emotion recognition can be concluded from it.

Every training conversation asks the DFEW benchmark question (``benchmark_prompt('dfew')``, the prompt
``emoqwen-eval`` asks) and answers with the one class word, so the held-out fold is scored as DFEW is.
Written under ``out``::

    videos/clip_XXX.mp4      training clips, 8 frames at 8 fps, 112×112 (H.264), an AAC track (data/demo_audio.py)
    videos/heldout_XXX.mp4   held-out clips (other positions, drifts and colours), never trained on
    images/face_XXX.png      training stills, 96×128
    train.jsonl              conversations (official format) over the training clips and stills
    train_think.jsonl        the same, answered "<think>a cue</think><answer>class</answer>"
    train_format.jsonl       the same, answered "<think>the face</think><answer>class</answer>": one think text
                             for every clip, so the class word is the answer's only decision (the RL demo)
    eval_dfew.csv            a DFEW-style fold (video_name,label with DFEW ids) over the held-out clips
    README.txt               this description
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from emoqwen_jax.data.demo_audio import write_demo_clip
from emoqwen_jax.data.manifests import BENCHMARK_CLASSES, benchmark_prompt
from emoqwen_jax.runtime import storage

EMOTIONS = ("happy", "sad", "neutral", "angry", "surprise")  # all are DFEW classes
# 1-s clips: sampled at 2 fps (training) or 3 fps (the standard eval), both give min_frames = 4 frames, so
# training and evaluation see the same frames.
FPS, FRAMES, SIZE = 8.0, 8, 112  # clip frame rate, frames per clip and side in pixels
HELDOUT_SEED = 10_000  # held-out clips draw their motion and colours from seeds above every training clip's


def draw_face(h: int, w: int, emotion: str, *, cx: float, cy: float, hue: int) -> np.ndarray:
    """uint8[h, w, 3] RGB cartoon face showing ``emotion`` centred at (cx, cy) (fractions of the frame)."""
    import cv2  # noqa: PLC0415

    img = np.full((h, w, 3), (40 + hue % 60, 60, 90 + hue % 100), np.uint8)
    r = int(min(h, w) * 0.42)  # the face fills most of the frame: its features span many patches
    c = (int(cx * w), int(cy * h))
    line = max(2, r // 7)  # strokes thick enough to survive 14-px patches and H.264
    cv2.circle(img, c, r, (235, 200, 160), -1)
    eye_dy, eye_dx = r // 3, r // 2 - 2
    eye_r = max(2, r // (5 if emotion == "surprise" else 8))
    for sx in (-1, 1):
        eye = (c[0] + sx * eye_dx, c[1] - eye_dy)
        cv2.circle(img, eye, eye_r, (30, 30, 30), -1)
        if emotion in ("angry", "sad"):  # slanted brows: inner end down for angry, up for sad
            inner = (c[0] + sx * (eye_dx // 3), eye[1] - eye_r - (2 if emotion == "angry" else 9))
            outer = (c[0] + sx * (eye_dx + eye_r), eye[1] - eye_r - (9 if emotion == "angry" else 2))
            cv2.line(img, inner, outer, (30, 30, 30), line)
    mouth = (c[0], c[1] + r // 2)
    axes = (r // 2, r // 4)
    if emotion == "happy":
        cv2.ellipse(img, mouth, axes, 0, 0, 180, (150, 30, 30), line)
    elif emotion == "sad":
        cv2.ellipse(img, (mouth[0], mouth[1] + r // 5), axes, 0, 180, 360, (150, 30, 30), line)
    elif emotion == "angry":  # clenched: a filled bar of teeth under the frown brows
        cv2.rectangle(img, (mouth[0] - r // 3, mouth[1] - r // 7), (mouth[0] + r // 3, mouth[1] + r // 7),
                      (150, 30, 30), -1)
    elif emotion == "surprise":
        cv2.ellipse(img, mouth, (r // 5, r // 4), 0, 0, 360, (120, 20, 20), -1)
    else:
        cv2.line(img, (mouth[0] - r // 2, mouth[1]), (mouth[0] + r // 2, mouth[1]), (150, 30, 30), line)
    return img


def demo_clip(index: int, emotion: str, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """uint8[frames, size, size, 3]: the face bobs and drifts (seeded by ``index``)."""
    rng = np.random.default_rng(index)
    x0, y0, dx = rng.uniform(0.45, 0.55), rng.uniform(0.47, 0.53), rng.uniform(-0.05, 0.05)
    t = np.linspace(0, 1, frames)
    return np.stack([draw_face(size, size, emotion, cx=x0 + dx * ti, cy=y0 + 0.02 * np.sin(6.3 * ti), hue=index * 37)
                     for ti in t])


def write_clip(path: str, index: int, emotion: str) -> None:
    """One demo clip (seed ``index``) as an mp4 at ``path`` with its label's sound (the one place clips are
    written)."""
    write_demo_clip(path, demo_clip(index, emotion), FPS, emotion, index)


# What each expression's drawing shows (draw_face), in a few words: the reasoning of the think/answer answers.
CUES = {"happy": "mouth up", "sad": "mouth down", "neutral": "mouth flat", "angry": "brows down",
        "surprise": "mouth round"}


FIXED_THINK = "the face"  # train_format.jsonl's think text, the same for every clip


def conversation(sample_id: str, kind: str, rel: str, emotion: str, think: str | None = None) -> dict:
    """A training record: the DFEW question about the medium, answered with the one class word; ``think``
    "cue": ``<think>cue</think><answer>word</answer>``, "fixed": the same with ``FIXED_THINK`` as the think."""
    question = benchmark_prompt("dfew").replace("video", kind)  # "<image>\n… in this image? …" for stills
    if think not in (None, "cue", "fixed"):
        raise ValueError(f"think={think!r}; choose None, 'cue' or 'fixed'")
    answer = emotion if think is None else \
        f"<think>{CUES[emotion] if think == 'cue' else FIXED_THINK}</think><answer>{emotion}</answer>"
    return {"id": sample_id, kind: rel, "label": emotion, "conversations": [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build_demo(out: str, *, num_clips: int = 60, num_images: int = 10, num_heldout: int = 25) -> dict[str, str]:
    """Writes the demo set under ``out`` (idempotent, deterministic); returns the paths of its manifests.
    Emotions cycle through ``EMOTIONS``, so multiples of 5 give balanced classes."""
    from PIL import Image  # noqa: PLC0415

    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    entries, fold = [], ["video_name,label"]
    for i in range(num_clips):
        emotion = EMOTIONS[i % len(EMOTIONS)]
        rel = f"videos/clip_{i:03d}.mp4"
        write_clip(os.path.join(out, rel), i, emotion)
        entries.append(conversation(f"clip_{i:03d}", "video", rel, emotion))
    for i in range(num_images):
        emotion = EMOTIONS[(i + 2) % len(EMOTIONS)]
        rel = f"images/face_{i:03d}.png"
        Image.fromarray(draw_face(96, 128, emotion, cx=0.5, cy=0.5, hue=i * 53)).save(os.path.join(out, rel))
        entries.append(conversation(f"face_{i:03d}", "image", rel, emotion))
    for j in range(num_heldout):
        emotion = EMOTIONS[j % len(EMOTIONS)]
        write_clip(os.path.join(out, f"videos/heldout_{j:03d}.mp4"), HELDOUT_SEED + j, emotion)
        fold.append(f"videos/heldout_{j:03d},{BENCHMARK_CLASSES['dfew'].index(emotion) + 1}")
    paths = {name: os.path.join(out, f"{name}.jsonl") for name in ("train", "train_think", "train_format")}
    paths["eval_dfew"] = os.path.join(out, "eval_dfew.csv")
    with open(paths["train"], "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    for name, think in (("train_think", "cue"), ("train_format", "fixed")):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(conversation(e["id"], kind, e[kind], e["label"], think=think)) + "\n"
                         for e in entries for kind in ("video", "image") if kind in e)
    with open(paths["eval_dfew"], "w") as f:
        f.write("\n".join(fold) + "\n")
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(__doc__)
    return paths


DEMO_PLACEHOLDER = "{demo}"  # in a mixture's manifest or data_root, or an eval spec's paths: the bundled demo set


def demo_root(workdir: str) -> str:
    """Where a run builds the demo set: ``workdir/demo_data``; with a remote workdir (a URI), a local folder of
    this process (every host builds its own copy: the set is small and deterministic)."""
    if storage.is_uri(workdir):
        return os.path.join(tempfile.gettempdir(), f"emoqwen_demo_data_{os.getpid()}")
    return os.path.join(workdir, "demo_data")


def fill_demo(value: Any, root: str) -> Any:
    """``value`` (a string, or dicts/lists/tuples of them) with ``{demo}`` replaced by ``root``."""
    if isinstance(value, str):
        return value.replace(DEMO_PLACEHOLDER, root)
    if isinstance(value, dict):
        return {k: fill_demo(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fill_demo(v, root) for v in value)
    return value


def demo_stages(config: Any) -> list[str]:
    """The stages of ``config.run_stages`` whose mixture reads the bundled demo set."""
    return [name for name in config.run_stages
            if any(DEMO_PLACEHOLDER in str(v) for e in config.stages[name].mixture for v in dict(e).values())]


def check_demo_data(config: Any) -> None:
    """Refuses to train on the demo set unless ``config.allow_demo_data`` (True only in the demo and tiny
    presets): a forgotten ``mixture`` override must not silently train a 7B model on cartoons."""
    stages = demo_stages(config)
    if not stages or config.allow_demo_data:
        return
    fields = " ".join(f"--config.stages.{name}.mixture=\"({{'manifest': ..., 'data_root': ...}},)\"" for name in stages)
    raise ValueError(
        f"preset {config.preset!r} would train stages {stages} on the bundled demo set (synthetic "
        f"cartoon faces, a smoke test): set the data of each with {fields}, or pass --config.allow_demo_data=True "
        f"to train on the demo set on purpose")
