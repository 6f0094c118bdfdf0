"""The reward registry: accuracy, format and length penalty by their definitions, user rewards by name, and the
evaluation parser reading tagged answers (what the RL stage's completions look like)."""

import numpy as np
import pytest

from emoqwen_jax.eval import LabelParser, get_benchmark
from emoqwen_jax.rl import rewards
from emoqwen_jax.rl.rewards import RewardInput, label_word, register_reward, score


def sample(text, reference="happy", num_tokens=10, max_tokens=64, stopped=True, buffer=0):
    return RewardInput(text=text, reference=reference, num_tokens=num_tokens, max_tokens=max_tokens,
                       stopped=stopped, length_buffer=buffer)


@pytest.mark.parametrize("text, want", [
    ("<think>a smile</think><answer>happy</answer>", 1.0),
    ("<think>x</think><answer>  Happy </answer>", 1.0),  # case and spacing normalised
    ("<answer>HAPPY</answer>", 1.0),  # accuracy does not ask for the format
    ("<think>x</think><answer>happiness</answer>", 0.0),  # the label word, not a synonym
    ("<think>x</think><answer>happy and sad</answer>", 0.0),
    ("<answer>sad</answer> <answer>happy</answer>", 1.0),  # the last span, as the parser
    ("happy", 0.0),  # no answer span
    ("<think>x</think><answer>happy", 0.0),  # an answer cut before its closing tag
    ("<think>happy</think>", 0.0),
])
def test_accuracy(text, want):
    assert rewards.accuracy(sample(text)) == want


def test_label_word_from_plain_and_tagged_references_and_multiword_labels():
    assert label_word(" Happy\n") == "happy"
    assert label_word("<think>she smiles</think><answer>Happy</answer>") == "happy"
    assert rewards.accuracy(sample("<answer>very  Happy</answer>", reference="Very happy")) == 1.0


@pytest.mark.parametrize("text, want", [
    ("<think>a smile</think><answer>happy</answer>", 1.0),
    ("  <think>a\nsmile</think>\n<answer>happy</answer>\n", 1.0),
    ("<answer>happy</answer>", 0.0),
    ("<think>a smile</think>happy", 0.0),
    ("<answer>happy</answer><think>x</think>", 0.0),
    ("<think>a</think><answer>happy</answer> trailing words", 0.0),
    ("<think>a smile</think><answer>happy", 0.0),
])
def test_format(text, want):
    assert rewards.format_reward(sample(text)) == want


@pytest.mark.parametrize("num_tokens, stopped, want", [
    (10, True, 0.0), (48, True, 0.0), (56, True, -0.5), (64, True, -1.0), (64, False, -1.0), (5, False, -1.0),
])
def test_length_penalty_is_dapos_soft_overlong_punishment(num_tokens, stopped, want):
    # max 64, buffer 16: free up to 48 tokens, then linear to -1 at 64 (DAPO eq. 13); a cut completion: -1
    assert rewards.length_penalty(sample("x", num_tokens=num_tokens, stopped=stopped, buffer=16)) == want


def test_user_rewards_register_by_name_and_weights_sum():
    @register_reward("test_mentions_smile")
    def smile(s):
        return float("smile" in s.text)

    try:
        batch = [sample("<think>a smile</think><answer>happy</answer>"), sample("<think>x</think><answer>sad</answer>")]
        total, parts = score(batch, {"accuracy": 1.0, "format": 0.5, "test_mentions_smile": 2.0})
        np.testing.assert_array_equal(parts["accuracy"], [1, 0])
        np.testing.assert_array_equal(parts["format"], [1, 1])
        np.testing.assert_array_equal(total, [1 + 0.5 + 2, 0.5])
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_mentions_smile")(lambda s: 0.0)
    finally:
        rewards.REWARDS.pop("test_mentions_smile")
    with pytest.raises(ValueError, match="not registered"):
        score(batch, {"acuracy": 1.0})


# The evaluation parser on tagged answers: the reasoning may weigh several emotions; only the answer counts.
DFEW = LabelParser(get_benchmark("dfew").classes)
MAFW = LabelParser(get_benchmark("mafw").classes)
# Free-text answers from the parser's tests (their labels there) -- each must read the same inside an <answer>
# span after reasoning that names other classes.
ANSWERS = [("HAPPINESS", "happy"), ("He looks surprised!", "surprise"), ("afraid", "fear"), ("Neutral.", "neutral"),
           ("not angry but sad", "sad"), ("She doesn't look happy; she looks surprised", "surprise"),
           ("disgusted", "disgust"), ("unhappy", None), ("happy and sad", None), ("not angry", None)]


@pytest.mark.parametrize("answer, want", ANSWERS)
def test_parser_reads_the_answer_span_after_reasoning(answer, want):
    plain = DFEW(answer).label
    assert plain == want
    tagged = f"<think>The brows could mean angry or fear, the mouth maybe sad.</think><answer>{answer}</answer>"
    assert DFEW(tagged).label == want
    assert DFEW(tagged.replace("<answer>", "<answer>\n ").upper()).label == want


def test_parser_and_accuracy_agree_on_label_words_of_every_class():
    for parser, bench in ((DFEW, "dfew"), (MAFW, "mafw")):
        for name in get_benchmark(bench).classes:
            text = f"<think>not sure</think><answer>{name.capitalize()}</answer>"
            assert parser(text).label == name
            assert rewards.accuracy(sample(text, reference=name)) == 1.0
