r"""A tiny synthetic copy of each general benchmark in its PUBLISHED layout, and a suite config over it — a
SMOKE-TEST set for the README commands and the trainer's stage eval, not a benchmark.

  python -m emoqwen_jax.eval.general.demo --out demo_general [--emotion_demo demo_data]

Images are coloured shapes drawn here (PIL); questions ask about them, so the answers are checkable, but a
few questions per benchmark say nothing about a model. Written under ``out`` (a folder or a URI such as
``gs://bucket/demo_general``): ``MMBench/``, ``MME_Benchmark_release_version/``, ``POPE/``, ``ScienceQA/``,
``SEED-Bench/``, ``TextVQA/``, ``VQAv2/`` (the layouts of ``vl_data``) and ``suite.json`` (all seven; with
``--emotion_demo``, also DFEW over the emotion demo's ``eval_dfew.csv``), whose ``set`` keeps the images small
(56×56 to 112×112) for the CPU.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os

from emoqwen_jax.runtime import storage

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def shape_image(color: str, shape: str, size: int = 84):
    """A PIL image: one ``color`` ``shape`` on a grey background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return img


def _save(img, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return path


def _json(obj, path: str, lines: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if lines:
            f.writelines(json.dumps(o) + "\n" for o in obj)
        else:
            json.dump(obj, f)


def _cases(n: int) -> list[tuple[str, str]]:
    return [(list(COLORS)[i % len(COLORS)], SHAPES[i % 2]) for i in range(n)]


def write_mmbench(root: str) -> None:
    os.makedirs(root, exist_ok=True)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows = ["\t".join(header)]
    for i, (color, shape) in enumerate(_cases(3)):
        buf = io.BytesIO()
        shape_image(color, shape).save(buf, format="PNG")
        options = list(COLORS)
        rows.append("\t".join([str(i), f"What color is the {shape}?", "nan" if i else "The background is grey.",
                               *options, "ABCD"[options.index(color)], "attribute_recognition",
                               base64.b64encode(buf.getvalue()).decode(), "demo", "finegrained_perception",
                               "nan", "dev"]))
    with open(os.path.join(root, "mmbench_dev_20230712.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def write_mme(root: str) -> None:
    for task, split_layout in (("color", False), ("existence", False), ("artwork", True),
                               ("commonsense_reasoning", False)):
        img_dir = os.path.join(root, task, "images") if split_layout else os.path.join(root, task)
        qa_dir = os.path.join(root, task, "questions_answers_YN") if split_layout else img_dir
        os.makedirs(qa_dir, exist_ok=True)
        for i, (color, shape) in enumerate(_cases(2)):
            _save(shape_image(color, shape), os.path.join(img_dir, f"{i:04d}.jpg"))
            other = "green" if color != "green" else "red"
            with open(os.path.join(qa_dir, f"{i:04d}.txt"), "w") as f:
                f.write(f"Is the {shape} {color}? Please answer yes or no.\tYes\n"
                        f"Is the {shape} {other}? Please answer yes or no.\tNo\n")


def write_pope(root: str) -> None:
    for s, split in enumerate(("random", "popular", "adversarial")):
        rows = []
        for i, (color, shape) in enumerate(_cases(2)):
            image_id = 100 * s + i
            name = f"COCO_val2014_{image_id:012d}.jpg"
            _save(shape_image(color, shape), os.path.join(root, "val2014", name))
            rows += [{"question_id": 2 * i + 1, "image": name, "text": f"Is there a {shape} in the image?",
                      "label": "yes"},
                     {"question_id": 2 * i + 2, "image": name, "text": "Is there a dog in the image?", "label": "no"}]
        _json(rows, os.path.join(root, f"coco_pope_{split}.json"), lines=True)


def write_scienceqa(root: str) -> None:
    problems, test = {}, []
    for i, (color, shape) in enumerate(_cases(3)):
        pid = str(10 + i)
        image = "image.png" if i < 2 else None  # the third has no image: not in the image subset
        if image:
            _save(shape_image(color, shape), os.path.join(root, "images", "test", pid, image))
        problems[pid] = {"question": "Which shape is shown?", "choices": list(SHAPES), "answer": SHAPES.index(shape),
                         "hint": "Look at the picture." if i == 0 else "", "image": image, "task": "closed choice",
                         "grade": "grade2", "subject": "natural science", "topic": "shapes", "category": "Shapes",
                         "skill": "", "lecture": "", "solution": "", "split": "test"}
        test.append(pid)
    _json(problems, os.path.join(root, "problems.json"))
    _json({"train": [], "val": [], "test": test, "minival": [], "minitest": []}, os.path.join(root, "pid_splits.json"))


def write_seedbench(root: str) -> None:
    questions = []
    for i, (color, shape) in enumerate(_cases(3)):
        data_id = f"demo_{i}.jpg"
        _save(shape_image(color, shape), os.path.join(root, "SEED-Bench-image", data_id))
        options = list(COLORS)
        questions.append({"answer": "ABCD"[options.index(color)], "choice_a": options[0], "choice_b": options[1],
                          "choice_c": options[2], "choice_d": options[3], "data_id": data_id, "data_type": "image",
                          "question": f"What is the color of the {shape}?", "question_id": str(100 + i),
                          "question_type_id": 2})
    questions.append({"answer": "A", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
                      "data_id": "v.mp4", "data_type": "video", "question": "video question (skipped)",
                      "question_id": "999", "question_type_id": 10})
    _json({"questions": questions, "question_type": {"Scene Understanding": 1, "Instance Attributes": 2,
                                                     "Action Recognition": 10}},
          os.path.join(root, "SEED-Bench.json"))


def write_textvqa(root: str) -> None:
    data = []
    for i, (color, shape) in enumerate(_cases(2)):
        image_id = f"{i:016x}"
        _save(shape_image(color, shape), os.path.join(root, "train_images", f"{image_id}.jpg"))
        data.append({"question": "what color is the shape?", "image_id": image_id, "image_classes": ["shape"],
                     "image_width": 84, "image_height": 84, "answers": [color] * 8 + ["dark " + color, "unanswerable"],
                     "question_tokens": ["what", "color", "is", "the", "shape"], "question_id": 34602 + i,
                     "set_name": "val"})
    _json({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data},
          os.path.join(root, "TextVQA_0.5.1_val.json"))


def write_vqav2(root: str) -> None:
    questions, annotations = [], []
    for i, (color, shape) in enumerate(_cases(2)):
        image_id = 262148 + i
        _save(shape_image(color, shape), os.path.join(root, "val2014", f"COCO_val2014_{image_id:012d}.jpg"))
        for k, (q, a, t) in enumerate(((f"What color is the {shape}?", color, "other"),
                                       ("How many shapes are there?", "1", "number"),
                                       (f"Is the shape a {shape}?", "yes", "yes/no"))):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": q, "question_id": qid})
            annotations.append({"question_type": "what color is the", "multiple_choice_answer": a,
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j in range(10)],
                                "image_id": image_id, "answer_type": t, "question_id": qid})
    _json({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
           "questions": questions}, os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"))
    _json({"info": {}, "license": {}, "data_subtype": "val2014", "annotations": annotations},
          os.path.join(root, "v2_mscoco_val2014_annotations.json"))


def build_demo_general(out: str, emotion_demo: str = "") -> str:
    """Writes every demo benchmark and ``out/suite.json`` (``out`` may be a URI: written locally, then uploaded);
    returns the suite config's path."""
    with storage.staged_dir(out) as local:
        _write_all(local, _emotion_specs(out, emotion_demo))
    return storage.join(out, "suite.json")


def _emotion_specs(out: str, emotion_demo: str) -> list[dict]:
    """DFEW over the emotion demo, by a path relative to ``out`` when both are local (the set can move)."""
    if not emotion_demo:
        return []
    if storage.is_uri(out) or storage.is_uri(emotion_demo):
        demo = storage.normalize(emotion_demo)
        return [{"benchmark": "dfew", "labels": storage.join(demo, "eval_dfew.csv"), "video_root": demo}]
    demo = os.path.relpath(storage.normalize(emotion_demo), storage.normalize(out))
    return [{"benchmark": "dfew", "labels": os.path.join(demo, "eval_dfew.csv"), "video_root": demo}]


def _write_all(out: str, emotion: list[dict]) -> None:
    write_mmbench(os.path.join(out, "MMBench"))
    write_mme(os.path.join(out, "MME_Benchmark_release_version"))
    write_pope(os.path.join(out, "POPE"))
    write_scienceqa(os.path.join(out, "ScienceQA"))
    write_seedbench(os.path.join(out, "SEED-Bench"))
    write_textvqa(os.path.join(out, "TextVQA"))
    write_vqav2(os.path.join(out, "VQAv2"))
    suite = {"set": {"image_min_pixels": 56 * 56, "image_max_pixels": 112 * 112, "video_min_pixels": 56 * 56,
                     "video_max_pixels": 112 * 112},
             "general": [{"benchmark": "mmbench", "root": "MMBench", "circular": True},
                         {"benchmark": "mme", "root": "MME_Benchmark_release_version"},
                         {"benchmark": "pope", "root": "POPE"},
                         {"benchmark": "scienceqa", "root": "ScienceQA"},
                         {"benchmark": "seedbench", "root": "SEED-Bench"},
                         {"benchmark": "textvqa", "root": "TextVQA"},
                         {"benchmark": "vqav2", "root": "VQAv2"}],
             "emotion": emotion}
    _json(suite, os.path.join(out, "suite.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emoqwen_jax.eval.general.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--emotion_demo", default="", help="the emoqwen-data demo folder, to add DFEW to the suite")
    args = parser.parse_args(argv)
    print(build_demo_general(args.out, args.emotion_demo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
