"""emoqwen-score end to end: files in, last-line JSON, PNG and invalid CSV out, exit 2 on bad input."""

import csv
import json
import os
import sys

import pytest
from sklearn.metrics import f1_score

from emoqwen_jax.cli import score as score_cli
from emoqwen_jax.eval import fold_paths, get_benchmark, read_labels

KEYS = {"n", "uar", "war", "weighted_f1", "accuracy", "invalid_rate", "per_class_recall"}


def write(path, text):
    path.write_text(text)
    return str(path)


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def run(capsys, *args):
    code = score_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_dfew_numeric_ids(tmp_path, capsys):
    labels = write(tmp_path / "set_1.csv", "video_name,label\n1,1\n2,2\n3,7\n4,6\n")
    preds = jsonl(tmp_path / "p.jsonl", [{"id": 1, "response": "<answer>Happiness</answer>"},
                                         {"id": "2", "response": "unhappy"},
                                         {"id": "3", "response": "She is scared."}])
    code, out, err = run(capsys, "--benchmark", "dfew", "--predictions", preds, "--labels", labels)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == KEYS
    assert summary["n"] == 4 and summary["war"] == 0.5 and summary["invalid_rate"] == 0.5
    assert summary["uar"] == pytest.approx(0.5)  # happy 1, sad 0, fear 1, disgust 0
    assert summary["per_class_recall"]["neutral"] is None
    assert (tmp_path / "p.confusion.png").stat().st_size > 1000
    with open(tmp_path / "p.invalid.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["label"], r["reason"]) for r in rows] == [("2", "sad", "no_label"),
                                                                  ("4", "disgust", "missing")]


def test_mer_names_weighted_f1_matches_sklearn(tmp_path, capsys):
    labels = write(tmp_path / "mer.csv", "name,discrete\na,worried\nb,happy\nc,neutral\nd,worried\ne,sad\n")
    answers = {"a": "anxious", "b": "happy", "c": "happy", "d": "angry and worried", "e": "Sadness."}
    preds = jsonl(tmp_path / "m.jsonl", [{"id": k, "response": v} for k, v in answers.items()])
    code, out, err = run(capsys, "--benchmark", "mer2024", "--predictions", preds, "--labels", labels)
    assert code == 0, err
    classes = get_benchmark("mer2024").classes
    y_true = [4, 2, 0, 4, 3]
    y_pred = [4, 2, 2, -1, 3]
    want = f1_score(y_true, y_pred, labels=list(range(len(classes))), average="weighted", zero_division=0)
    assert json.loads(out.strip().splitlines()[-1])["weighted_f1"] == pytest.approx(want, abs=1e-6)


def test_mafw_ids_and_reordered_classes(tmp_path):
    bench = get_benchmark("mafw")
    path = write(tmp_path / "set_2.csv", "video_name,label\nx,1\ny,4\nz,Helplessness\n")
    assert read_labels(path, bench) == {"x": 0, "y": 3, "z": 9}  # 1 anger, 4 happiness
    dfew_order = ["happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear", "contempt",
                  "anxiety", "helplessness", "disappointment"]
    by_name = {k: dfew_order[v] for k, v in read_labels(path, bench, dfew_order).items()}
    assert by_name == {"x": "happiness", "y": "anger", "z": "helplessness"}  # same ids, other classes
    with pytest.raises(ValueError, match="ordering"):
        read_labels(path, bench, ["happiness", "sadness"])


