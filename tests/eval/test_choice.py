"""Honest option-letter and yes/no parsing (rules of emoqwen_jax/eval/choice.py)."""

import pytest

from emoqwen_jax.eval.choice import parse_choice, parse_yes_no, parse_yes_no_by, parse_yes_no_official

OPTIONS = {"A": "red", "B": "green", "C": "dark blue", "D": "yellow"}


@pytest.mark.parametrize("response, label, reason", [
    ("B", "B", "ok"),
    ("(C) dark blue", "C", "ok"),
    ("The answer is D.", "D", "ok"),
    ("A", "A", "ok"),
    ("A.", "A", "ok"),
    ("<think>A or B?</think><answer>B</answer>", "B", "ok"),  # only the answer span is read
    ("A dog sits there.", None, "no_label"),  # 'A' + lower-case word: the article
    ("a", None, "no_label"),  # lower case is a word, not an option
    ("E", None, "no_label"),  # not one of this question's letters
    ("A or B", None, "several_labels"),
    ("B, but maybe C", None, "several_labels"),
    ("It is dark blue.", "C", "ok"),  # no letter: the option's text, whole words
    ("redish", None, "no_label"),  # not a whole word
    ("red or yellow", None, "several_labels"),
    ("", None, "no_label"),
    (None, None, "no_label"),
])
def test_parse_choice(response, label, reason):
    parsed = parse_choice(response, OPTIONS)
    assert (parsed.label, parsed.reason) == (label, reason)


@pytest.mark.parametrize("response, label, reason", [
    ("Yes", "yes", "ok"),
    ("No.", "no", "ok"),
    ("yes, there is a dog", "yes", "ok"),
    ("Yesterday", None, "no_label"),
    ("maybe", None, "no_label"),
    ("yes and no", None, "several_labels"),
    ("<answer>no</answer> yes", "no", "ok"),
])
def test_parse_yes_no(response, label, reason):
    parsed = parse_yes_no(response)
    assert (parsed.label, parsed.reason) == (label, reason)


@pytest.mark.parametrize("response, label", [
    ("Yes", "yes"),
    ("No", "no"),
    ("No, there is no dog.", "no"),  # commas dropped: "No," is the word "No"
    ("There is not a dog in the image.", "no"),
    ("Yes. There is no cat.", "yes"),  # only the first sentence is read
    ("maybe", "yes"),  # anything without no/not counts as yes ...
    ("", "yes"),
    ("NO", "yes"),  # ... including these: the script matches "No", "no" and "not" exactly
    ("Nope", "yes"),
    ("no!", "yes"),
    ("I don't know", "yes"),
    ("yes and no", "no"),
    ("<answer>no</answer>", "yes"),  # no span rule either
])
def test_parse_yes_no_official_transcribes_popes_script(response, label):
    parsed = parse_yes_no_official(response)
    assert (parsed.label, parsed.reason) == (label, "ok")


def test_yes_no_rules():
    assert parse_yes_no_official(None).label is None  # an item that could not be asked stays invalid
    assert parse_yes_no_by("strict") is parse_yes_no and parse_yes_no_by("official") is parse_yes_no_official
    with pytest.raises(ValueError, match="valid: .'strict', 'official'"):
        parse_yes_no_by("lenient")
