"""Scoring a predictions file against a label file: parse every answer, compute the metrics, and write the
confusion-matrix PNG and the CSV of invalid answers next to the predictions.

  P.jsonl  ->  P.confusion.png   rows true class, columns predicted class + 'invalid', row-normalised
               P.invalid.csv     id, true label, reason (no_label | several_labels | missing), response

Ids in the labels but not in the predictions count as invalid ('missing'); ids in the predictions but not
in the labels are an error (a wrong label file or fold would otherwise score silently).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np

from emoqwen_jax.eval.emotion.benchmarks import Benchmark, read_labels, read_predictions, resolve_classes
from emoqwen_jax.eval.emotion.scores import INVALID, Scores, score
from emoqwen_jax.eval.parse import LabelParser
from emoqwen_jax.runtime import storage


@dataclasses.dataclass(frozen=True)
class InvalidAnswer:
    id: str
    label: str
    reason: str  # 'no_label' | 'several_labels' | 'missing'
    response: str | None


def score_answers(predictions: dict[str, str | None], labels: dict[str, int],
                  classes: Sequence[str]) -> tuple[Scores, list[InvalidAnswer]]:
    """Parses each labelled clip's answer and scores them all (labels' order)."""
    extra = [clip for clip in predictions if clip not in labels]
    if extra:
        raise ValueError(f"{len(extra)} prediction ids are not in the labels, e.g. {extra[:5]}; wrong label "
                         f"file or fold?")
    parser = LabelParser(classes)
    y_true, y_pred, invalid = [], [], []
    for clip, true in labels.items():
        y_true.append(true)
        if clip not in predictions:
            y_pred.append(INVALID)
            invalid.append(InvalidAnswer(clip, classes[true], "missing", None))
            continue
        parsed = parser(predictions[clip])
        y_pred.append(classes.index(parsed.label) if parsed.valid else INVALID)
        if not parsed.valid:
            invalid.append(InvalidAnswer(clip, classes[true], parsed.reason, predictions[clip]))
    return score(y_true, y_pred, classes), invalid


def output_paths(predictions_path: str) -> tuple[str, str]:
    """(confusion PNG, invalid CSV) beside the predictions file."""
    stem = os.path.splitext(predictions_path)[0]
    return stem + ".confusion.png", stem + ".invalid.csv"


def write_invalid_csv(rows: Sequence[InvalidAnswer], path: str) -> None:
    with storage.open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "reason", "response"])
        for r in rows:
            writer.writerow([r.id, r.label, r.reason, "" if r.response is None else r.response])


def plot_confusion(scores: Scores, path: str, title: str) -> None:
    """Row-normalised confusion matrix with counts, the invalid column last (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = scores.confusion
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(scores.classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * (k + 1), 1.0 + 0.7 * k))
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k + 1), list(scores.classes) + ["invalid"], rotation=45, ha="right")
    ax.set_yticks(range(k), scores.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k + 1):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_title(f"{title}\nUAR {scores.uar:.4f} · WAR {scores.war:.4f} · invalid {scores.invalid_rate:.4f}",
                 fontsize=9)
    fig.tight_layout()
    with storage.open(path, "wb") as f:  # a local path or a URI
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def score_files(benchmark: Benchmark, predictions_path: str, labels_path: str,
                classes: Sequence[str] | None = None) -> tuple[Scores, dict[str, str]]:
    """Reads, scores and writes the PNG and CSV; returns the scores and the paths written."""
    classes = resolve_classes(benchmark, classes)
    labels = read_labels(labels_path, benchmark, classes)
    predictions = read_predictions(predictions_path)
    scores, invalid = score_answers(predictions, labels, classes)
    png, invalid_csv = output_paths(predictions_path)
    plot_confusion(scores, png, f"{benchmark.name}: {os.path.basename(predictions_path)}")
    write_invalid_csv(invalid, invalid_csv)
    return scores, {"confusion_png": png, "invalid_csv": invalid_csv}
