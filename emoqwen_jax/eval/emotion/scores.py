"""Classification metrics with an explicit invalid bucket (pure numpy; tests check them against sklearn).

Inputs are class indices into the benchmark's K classes; a prediction of ``INVALID`` (−1) is an answer
that named no class or several (see ``parse.py``) or a clip with no answer at all. Definitions (n samples,
n_c samples whose true class is c, tp_c of them predicted c, p_c predictions of class c):

  accuracy = WAR  = Σ_c tp_c / n                (weighted average recall; invalid counts as wrong)
  recall_c        = tp_c / n_c                  (per_class_recall; None for classes absent from the truth)
  UAR             = mean of recall_c over the classes present in the truth (invalid is not a class)
  precision_c     = tp_c / p_c (0 when p_c = 0); F1_c = 2·P·R/(P+R) (0 when both are 0)
  weighted F1     = Σ_c n_c · F1_c / n           (invalid answers lower recall, never any precision)
  invalid_rate    = (#INVALID predictions) / n

These equal scikit-learn's ``accuracy_score``, ``recall_score(labels=present, average='macro')`` and
``f1_score(labels=classes, average='weighted', zero_division=0)`` with −1 as an extra predicted value.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

INVALID = -1


@dataclasses.dataclass(frozen=True)
class Scores:
    classes: tuple[str, ...]
    n: int
    uar: float
    war: float
    weighted_f1: float
    accuracy: float
    invalid_rate: float
    per_class_recall: dict[str, float | None]
    confusion: np.ndarray  # int64[K, K + 1]: rows true class, columns predicted class, last column invalid

    def summary(self) -> dict:
        """The JSON line ``emoqwen-score`` prints (metrics as fractions in [0, 1])."""
        r = lambda x: None if x is None else round(float(x), 6)  # noqa: E731
        return {"n": self.n, "uar": r(self.uar), "war": r(self.war), "weighted_f1": r(self.weighted_f1),
                "accuracy": r(self.accuracy), "invalid_rate": r(self.invalid_rate),
                "per_class_recall": {c: r(v) for c, v in self.per_class_recall.items()}}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64[K, K + 1]: counts of (true, predicted), the invalid predictions in the last column."""
    cm = np.zeros((num_classes, num_classes + 1), np.int64)
    np.add.at(cm, (y_true, np.where(y_pred == INVALID, num_classes, y_pred)), 1)
    return cm


def score(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> Scores:
    """Metrics for true indices int[n] in [0, K) and predicted indices int[n] in [0, K) ∪ {INVALID}."""
    classes = tuple(classes)
    k = len(classes)
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D shapes")
    if y_true.size == 0:
        raise ValueError("no samples to score")
    if y_true.min() < 0 or y_true.max() >= k:
        raise ValueError(f"true labels must be class indices in [0, {k}), got {sorted(set(y_true.tolist()))}")
    if y_pred.min() < INVALID or y_pred.max() >= k:
        raise ValueError(f"predictions must be in [0, {k}) or {INVALID} (invalid)")
    cm = confusion_matrix(y_true, y_pred, k)
    n = int(y_true.size)
    support = cm.sum(1)  # n_c
    tp = np.diag(cm[:, :k])
    predicted = cm[:, :k].sum(0)  # p_c (invalid answers are nobody's prediction)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(k), where=present)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    accuracy = float(tp.sum() / n)
    return Scores(
        classes=classes, n=n, uar=float(recall[present].mean()), war=accuracy,
        weighted_f1=float((support * f1).sum() / n), accuracy=accuracy,
        invalid_rate=float((y_pred == INVALID).sum() / n),
        per_class_recall={c: (float(recall[i]) if present[i] else None) for i, c in enumerate(classes)},
        confusion=cm)


def mean_scores(folds: Sequence[Scores]) -> dict:
    """Mean over folds of each scalar metric (each fold weighs the same, as DFEW/MAFW papers report)."""
    if not folds:
        raise ValueError("no folds to average")
    keys = ("uar", "war", "weighted_f1", "accuracy", "invalid_rate")
    out = {key: round(float(np.mean([getattr(f, key) for f in folds])), 6) for key in keys}
    out["n"] = int(sum(f.n for f in folds))
    out["folds"] = [f.summary() for f in folds]
    return out