@pytest.mark.parametrize("labels_text, preds_rows, match", [
    ("video_name,label\n1,1\n", [{"id": "1", "response": "happy"}, {"id": "9", "response": "sad"}],
     "not in the labels"),
    ("video_name,label\n1,8\n", [{"id": "1", "response": "happy"}], "neither an id"),
    ("name,label\n1,1\n", [{"id": "1", "response": "happy"}], "needs columns"),
    ("video_name,label\n1,1\n1,2\n", [{"id": "1", "response": "happy"}], "appears twice"),
    ("video_name,label\n1,1\n", [{"id": "1", "response": "happy"}, {"id": "1", "response": "sad"}],
     "appears twice"),
])
def test_bad_inputs_exit_2_with_a_clear_message(tmp_path, capsys, labels_text, preds_rows, match):
    labels = write(tmp_path / "l.csv", labels_text)
    preds = jsonl(tmp_path / "p.jsonl", preds_rows)
    code, out, err = run(capsys, "--benchmark", "dfew", "--predictions", preds, "--labels", labels)
    assert code == 2 and match in err and not out


def test_missing_files_and_broken_jsonl_exit_2(tmp_path, capsys):
    labels = write(tmp_path / "l.csv", "video_name,label\n1,1\n")
    code, _, err = run(capsys, "--benchmark", "dfew", "--predictions", str(tmp_path / "nope.jsonl"),
                       "--labels", labels)
    assert code == 2 and "does not exist" in err
    broken = write(tmp_path / "b.jsonl", '{"id": "1", "response": "happy"}\n{"id": \n')
    code, _, err = run(capsys, "--benchmark", "dfew", "--predictions", broken, "--labels", labels)
    assert code == 2 and "b.jsonl:2" in err


def test_emer_word_overlap(tmp_path, capsys):
    refs = write(tmp_path / "emer.csv", "name,english\n"
                 "a,\"The man frowns and shouts: he is angry and frustrated.\"\n"
                 "b,The woman smiles; she is happy.\n"
                 "c,A person talks.\n")
    preds = jsonl(tmp_path / "e.jsonl", [{"id": "a", "response": "He looks furious, not happy."},
                                         {"id": "b", "response": "She is joyful but a bit nervous."}])
    code, out, err = run(capsys, "--benchmark", "emer", "--predictions", preds, "--labels", refs)
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    # a: P={angry} R={angry, frustrated} -> p 1, r 1/2; b: P={happy, anxiety} R={happy} -> p 1/2, r 1.
    assert got["n"] == 2 and got["no_reference_emotion"] == 1
    assert got["precision"] == pytest.approx(0.75) and got["recall"] == pytest.approx(0.75)
    assert got["f1"] == pytest.approx((2 / 3 + 2 / 3) / 2, abs=1e-6)


def test_fold_paths(tmp_path):
    for k in range(1, 6):
        (tmp_path / f"set_{k}.csv").write_text("video_name,label\n1,1\n")
        (tmp_path / f"set_{k}").mkdir()
        (tmp_path / f"set_{k}" / "test.csv").write_text("video_name,label\n1,1\n")
    assert fold_paths(str(tmp_path / "set_3.csv"))[4] == str(tmp_path / "set_5.csv")
    assert fold_paths(str(tmp_path / "set_1" / "test.csv"))[1] == str(tmp_path / "set_2" / "test.csv")
    assert fold_paths(str(tmp_path / "set_{fold}.csv"))[0] == str(tmp_path / "set_1.csv")
    with pytest.raises(ValueError, match="fold number"):
        fold_paths(str(tmp_path / "labels.csv"))
    (tmp_path / "set_4.csv").unlink()
    with pytest.raises(FileNotFoundError, match="set_4"):
        fold_paths(str(tmp_path / "set_1.csv"))


def test_installed_console_script(tmp_path):
    """The entry point as a user runs it (a subprocess), exit status included."""
    import shutil
    import subprocess

    exe = shutil.which("emoqwen-score") or os.path.join(os.path.dirname(sys.executable), "emoqwen-score")
    labels = write(tmp_path / "l.csv", "video_name,label\n1,3\n")
    preds = jsonl(tmp_path / "p.jsonl", [{"id": "1", "response": "neutral"}])
    res = subprocess.run([exe, "--benchmark", "dfew", "--predictions", preds, "--labels", labels],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["war"] == 1.0
    bad = subprocess.run([exe, "--benchmark", "dfew", "--predictions", preds, "--labels", str(tmp_path / "x.csv")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
