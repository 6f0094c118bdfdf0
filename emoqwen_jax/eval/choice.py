"""Honest parsing of closed answers: an option letter (multiple choice) or yes/no, else an invalid verdict.

The same spirit as ``parse.LabelParser`` (rules tested in tests/eval/test_choice.py):
  1. Span: the last ``<answer>…</answer>`` span, else the text without ``<think>`` blocks (``answer_span``).
  2. Multiple choice (``parse_choice``): the option letters written as standalone tokens ("B", "(B)", "B.",
     "Answer: B") are collected, case-sensitively (a lower-case "a" is a word, not option A), and only the
     letters of this question's options count. An upper-case "A" directly followed by a lower-case word
     ("A dog is …") is the article, not option A — unless that word is or/and/nor/is/was/seems/because/as
     ("A or B", "A is correct"). When no letter is written, an option's text written as
     whole words ("the red one" for option "red") counts as that option.
  3. Yes/no (``parse_yes_no``): the whole words "yes" and "no", case-insensitively.
  4. Verdict: exactly one distinct option → that option; none → invalid ('no_label'); several distinct
     options (e.g. "A or B", "yes and no") → invalid ('several_labels'). Invalid answers are never mapped to
     a default; the scorers count them as wrong and report the invalid rate.

POPE's official script reads yes/no differently; ``parse_yes_no_official`` transcribes it so published POPE
figures can be reproduced (``YES_NO_RULES``; the POPE report says which rule it used).
"""

from __future__ import annotations

import re
import string
from typing import Mapping

from emoqwen_jax.eval.parse import Parsed, answer_span

LETTERS = string.ascii_uppercase
_LETTER_RE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
# "A" then a lower-case word is the article ("A dog is …"), unless the word links options or predicates on
# the letter ("A or B", "A is correct").
_ARTICLE_A_RE = re.compile(r"A (?!(?:or|and|nor|is|was|seems|because|as)\b)[a-z]")
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower().replace("\u2019", "'"))


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


def _verdict(found: list[str], span: str) -> Parsed:
    distinct = tuple(dict.fromkeys(found))
    if len(distinct) == 1:
        return Parsed(distinct[0], "ok", distinct, span)
    return Parsed(None, "no_label" if not distinct else "several_labels", distinct, span)


def parse_choice(response: str | None, options: Mapping[str, str]) -> Parsed:
    """``options`` {letter: option text} -> the chosen letter (rules 1, 2, 4)."""
    span = answer_span(response or "")
    letters = []
    for m in _LETTER_RE.finditer(span):
        letter = m.group(1)
        if letter not in options:
            continue
        if letter == "A" and _ARTICLE_A_RE.match(span, m.start()):
            continue  # "A dog ..." — the article
        letters.append(letter)
    if letters:
        return _verdict(letters, span)
    words = _words(span)
    # Longer option texts first would not help: "red" and "dark red" both written is ambiguous -> invalid.
    return _verdict([k for k, text in options.items() if _contains(words, _words(str(text)))], span)


def parse_yes_no(response: str | None) -> Parsed:
    """'yes' | 'no' (rules 1, 3, 4)."""
    span = answer_span(response or "")
    return _verdict([w for w in _words(span) if w in ("yes", "no")], span)


# How a yes/no answer is read: 'strict' = ``parse_yes_no`` (rules 1, 3, 4; unclear answers are invalid);
# 'official' = POPE's own evaluate.py (``parse_yes_no_official``; every answer is yes or no).
YES_NO_RULES = ("strict", "official")


def parse_yes_no_official(response: str | None) -> Parsed:
    """POPE's official rule (AoiDragon/POPE evaluate.py, also LLaVA's eval_pope.py), transcribed: keep the text
    before the first '.', drop commas, split on spaces; the answer is 'no' if a word is exactly "No", "no" or
    "not", else 'yes' — so "Nope", "NO" or "" count as yes. No span rule, no invalid verdict; only a missing
    answer (None: the item could not be asked) stays invalid ('no_label')."""
    if response is None:
        return Parsed(None, "no_label", (), "")
    text = response.split(".")[0] if "." in response else response
    words = text.replace(",", "").split(" ")
    label = "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    return Parsed(label, "ok", (label,), text)


def parse_yes_no_by(rule: str):
    """The yes/no parser of ``rule`` (one of ``YES_NO_RULES``)."""
    if rule not in YES_NO_RULES:
        raise ValueError(f"yes/no rule {rule!r}; valid: {YES_NO_RULES}")
    return parse_yes_no if rule == "strict" else parse_yes_no_official
