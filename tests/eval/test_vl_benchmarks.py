"""The general benchmarks' readers on fixtures in each benchmark's published layout (a few rows, images made
here), and their scores on hand-made predictions against values computed by hand from the definitions."""

import base64
import io
import json

import pytest
from PIL import Image

from emoqwen_jax.eval.general import benchmarks as general
from emoqwen_jax.eval.general import data as vl_data
from emoqwen_jax.eval.general import scores as vl_scores


def png(color=(200, 30, 30), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(color, "JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


# ----- MMBench -----
MMB_HEADER = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit\n"


def test_mmbench_reader_and_circular_scores(tmp_path):
    b64 = base64.b64encode(png()).decode()
    (tmp_path / "mmbench_dev_20230712.tsv").write_text(
        MMB_HEADER
        + f"0\tWhat color?\tA hint.\tred\tgreen\tblue\tpink\tA\tattribute_recognition\t{b64}\tx\tfp\tnan\tdev\n"
        + f"1\tIs it day?\tnan\tyes\tno\tnan\tnan\tB\timage_scene\t{b64}\tx\tcp\tnan\tdev\n")
    items = vl_data.read_mmbench(str(tmp_path), str(tmp_path / "cache"), circular=True)
    assert [it.id for it in items] == ["0", "1000000", "2000000", "3000000", "1", "1000001"]
    assert items[0].question == ("A hint.\nWhat color?\nA. red\nB. green\nC. blue\nD. pink\n"
                                 "Answer with the option's letter from the given choices directly.")
    # Rotation 1: options shift left, so 'red' (the answer) moves from A to D.
    assert items[1].options == {"A": "green", "B": "blue", "C": "pink", "D": "red"} and items[1].answer == "D"
    assert items[5].options == {"A": "no", "B": "yes"} and items[5].answer == "A"
    assert (tmp_path / "cache" / "0.png").exists() and items[4].meta["hint"] == ""
    # Question 0 right in every rotation; question 1 right unrotated only.
    preds = {"0": "A", "1000000": "D", "2000000": "(C)", "3000000": "B", "1": "B", "1000001": "B"}
    s = vl_scores.score_choice(items, preds, by="category")
    assert s["n"] == 2 and s["accuracy"] == 1.0 and s["circular_accuracy"] == 0.5
    assert s["accuracy_by_category"] == {"attribute_recognition": 1.0, "image_scene": 0.0}
    assert s["headline"] == "circular_accuracy" and s["invalid_rate"] == 0.0
    # Without circular: one item per question, vanilla accuracy; an invalid answer is wrong and counted.
    plain = vl_data.read_mmbench(str(tmp_path), str(tmp_path / "cache"))
    s = vl_scores.score_choice(plain, {"0": "A or B", "1": "B"})
    assert s["accuracy"] == 0.5 and s["invalid_rate"] == 0.5 and "circular_accuracy" not in s


def test_mmbench_file_with_circular_rows_and_image_references(tmp_path):
    b64 = base64.b64encode(png()).decode()
    (tmp_path / "MMBench_DEV_EN.tsv").write_text(
        MMB_HEADER + f"5\tQ?\tnan\tx\ty\tnan\tnan\tA\tc\t{b64}\ts\tl\tnan\tdev\n"
        + "1000005\tQ?\tnan\ty\tx\tnan\tnan\tB\tc\t5\ts\tl\tnan\tdev\n")  # image: the index of row 5
    items = vl_data.read_mmbench(str(tmp_path), str(tmp_path / "c"), circular=True)
    assert [it.id for it in items] == ["5", "1000005"] and all(it.image for it in items)
    assert vl_scores.score_choice(items, {"5": "A", "1000005": "A"})["circular_accuracy"] == 0.0


def test_mmbench_bad_answer_is_an_error(tmp_path):
    (tmp_path / "x.tsv").write_text(MMB_HEADER + "0\tQ\tnan\ta\tb\tnan\tnan\tC\tc\t\ts\tl\tnan\tdev\n")
    with pytest.raises(ValueError, match="not one of the options"):
        vl_data.read_mmbench(str(tmp_path), str(tmp_path / "c"))


# ----- MME -----
def write_mme(root):
    for stem in ("a", "b", "c"):  # flat layout: image beside its txt
        write_image(root / "existence" / f"{stem}.jpg")
        (root / "existence" / f"{stem}.txt").write_text(f"Is there {stem}? Please answer yes or no.\tYes\n"
                                                        f"Is there no {stem}? Please answer yes or no.\tNo\n")
    for stem in ("x", "y"):  # split layout
        write_image(root / "artwork" / "images" / f"{stem}.png")
        (root / "artwork" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (root / "artwork" / "questions_answers_YN" / f"{stem}.txt").write_text("Q1\tNo\nQ2\tYes\n")
    write_image(root / "code_reasoning" / "k.png")
    (root / "code_reasoning" / "k.txt").write_text("Q1\tYes\nQ2\tNo\n")


def test_mme_scores_by_hand(tmp_path):
    write_mme(tmp_path)
    items = vl_data.read_mme(str(tmp_path))
    assert len(items) == 12 and items[0].question.endswith("Answer the question using a single word or phrase.")
    assert {it.group for it in items} == {"existence/a", "existence/b", "existence/c", "artwork/x", "artwork/y",
                                          "code_reasoning/k"}
    preds = {"existence/a/0": "Yes", "existence/a/1": "No",  # both right
             "existence/b/0": "yes", "existence/b/1": "yes",  # one right
             "existence/c/0": "maybe", "existence/c/1": "no",  # invalid (wrong) + right
             "artwork/x/0": "No", "artwork/x/1": "Yes", "artwork/y/0": "no", "artwork/y/1": "yes",
             "code_reasoning/k/0": "No", "code_reasoning/k/1": "Yes"}
    s = vl_scores.score_mme(items, preds)
    ex = s["subtasks"]["existence"]
    # existence: 4 of 6 questions right -> acc 66.67; 1 of 3 images fully right -> acc+ 33.33; score 100.
    assert ex["acc"] == pytest.approx(400 / 6, abs=1e-4) and ex["acc_plus"] == pytest.approx(100 / 3, abs=1e-4)
    assert ex["score"] == pytest.approx(100.0, abs=1e-4)
    assert s["subtasks"]["artwork"]["score"] == 200.0 and s["subtasks"]["code_reasoning"]["score"] == 0.0
    assert s["perception"] == pytest.approx(300.0, abs=1e-4) and s["cognition"] == 0.0
    assert s["perception_max"] == 400 and s["cognition_max"] == 200
    assert s["invalid_rate"] == pytest.approx(1 / 12, abs=1e-6) and "count" in s["subtasks_missing"]


def test_mme_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no subtask folder"):
        vl_data.read_mme(str(tmp_path))
    write_image(tmp_path / "color" / "a.jpg")
    (tmp_path / "color" / "a.txt").write_text("Is it red?  Yes\n")  # spaces, not a tab
    with pytest.raises(ValueError, match="question<TAB>Yes"):
        vl_data.read_mme(str(tmp_path))


# ----- POPE -----
def test_pope_scores_by_hand(tmp_path):
    write_image(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    rows = {"random": [("yes", "Yes"), ("yes", "No"), ("yes", "I cannot tell"), ("no", "Yes"), ("no", "no"),
                       ("no", "No.")],
            "popular": [("yes", "yes"), ("no", "no")]}
    for split, pairs in rows.items():
        (tmp_path / f"coco_pope_{split}.json").write_text("".join(
            json.dumps({"question_id": i + 1, "image": "COCO_val2014_000000000001.jpg",
                        "text": "Is there a cat in the image?", "label": label}) + "\n"
            for i, (label, _) in enumerate(pairs)))
    items = vl_data.read_pope(str(tmp_path), splits=("random", "popular"))
    preds = {f"{split}/{i + 1}": p for split, pairs in rows.items() for i, (_, p) in enumerate(pairs)}
    s = vl_scores.score_pope(items, preds)
    r = s["splits"]["random"]
    # TP 1, FN 2 (a "no" and an invalid answer to yes-questions), FP 1, TN 2.
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (1, 2, 1, 2)
    assert r["accuracy"] == 0.5 and r["precision"] == 0.5 and r["recall"] == pytest.approx(1 / 3, abs=1e-6)
    assert r["f1"] == pytest.approx(0.4, abs=1e-6) and r["yes_ratio"] == pytest.approx(2 / 6, abs=1e-6)
    assert s["splits"]["popular"]["f1"] == 1.0
    assert s["f1"] == pytest.approx(0.7, abs=1e-6) and s["accuracy"] == 0.75  # mean over splits
    assert s["invalid_rate"] == pytest.approx(1 / 8, abs=1e-6) and s["headline"] == "f1"
    with pytest.raises(FileNotFoundError, match="coco_pope_adversarial"):
        vl_data.read_pope(str(tmp_path))


# ----- ScienceQA, SEED-Bench -----
def test_scienceqa_image_subset(tmp_path):
    problems = {"7": {"question": "Which is a mammal?", "choices": ["cat", "shark", "frog"], "answer": 0,
                      "hint": "Animals.", "image": "image.png", "subject": "natural science"},
                "8": {"question": "Text only?", "choices": ["a", "b"], "answer": 1, "hint": "", "image": None,
                      "subject": "language science"},
                "9": {"question": "Which?", "choices": ["x", "y"], "answer": 1, "hint": "", "image": "image.png",
                      "subject": "social science"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": [], "val": [], "test": ["7", "8", "9"]}))
    write_image(tmp_path / "images" / "test" / "7" / "image.png")
    items = vl_data.read_scienceqa(str(tmp_path))
    assert [it.id for it in items] == ["7", "9"] and items[1].image == ""  # 9's image is missing: invalid later
    assert items[0].question.startswith("Context: Animals.\nWhich is a mammal?\nA. cat\nB. shark\nC. frog\n")
    s = vl_scores.score_choice(items, {"7": "A", "9": None}, by="subject")
    assert s["accuracy"] == 0.5 and s["invalid_rate"] == 0.5
    assert s["accuracy_by_subject"] == {"natural science": 1.0, "social science": 0.0}


def test_seedbench_image_questions(tmp_path):
    write_image(tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg")
    q = {"answer": "B", "choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four",
         "data_id": "1454426_2591111986.jpg", "data_type": "image", "question": "How many?",
         "question_id": "101669", "question_type_id": 5}
    video = dict(q, data_type="video", data_id="v.mp4", question_id="2")
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({"questions": [q, video],
                                                           "question_type": {"Instance Counting": 5}}))
    items = vl_data.read_seedbench(str(tmp_path))
    assert [it.id for it in items] == ["101669"] and items[0].options["B"] == "two"
    s = vl_scores.score_choice(items, {"101669": "two"}, by="question_type")
    assert s["accuracy"] == 1.0 and s["accuracy_by_question_type"] == {"Instance Counting": 1.0}


# ----- TextVQA, VQAv2 -----
def test_textvqa_and_vqav2_readers_and_scores(tmp_path):
    write_image(tmp_path / "tv" / "train_images" / "003a8ae2ef43b901.jpg")
    (tmp_path / "tv" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_version": "0.5.1", "data": [
        {"question": "what is the brand?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
         "answers": ["Nokia"] * 10, "set_name": "val"}]}))
    items = vl_data.read_textvqa(str(tmp_path / "tv"))
    assert items[0].question == "what is the brand?\nAnswer the question using a single word or phrase."
    # TextVQA normalises the human answers too ("Nokia" -> "nokia"); VQAv2's rule would not.
    assert vl_scores.score_vqa(items, {"34602": "nokia"}, gt_rule="always")["accuracy"] == 1.0

    root = tmp_path / "vqa"
    write_image(root / "val2014" / "COCO_val2014_000000262148.jpg")
    questions = json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": 262148, "question": "How many dogs?", "question_id": 262148000},
        {"image_id": 262148, "question": "Is it sunny?", "question_id": 262148001}]})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(questions)

    def answers(xs):
        return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(xs)]

    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 262148000, "image_id": 262148, "answer_type": "number", "question_type": "how many",
         "answers": answers(["2"] * 3 + ["3"] * 7), "multiple_choice_answer": "3"},
        {"question_id": 262148001, "image_id": 262148, "answer_type": "yes/no", "question_type": "is it",
         "answers": answers(["yes"] * 10), "multiple_choice_answer": "yes"}]}))
    items = vl_data.read_vqav2(str(root))
    s = vl_scores.score_vqa(items, {"262148000": "Two.", "262148001": "  "})
    assert s["accuracy_by_answer_type"] == {"number": 0.9, "yes/no": 0.0}
    assert s["accuracy"] == 0.45 and s["invalid_rate"] == 0.5  # a blank answer is invalid and scores 0


def test_general_specs_limit_and_errors(tmp_path):
    write_mme(tmp_path)
    items = general.load_items({"benchmark": "mme", "root": str(tmp_path), "limit": 2}, str(tmp_path / "o"))
    assert len(items) == 4 and len({it.group for it in items}) == 2  # two images, both questions each
    with pytest.raises(ValueError, match="unknown spec keys"):
        general.load_items({"benchmark": "mme", "root": str(tmp_path), "splitz": 1}, "o")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        general.load_items({"benchmark": "pope", "root": str(tmp_path / "nope")}, "o")
    with pytest.raises(ValueError, match="unknown general benchmark"):
        general.get_general("gqa")
    with pytest.raises(ValueError, match="not questions of this benchmark"):
        vl_scores.score_mme(items, {"other": "yes"})
