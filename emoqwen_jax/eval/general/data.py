"""Readers for the general vision-language benchmarks, each from its PUBLISHED annotation layout in a folder
(a local path or a URI such as ``gs://bucket/MME``, read through ``emoqwen_jax.runtime.storage``; nothing is
downloaded), into one item list the runner answers and the scorers score.

Layouts (``root`` is the folder a user points ``--root`` / the suite config at; file names can be overridden):
  MMBench     ``root/mmbench_dev_*.tsv`` (or ``MMBench_DEV_EN*.tsv``): columns index, question, hint, A, B, C,
              D[, E, F], answer, category, l2-category, split, image (base64 PNG/JPEG, or the index of a row
              holding it). Rows whose ``index`` agree modulo 1e6 are circular variants of one question.
  MME         ``root/<subtask>/`` with ``X.jpg|png`` beside ``X.txt``, or in ``images/`` and
              ``questions_answers_YN/`` (artwork, celebrity, landmark, posters, scene); each txt holds lines
              ``question<TAB>Yes|No`` (two per image). Subtasks: ``MME_PERCEPTION``/``MME_COGNITION``.
  POPE        ``root/coco_pope_{random,popular,adversarial}.json``: JSON lines {question_id, image, text,
              label}; images under ``image_root`` (default ``root/val2014``).
  ScienceQA   ``root/problems.json`` ({pid: {question, choices, answer, hint, image, subject, …}}),
              ``root/pid_splits.json``; images ``root/images/<split>/<pid>/image.png`` (or ``root/<split>/…``);
              only problems with an image (the "IMG" subset).
  SEED-Bench  ``root/SEED-Bench.json`` ({questions: [{question_id, question, choice_a..d, answer, data_id,
              data_type, question_type_id}], question_type: {name: id}}); image questions only, images
              ``root/SEED-Bench-image/<data_id>``.
  TextVQA     ``root/TextVQA_0.5.1_val.json`` ({data: [{question_id, question, image_id, answers}]});
              images ``root/train_images/<image_id>.jpg`` (the val images ship in train_images).
  VQAv2       ``root/v2_OpenEnded_mscoco_val2014_questions.json`` + ``root/v2_mscoco_val2014_annotations.json``;
              images ``root/val2014/COCO_val2014_<image_id:012d>.jpg``.

Prompts follow the common conventions (LLaVA / VLMEvalKit): short answers end with ``SHORT_ANSWER``;
multiple choice lists "A. …" lines and ends with ``MC_INSTRUCTION``.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import sys
from typing import Any

from emoqwen_jax.eval.choice import LETTERS
from emoqwen_jax.runtime import storage

SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CIRCULAR_OFFSET = 1_000_000  # MMBench: variant k of question i has index i + k·1e6
POPE_SPLITS = ("random", "popular", "adversarial")


@dataclasses.dataclass(frozen=True)
class VLItem:
    """One question. ``group``: the unit scores aggregate over (an MME image, an MMBench question)."""

    id: str
    image: str  # path of the image ('' when the annotation names none that exists: answered as invalid)
    question: str  # the full user text
    answer: str  # an option letter, 'yes'/'no', or '' (open answers: see ``answers``)
    answers: tuple[str, ...] = ()  # VQA: the human answers
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    group: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _need(path: str, what: str) -> str:
    if not storage.exists(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    return path


def load_json(path: str, what: str) -> Any:
    """A JSON file, with errors that name ``what`` and the path."""
    with storage.open(_need(path, what), "r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def _find_one(root: str, patterns: tuple[str, ...], what: str) -> str:
    for pattern in patterns:
        hits = storage.glob(_need(root, what), pattern)
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{what}: no {' or '.join(patterns)} under {root}")


def mc_question(question: str, options: dict[str, str], context: str = "") -> str:
    lines = ([context] if context else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines + [MC_INSTRUCTION])


def _present(cell: str | None) -> bool:
    return cell is not None and cell.strip() != "" and cell.strip().lower() != "nan"


def _rotations(item: VLItem, index: int) -> list[VLItem]:
    """The circular variants of an MMBench question: options shifted by k = 0..n−1, answer moved along."""
    letters, texts = list(item.options), list(item.options.values())
    n, truth = len(letters), letters.index(item.answer)
    out = []
    for k in range(n):
        options = {letters[i]: texts[(i + k) % n] for i in range(n)}
        out.append(dataclasses.replace(item, id=str(index + k * CIRCULAR_OFFSET), options=options,
                                       answer=letters[(truth - k) % n],
                                       question=mc_question(item.meta["question"], options, item.meta["hint"]),
                                       meta={**item.meta, "rotation": k}))
    return out


def read_mmbench(root: str, image_cache: str, *, circular: bool = False, file: str = "") -> list[VLItem]:
    """MMBench dev TSV -> items; base64 images are written once to ``image_cache``. With ``circular`` and a
    file of single rows, the rotated variants are made here (a file that has them is used as given)."""
    path = _need(storage.join(root, file), "mmbench") if file else _find_one(
        root, ("mmbench_dev*.tsv", "MMBench_DEV*.tsv", "*.tsv"), "mmbench")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with storage.open(path, "r", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    need = {"index", "question", "answer", "A", "B"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path}: an MMBench TSV needs columns {sorted(need)} (+ image, hint, C, D…); "
                         f"got {list(rows[0]) if rows else 'no rows'}")
    storage.makedirs(image_cache)
    images = {r["index"].strip(): r.get("image", "") for r in rows}
    items, groups = [], {}
    for line, r in enumerate(rows, start=2):
        index = int(float(r["index"]))
        options = {k: r[k].strip() for k in LETTERS[:8] if _present(r.get(k))}
        answer = r["answer"].strip()
        if answer not in options:
            raise ValueError(f"{path}:{line}: answer {answer!r} is not one of the options {list(options)}")
        image = (r.get("image") or "").strip()
        if image and len(image) <= 64 and image in images:  # a reference to another row's image
            image = images[image].strip()
        image_path = storage.join(image_cache, f"{index}.png")
        if image and not storage.exists(image_path):
            with storage.open(image_path, "wb") as out:
                out.write(base64.b64decode(image))
        hint = r["hint"].strip() if _present(r.get("hint")) else ""
        group = str(index % CIRCULAR_OFFSET)
        meta = {"question": r["question"].strip(), "hint": hint, "category": (r.get("category") or "").strip(),
                "l2_category": (r.get("l2-category") or "").strip(), "rotation": index // CIRCULAR_OFFSET}
        item = VLItem(str(index), image_path if image else "", mc_question(meta["question"], options, hint),
                      answer, options=options, group=group, meta=meta)
        groups.setdefault(group, []).append(item)
        items.append(item)
    if circular and all(len(g) == 1 for g in groups.values()):
        items = [v for item in items for v in _rotations(item, int(item.id))]
    return items


MME_SPLIT_LAYOUT = ("images", "questions_answers_YN")
# MME's subtask folders (perception then cognition), in the order its scores are reported.
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def read_mme(root: str) -> list[VLItem]:
    """The MME release folder -> two yes/no items per image, grouped by image."""
    items = []
    for task in MME_PERCEPTION + MME_COGNITION:
        task_dir = storage.join(_need(root, "mme"), task)
        if not storage.isdir(task_dir):
            continue
        img_dir, qa_dir = task_dir, task_dir
        if storage.isdir(storage.join(task_dir, MME_SPLIT_LAYOUT[1])):
            img_dir, qa_dir = (storage.join(task_dir, d) for d in MME_SPLIT_LAYOUT)
        names = set(storage.listdir(img_dir)) if storage.isdir(img_dir) else set()  # one listing, not a lookup each
        for txt in storage.glob(qa_dir, "*.txt"):
            stem = os.path.splitext(os.path.basename(txt))[0]
            image = next((storage.join(img_dir, stem + e) for e in (".jpg", ".png", ".jpeg") if stem + e in names), "")
            with storage.open(txt, "r", encoding="utf-8") as f:
                lines = [ln.rstrip("\n") for ln in f if ln.strip()]
            for k, ln in enumerate(lines):
                question, sep, answer = ln.rpartition("\t")
                if not sep or answer.strip().lower() not in ("yes", "no"):
                    raise ValueError(f"{txt}:{k + 1}: expected 'question<TAB>Yes|No', got {ln!r}")
                items.append(VLItem(f"{task}/{stem}/{k}", image, f"{question.strip()}\n{SHORT_ANSWER}",
                                    answer.strip().lower(), group=f"{task}/{stem}", meta={"subtask": task}))
    if not items:
        raise FileNotFoundError(f"mme: no subtask folder with question files under {root} (expected e.g. "
                                f"{storage.join(root, 'existence')})")
    return items


def read_pope(root: str, image_root: str = "", splits: tuple[str, ...] = POPE_SPLITS) -> list[VLItem]:
    """POPE JSON-lines files (one per split) -> yes/no items."""
    image_root = image_root or storage.join(root, "val2014")
    items = []
    for split in splits:
        if split not in POPE_SPLITS:
            raise ValueError(f"pope split {split!r}; valid: {POPE_SPLITS}")
        path = _find_one(root, (f"coco_pope_{split}.json", f"*pope_{split}.json*"), f"pope {split}")
        with storage.open(path, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                label = str(row.get("label", "")).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"{path}:{line_no}: label must be yes or no, got {row.get('label')!r}")
                image = storage.join(image_root, row["image"])
                items.append(VLItem(f"{split}/{row['question_id']}", image if storage.exists(image) else "",
                                    f"{row['text'].strip()}\n{SHORT_ANSWER}", label, meta={"split": split}))
    return items


def read_scienceqa(root: str, split: str = "test") -> list[VLItem]:
    """ScienceQA problems of ``split`` that have an image -> multiple-choice items."""
    problems = load_json(storage.join(root, "problems.json"), "scienceqa")
    splits = load_json(storage.join(root, "pid_splits.json"), "scienceqa")
    if split not in splits:
        raise ValueError(f"scienceqa: split {split!r} not in pid_splits.json ({sorted(splits)})")
    items = []
    for pid in splits[split]:
        p = problems[str(pid)]
        if not p.get("image"):
            continue  # the image subset only
        options = {LETTERS[i]: str(c) for i, c in enumerate(p["choices"])}
        image = next((c for c in (storage.join(root, "images", split, str(pid), p["image"]),
                                  storage.join(root, split, str(pid), p["image"])) if storage.exists(c)), "")
        hint = (p.get("hint") or "").strip()
        items.append(VLItem(str(pid), image, mc_question(p["question"], options, f"Context: {hint}" if hint else ""),
                            LETTERS[int(p["answer"])], options=options, group=str(pid),
                            meta={"subject": p.get("subject", "")}))
    return items


def read_seedbench(root: str, file: str = "SEED-Bench.json", image_dir: str = "SEED-Bench-image") -> list[VLItem]:
    """SEED-Bench (v1) image questions -> multiple-choice items."""
    blob = load_json(storage.join(root, file), "seedbench")
    type_names = {v: k for k, v in blob.get("question_type", {}).items()}
    items = []
    for q in blob["questions"]:
        if q.get("data_type", "image") != "image":
            continue
        options = {L: str(q[f"choice_{L.lower()}"]) for L in "ABCD" if f"choice_{L.lower()}" in q}
        image = storage.join(root, image_dir, q["data_id"])
        items.append(VLItem(str(q["question_id"]), image if storage.exists(image) else "",
                            mc_question(q["question"], options), q["answer"].strip(), options=options,
                            group=str(q["question_id"]),
                            meta={"question_type": type_names.get(q.get("question_type_id"),
                                                                  str(q.get("question_type_id", "")))}))
    return items


def read_textvqa(root: str, file: str = "TextVQA_0.5.1_val.json", image_dir: str = "train_images") -> list[VLItem]:
    blob = load_json(storage.join(root, file), "textvqa")
    items = []
    for q in blob["data"]:
        image = storage.join(root, image_dir, f"{q['image_id']}.jpg")
        items.append(VLItem(str(q["question_id"]), image if storage.exists(image) else "",
                            f"{q['question'].strip()}\n{SHORT_ANSWER}", "", answers=tuple(q["answers"]),
                            group=str(q["question_id"])))
    return items


def read_vqav2(root: str, questions: str = "v2_OpenEnded_mscoco_val2014_questions.json",
               annotations: str = "v2_mscoco_val2014_annotations.json", image_dir: str = "val2014") -> list[VLItem]:
    qs = load_json(storage.join(root, questions), "vqav2 questions")
    anns = {a["question_id"]: a for a in load_json(storage.join(root, annotations), "vqav2 annotations")["annotations"]}
    subtype = qs.get("data_subtype", "val2014")
    items = []
    for q in qs["questions"]:
        a = anns.get(q["question_id"])
        if a is None:
            raise ValueError(f"vqav2: question {q['question_id']} has no annotation in {annotations}")
        image = storage.join(root, image_dir, f"COCO_{subtype}_{int(q['image_id']):012d}.jpg")
        items.append(VLItem(str(q["question_id"]), image if storage.exists(image) else "",
                            f"{q['question'].strip()}\n{SHORT_ANSWER}", "",
                            answers=tuple(x["answer"] for x in a["answers"]), group=str(q["question_id"]),
                            meta={"answer_type": a.get("answer_type", "")}))
    return items
