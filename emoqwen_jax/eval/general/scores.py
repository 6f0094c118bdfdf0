"""Scores of the general vision-language benchmarks, as each benchmark defines them, from parsed answers.

Every scorer takes the items (``vl_data.VLItem``) and the predictions {item id: response or None} and returns
a flat dict of metrics (fractions in [0, 1], except MME's points), ``n``, ``invalid_rate`` and ``headline`` (the
metric the literature reports, which ``emoqwen-forgetting`` compares). A missing prediction, an unparsable
answer or several answers is INVALID: it is counted wrong, never dropped, and its rate is reported.

  multiple choice  accuracy = correct / questions. With MMBench's circular variants (options rotated), a
                   question is right only when every variant is right: ``circular_accuracy`` (the MMBench
                   headline); ``accuracy`` then scores the unrotated variant alone ("vanilla").
  MME              per subtask (two yes/no questions per image): acc = 100·correct / questions,
                   acc+ = 100·images with both right / images, score = acc + acc+ (max 200); perception = sum
                   of the 10 perception subtasks' scores (max 2000), cognition = sum of the 4 cognition ones
                   (max 800), over the subtasks present.
  POPE             per split, "yes" is the positive class: accuracy = (TP + TN) / n, precision = TP / (TP + FP),
                   recall = TP / (TP + FN), F1, yes_ratio = answers "yes" / n. An invalid answer to a "yes"
                   question is a false negative; to a "no" question it is wrong but not a false positive (it did
                   not say yes). The headline is F1 averaged over the splits. ``yes_no_rule`` picks how answers are
                   read (``choice.YES_NO_RULES``): 'strict' (default) or POPE's 'official' script, under which
                   every answer is yes or no; the result's ``yes_no_rule`` says which.
  VQA              mean of ``vqa_accuracy.vqa_accuracy`` over questions (per answer type for VQAv2); an empty
                   or missing answer scores 0 and is counted invalid.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from emoqwen_jax.eval.choice import parse_choice, parse_yes_no, parse_yes_no_by
from emoqwen_jax.eval.general.data import MME_COGNITION, MME_PERCEPTION, VLItem  # noqa: F401 (re-exported)
from emoqwen_jax.eval.general.vqa_accuracy import vqa_accuracy
from emoqwen_jax.eval.parse import answer_span


def _r(x: float) -> float:
    return round(float(x), 6)


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _check(items: Sequence[VLItem], predictions: dict[str, str | None]) -> None:
    if not items:
        raise ValueError("no items to score")
    ids = {it.id for it in items}
    extra = [k for k in predictions if k not in ids]
    if extra:
        raise ValueError(f"{len(extra)} prediction ids are not questions of this benchmark, e.g. {extra[:5]}")


def judge_choice(items: Sequence[VLItem], predictions: dict[str, str | None]) -> dict[str, tuple[bool, bool]]:
    """{id: (correct, invalid)} for multiple-choice items."""
    out = {}
    for it in items:
        parsed = parse_choice(predictions.get(it.id), it.options)
        out[it.id] = (parsed.label == it.answer, not parsed.valid)
    return out


def score_choice(items: Sequence[VLItem], predictions: dict[str, str | None], by: str = "") -> dict:
    """Multiple choice (MMBench, ScienceQA, SEED-Bench); ``by``: a meta key for per-category accuracy."""
    _check(items, predictions)
    judged = judge_choice(items, predictions)
    groups: dict[str, list[VLItem]] = {}
    for it in items:
        groups.setdefault(it.group or it.id, []).append(it)
    circular = any(len(g) > 1 for g in groups.values())
    first = {g: min(its, key=lambda it: it.meta.get("rotation", 0)) for g, its in groups.items()}
    right = {g: (all(judged[it.id][0] for it in its) if circular else judged[first[g].id][0])
             for g, its in groups.items()}
    out = {"n": len(groups), "num_answers": len(items),
           "accuracy": _r(_mean(judged[it.id][0] for it in first.values())),
           "invalid_rate": _r(_mean(judged[it.id][1] for it in items))}
    if circular:
        out["circular_accuracy"] = _r(_mean(right.values()))
    if by:
        cats: dict[str, list[bool]] = {}
        for g, it in first.items():
            cats.setdefault(str(it.meta.get(by, "")), []).append(right[g])
        out[f"accuracy_by_{by}"] = {c: _r(_mean(v)) for c, v in sorted(cats.items())}
    out["headline"] = "circular_accuracy" if circular else "accuracy"
    return out


def score_mme(items: Sequence[VLItem], predictions: dict[str, str | None]) -> dict:
    _check(items, predictions)
    tasks: dict[str, dict[str, list[bool]]] = {}  # subtask -> image -> [correct per question]
    invalid = 0
    for it in items:
        parsed = parse_yes_no(predictions.get(it.id))
        invalid += not parsed.valid
        tasks.setdefault(it.meta["subtask"], {}).setdefault(it.group, []).append(parsed.label == it.answer)
    subtasks = {}
    for task, images in tasks.items():
        answers = [c for v in images.values() for c in v]
        acc = 100.0 * _mean(answers)
        acc_plus = 100.0 * _mean(all(v) for v in images.values())
        subtasks[task] = {"acc": _r(acc), "acc_plus": _r(acc_plus), "score": _r(acc + acc_plus),
                          "n": len(answers), "images": len(images)}
    perception = [t for t in MME_PERCEPTION if t in subtasks]
    cognition = [t for t in MME_COGNITION if t in subtasks]
    return {"n": len(items), "invalid_rate": _r(invalid / len(items)),
            "perception": _r(sum(subtasks[t]["score"] for t in perception)),
            "perception_max": 200 * len(perception),
            "cognition": _r(sum(subtasks[t]["score"] for t in cognition)), "cognition_max": 200 * len(cognition),
            "subtasks": subtasks,
            "subtasks_missing": [t for t in MME_PERCEPTION + MME_COGNITION if t not in subtasks],
            "headline": "perception"}


def pope_counts(labels: Sequence[str], verdicts: Sequence[str | None]) -> dict:
    """POPE metrics of one split from labels ('yes'/'no') and verdicts ('yes'/'no'/None = invalid)."""
    tp = sum(t == "yes" and p == "yes" for t, p in zip(labels, verdicts, strict=True))
    fp = sum(t == "no" and p == "yes" for t, p in zip(labels, verdicts, strict=True))
    tn = sum(t == "no" and p == "no" for t, p in zip(labels, verdicts, strict=True))
    fn = sum(t == "yes" and p != "yes" for t, p in zip(labels, verdicts, strict=True))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": _r((tp + tn) / n), "precision": _r(precision), "recall": _r(recall), "f1": _r(f1),
            "yes_ratio": _r(sum(p == "yes" for p in verdicts) / n),
            "invalid_rate": _r(sum(p is None for p in verdicts) / n), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(items: Sequence[VLItem], predictions: dict[str, str | None], yes_no_rule: str = "strict") -> dict:
    _check(items, predictions)
    parse = parse_yes_no_by(yes_no_rule)
    splits: dict[str, tuple[list[str], list[str | None]]] = {}
    for it in items:
        labels, verdicts = splits.setdefault(it.meta["split"], ([], []))
        labels.append(it.answer)
        verdicts.append(parse(predictions.get(it.id)).label)
    per_split = {s: pope_counts(*v) for s, v in splits.items()}
    invalid = sum(p is None for _, verdicts in splits.values() for p in verdicts)
    out = {"n": len(items), "invalid_rate": _r(invalid / len(items))}
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        out[key] = _r(_mean(s[key] for s in per_split.values()))  # mean over splits, each weighs the same
    out["splits"] = per_split
    out["yes_no_rule"] = yes_no_rule
    out["headline"] = "f1"
    return out


def score_vqa(items: Sequence[VLItem], predictions: dict[str, str | None], gt_rule: str = "official") -> dict:
    """TextVQA (``gt_rule='always'``) and VQAv2 (``'official'``)."""
    _check(items, predictions)
    accs, invalid, types = [], 0, {}
    for it in items:
        response = predictions.get(it.id)
        span = answer_span(response).strip() if response is not None else ""
        invalid += not span
        acc = vqa_accuracy(span, it.answers, gt_rule) if span else 0.0
        accs.append(acc)
        if it.meta.get("answer_type"):
            types.setdefault(it.meta["answer_type"], []).append(acc)
    out = {"n": len(items), "accuracy": _r(_mean(accs)), "invalid_rate": _r(invalid / len(items))}
    if types:
        out["accuracy_by_answer_type"] = {t: _r(_mean(v)) for t, v in sorted(types.items())}
    out["headline"] = "accuracy"
    return out
