"""One test per parser rule (emoqwen_jax/eval/parse.py docstring), on every benchmark's label set."""

import pytest

from emoqwen_jax.eval import LabelParser, answer_span, get_benchmark
from emoqwen_jax.eval.emotion.emer import emotion_concepts

DFEW = LabelParser(get_benchmark("dfew").classes)
MAFW = LabelParser(get_benchmark("mafw").classes)
MER = LabelParser(get_benchmark("mer2023").classes)


def label(parser, text):
    return parser(text).label


# Rule 1: the <answer> span.
def test_answer_span_is_read_alone():
    assert DFEW("I first thought happy, but <answer>sad</answer>").label == "sad"
    assert DFEW("<answer>Happy</answer>").label == "happy"


def test_last_answer_span_wins_and_tags_are_case_insensitive():
    assert DFEW("<answer>angry</answer> on reflection <ANSWER>fear</ANSWER>").label == "fear"


def test_unclosed_answer_span_reads_to_the_end():
    assert answer_span("reasoning: happy? <answer> Surprised, clearly") == " Surprised, clearly"
    assert DFEW("sad or happy <answer> surprised").label == "surprise"


def test_think_block_is_dropped_without_answer_span():
    assert DFEW("<think>happy? angry? maybe sad</think>The person is sad.").label == "sad"
    assert DFEW("<think>happy or angry, cut off by max_new_tokens").reason == "no_label"


def test_empty_answer_span_is_invalid_even_if_text_outside_names_a_label():
    assert DFEW("The person is happy. <answer></answer>").reason == "no_label"


# Rule 2: whole words, case, inflections and synonyms.
@pytest.mark.parametrize("text, want", [
    ("HAPPINESS", "happy"), ("She is happily smiling", "happy"), ("anger", "angry"), ("Angrily", "angry"),
    ("sadness", "sad"), ("saddened", "sad"), ("He looks surprised!", "surprise"), ("fearful", "fear"),
    ("afraid", "fear"), ("scared", "fear"), ("frightened", "fear"), ("disgusted", "disgust"),
    ("Neutral.", "neutral"),
])
def test_dfew_inflections_and_synonyms(text, want):
    assert label(DFEW, text) == want


@pytest.mark.parametrize("text, want", [
    ("worried", "worried"), ("worry", "worried"), ("anxious", "worried"), ("Anxiety", "worried"),
    ("anger", "angry"), ("happiness", "happy"),
])
def test_mer_worried_synonyms(text, want):
    assert label(MER, text) == want


@pytest.mark.parametrize("text, want", [
    ("happy", "happiness"), ("sad", "sadness"), ("angry", "anger"), ("helpless", "helplessness"),
    ("disappointed", "disappointment"), ("contemptuous", "contempt"), ("anxious", "anxiety"),
])
def test_mafw_class_names_take_adjectives(text, want):
    assert label(MAFW, text) == want


@pytest.mark.parametrize("text", ["unhappy", "sadistic", "angryish", "fearless", "surprisingly calm",
                                  "disgusting", "neutralized", "saddle", "sadhu"])
def test_substring_traps_are_not_labels(text):
    parsed = DFEW(text)
    assert parsed.label is None and parsed.reason == "no_label", parsed


def test_words_outside_the_label_set_are_ignored():
    assert DFEW("contempt").reason == "no_label"  # a MAFW class, not a DFEW one
    assert DFEW("contempt, and then happiness").label == "happy"
    assert MER("fear").reason == "no_label"  # MER has no fear class
    assert DFEW("worried").reason == "no_label"  # DFEW has no anxiety class


def test_curly_apostrophe_and_punctuation():
    assert DFEW("He isn\u2019t happy").reason == "no_label"
    assert DFEW("(happy)").label == "happy"


# Rule 3: negation.
@pytest.mark.parametrize("text, want", [
    ("He is not angry, he is sad.", "sad"),
    ("not angry but sad", "sad"),
    ("She doesn't look happy; she looks surprised", "surprise"),
    ("no sign of anger at all. Disgust.", "disgust"),
    ("never afraid, always neutral", "neutral"),
    ("without fear or anger, he is happy", "happy"),
])
def test_negated_mentions_are_dropped(text, want):
    assert label(DFEW, text) == want


@pytest.mark.parametrize("text", ["not angry", "not very happy", "neither happy nor sad", "un-happy",
                                  "non-angry", "He cannot be sad"])
def test_negation_alone_gives_no_label_and_no_opposite(text):
    assert DFEW(text).reason == "no_label"


def test_negation_further_than_the_window_is_not_detected():
    assert DFEW("I do not think that the man is angry").label == "angry"  # documented limitation
    assert DFEW("No, she is happy").label == "happy"  # "no" ends its clause at the comma


# Rule 4: verdicts.
def test_several_distinct_labels_are_invalid():
    parsed = DFEW("happy and sad")
    assert parsed.label is None and parsed.reason == "several_labels" and parsed.matches == ("happy", "sad")
    assert DFEW("Choose one of: happy, sad, neutral, angry, surprise, disgust, fear.").reason == "several_labels"
    assert DFEW("happy happy happy, very sad").reason == "several_labels"  # majority does not win


def test_repeated_same_label_and_synonyms_are_one_label():
    assert DFEW("Happy. The happiness is clear; she smiles happily.").label == "happy"


@pytest.mark.parametrize("text", ["", None, "I cannot tell.", "The video shows a person."])
def test_no_label_is_invalid(text):
    parsed = DFEW(text)
    assert parsed.label is None and parsed.reason == "no_label" and not parsed.valid


def test_parser_rejects_unknown_class_names():
    with pytest.raises(ValueError, match="no word list"):
        LabelParser(("happy", "bemused"))


def test_emer_concepts_merge_synonyms_and_drop_negations():
    assert emotion_concepts("joyful and a little nervous, but not angry") == {"happy", "anxiety"}
    assert emotion_concepts("He looks calm; no fear.") == {"calm"}
