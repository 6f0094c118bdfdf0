"""The VQA accuracy against a direct transcription of the published rule (the VQA challenge's vqaEval.py,
answers as dicts, leave-one-annotator-out by object identity) and against hand-computed values."""

import re

import pytest

from emoqwen_jax.eval.general.vqa_accuracy import (
    CONTRACTIONS,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


def published_rule(pred, answers):
    """vqaEval.py's loop for one question, written out independently (only the tables are shared)."""
    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
    comma_strip, period_strip = re.compile(r"(\d)(\,)(\d)"), re.compile(r"(?!<=\d)(\.)(?!\d)")
    numbers = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
               "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

    def punctuation(in_text):
        out = in_text
        for p in punct:
            if (p + " " in in_text or " " + p in in_text) or (re.search(comma_strip, in_text) is not None):
                out = out.replace(p, "")
            else:
                out = out.replace(p, " ")
        return period_strip.sub("", out, re.UNICODE)

    def digit_article(in_text):
        out = []
        for word in in_text.lower().split():
            word = numbers.setdefault(word, word)
            if word not in ["a", "an", "the"]:
                out.append(word)
        for i, word in enumerate(out):
            if word in CONTRACTIONS:
                out[i] = CONTRACTIONS[word]
        return " ".join(out)

    gts = [{"answer": a.replace("\n", " ").replace("\t", " ").strip(), "answer_id": i + 1}
           for i, a in enumerate(answers)]
    res = digit_article(punctuation(pred.replace("\n", " ").replace("\t", " ").strip()))
    if len(set(g["answer"] for g in gts)) > 1:
        for g in gts:
            g["answer"] = punctuation(g["answer"])
    accs = []
    for g in gts:
        others = [item for item in gts if item != g]
        accs.append(min(1, float(len([item for item in others if item["answer"] == res])) / 3))
    return sum(accs) / len(accs)


CASES = [  # (prediction, ten human answers, hand-computed accuracy)
    ("Yes", ["yes"] * 10, 1.0),  # case; all agree -> 9 matches of 9
    ("two", ["2"] * 3 + ["3"] * 7, 0.9),  # number word; a "2" annotator sees 2 others (2/3), a "3" one sees 3 (1)
    ("the dog.", ["dog"] * 2 + ["cat"] * 8, 0.6),  # article and period; (2·1/3 + 8·2/3) / 10
    ("Red", ["red"] + ["blue"] * 9, 0.3),  # one human said it: 9 subsets give 1/3, one gives 0
    ("dont", ["don't"] * 10, 1.0),  # contraction restored
    ("hot-dog", ["hot dog"] * 4 + ["hotdog"] * 6, 1.0),  # '-' between words becomes a space
    ("1,000", ["1000"] * 10, 1.0),  # digit,digit comma: punctuation deleted
    ("2.5", ["2.5"] * 10, 1.0),  # a period before a digit stays
    ("The cat", ["The cat"] * 10, 0.0),  # quirk: unanimous human answers are not normalised at all
    ("cat", ["cat"] * 3 + ["a cat"] * 7, 0.9),  # humans' "a cat" keeps its article: only 3 match; (3·2/3 + 7) / 10
    ("an apple", ["apple"] * 2 + ["apples"] * 8, 0.6),
]


@pytest.mark.parametrize("pred, answers, expected", CASES)
def test_vqa_accuracy_equals_published_rule_and_hand_values(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy(pred, answers) == pytest.approx(published_rule(pred, answers), abs=1e-12)


def test_always_rule_normalises_human_answers_too():
    assert vqa_accuracy("the cat", ["The cat"] * 10, gt_rule="always") == 1.0  # TextVQA's evaluator
    assert vqa_accuracy("the cat", ["The cat"] * 10) == 0.0


def test_normalisation_pieces():
    assert process_punctuation("what? yes!") == "what yes "  # '?' touches a space: deleted; '!' does not: a space
    assert process_punctuation("a/b") == "a b"  # not touching a space: a space
    assert normalize_answer("  Ten\tdogs.\n") == "10 dogs"
    assert process_digit_article("A Youre The Best") == "you're best"
    assert normalize_answer("." * 40) == "." * 8  # the official count=re.UNICODE (32) quirk


def test_missing_prediction_and_errors():
    assert vqa_accuracy(None, ["a"] * 10) == 0.0
    with pytest.raises(ValueError, match="gt_rule"):
        vqa_accuracy("x", ["x"], gt_rule="loose")
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])
