"""The standard VQA accuracy (VQAv2, TextVQA): answer normalisation and the 10-annotator consensus score.

The published rule (Antol et al. 2015; the VQA challenge's ``vqaEval.py``), for a prediction p and the ten
human answers g_1..g_10 of a question:

  1. Whitespace: newlines and tabs become spaces; the ends are stripped (prediction and human answers).
  2. The prediction is normalised: ``process_punctuation`` then ``process_digit_article`` (below).
  3. The human answers are passed through ``process_punctuation`` only when they are not all equal
     (``gt_rule='official'``). TextVQA's evaluator (the M4C/EvalAI answer processor that LLaVA and the Qwen
     reports use) normalises the human answers fully, always: ``gt_rule='always'``.
  4. acc = mean over i of min(1, #{j ≠ i : g_j == p} / 3): "min(#humans that said it / 3, 1)" averaged over
     the 10 subsets of 9 annotators.

Normalisation, reproduced exactly, quirks included (the tests pin them):
  * ``process_punctuation``: each of ``PUNCT`` is deleted when it touches a space anywhere in the text (or the
    text has a digit,digit comma), else replaced by a space; then periods not followed by a digit are
    deleted — at most 32 of them, because the official code passes ``re.UNICODE`` (= 32) as ``count``. The
    apostrophe is not in ``PUNCT``, so contractions survive for the next step; ':' is not either.
  * ``process_digit_article``: lower-case, split on whitespace, number words zero..ten (and 'none') become
    digits, the articles a/an/the are dropped, then apostrophe-less contractions are restored
    ("dont" → "don't"); words joined by one space.
"""

from __future__ import annotations

import re
from typing import Sequence

PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The official table, keys as published (a few keys have capitals and so never match lower-cased text).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow'sat",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# The official pattern is "(?!<=\d)(\.)(?!\d)": a mistyped look-behind that is really a look-ahead for the
# three characters "<=d" (never there), so it deletes every '.' not followed by a digit ("2.5" survives).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = re.UNICODE  # = 32, passed as ``count`` by the official code
GT_RULES = ("official", "always")


def clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full normalisation the official code applies to a prediction."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def vqa_accuracy(prediction: str | None, answers: Sequence[str], gt_rule: str = "official") -> float:
    """VQA accuracy in [0, 1] of one prediction against the human answers (usually 10). A missing
    prediction (None) scores 0."""
    if gt_rule not in GT_RULES:
        raise ValueError(f"gt_rule {gt_rule!r}; valid: {GT_RULES}")
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    gts = [clean_whitespace(a) for a in answers]
    if gt_rule == "always":
        gts = [normalize_answer(a) for a in gts]
    elif len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    if len(gts) == 1:  # a single reference (no consensus to average): exact match after normalisation
        return float(gts[0] == pred)
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3.0) for i in range(len(gts))]
    return sum(scores) / len(scores)
