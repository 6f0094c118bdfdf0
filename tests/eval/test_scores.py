"""UAR / WAR / weighted F1 equal scikit-learn's on the parsed labels; invalid is wrong but not a class."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from emoqwen_jax.eval import INVALID, get_benchmark, mean_scores, score, score_answers

CLASSES = get_benchmark("dfew").classes


def sklearn_scores(y_true, y_pred, k):
    present = sorted(set(y_true))
    return dict(
        uar=recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0),
        war=accuracy_score(y_true, y_pred),
        weighted_f1=f1_score(y_true, y_pred, labels=list(range(k)), average="weighted", zero_division=0))


@pytest.mark.parametrize("seed", range(6))
def test_equal_to_sklearn_on_random_predictions_with_invalid(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    # Imbalanced truth (like DFEW's 29 disgust clips of 2,341) that may miss whole classes.
    y_true = rng.choice(7, n, p=[0.3, 0.2, 0.2, 0.15, 0.1, 0.01, 0.04])
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(-1, 7, n))
    got = score(y_true, y_pred, CLASSES)
    want = sklearn_scores(y_true, y_pred, 7)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, abs=1e-12), key
    assert got.accuracy == got.war
    assert got.invalid_rate == pytest.approx(np.mean(y_pred == INVALID))
    np.testing.assert_array_equal(got.confusion[:, :7],
                                  confusion_matrix(y_true, y_pred, labels=list(range(7)))[:, :7])
    assert got.confusion.sum() == n and got.confusion[:, 7].sum() == (y_pred == INVALID).sum()


def test_invalid_is_not_a_uar_class_and_absent_classes_are_not_averaged():
    y_true = [0, 0, 1, 1]
    got = score(y_true, [0, INVALID, INVALID, INVALID], CLASSES)
    assert got.uar == pytest.approx((0.5 + 0.0) / 2)  # two true classes; 'invalid' adds none
    assert got.war == pytest.approx(0.25) and got.invalid_rate == pytest.approx(0.75)
    assert got.per_class_recall["happy"] == 0.5 and got.per_class_recall["fear"] is None
    # A default label for invalid answers would have raised the score: we do not do that.
    assert score(y_true, [0, 0, 0, 0], CLASSES).war > got.war


def test_invalid_lowers_recall_but_no_precision():
    # All invalid except one correct: weighted F1 = F1 of class 0 (P=1, R=1/2) weighted by its support.
    got = score([0, 0, 1], [0, INVALID, INVALID], CLASSES)
    assert got.weighted_f1 == pytest.approx((2 * (2 / 3)) / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no samples"):
        score([], [], CLASSES)
    with pytest.raises(ValueError, match="true labels"):
        score([7], [0], CLASSES)
    with pytest.raises(ValueError, match="predictions"):
        score([0], [-2], CLASSES)


def test_score_answers_missing_ids_are_invalid_and_unknown_ids_are_errors():
    labels = {"a": 0, "b": 1, "c": 3}
    scores, invalid = score_answers({"a": "<answer>happy</answer>", "b": "happy or sad"}, labels, CLASSES)
    assert scores.n == 3 and scores.war == pytest.approx(1 / 3) and scores.invalid_rate == pytest.approx(2 / 3)
    assert [(r.id, r.reason) for r in invalid] == [("b", "several_labels"), ("c", "missing")]
    with pytest.raises(ValueError, match="not in the labels"):
        score_answers({"a": "happy", "zzz": "sad"}, labels, CLASSES)


def test_fold_mean_weighs_folds_equally():
    a = score([0, 1], [0, 1], CLASSES)
    b = score([0, 1, 1, 1], [1, 1, 1, 1], CLASSES)
    mean = mean_scores([a, b])
    assert mean["war"] == pytest.approx((1.0 + 0.75) / 2) and mean["n"] == 6 and len(mean["folds"]) == 2
