"""A model's free-text answer -> one class of a benchmark's label set, or an explicit invalid verdict.

Rules, in order (each has a test in tests/eval/test_parse.py):
  1. Span. If the answer has ``<answer>…</answer>``, only the last such span is read; an ``<answer>`` left
     open (generation cut by max_new_tokens) is read to the end. Otherwise ``<think>…</think>`` blocks are
     dropped (reasoning weighs several emotions; it is not the answer) and the rest is read.
  2. Words. The span is lower-cased and split into whole words (letters, inner apostrophes, hyphenated
     compounds); a label matches only a whole word, so "unhappy" is not happy and "sadistic" is not sad.
     Each class accepts its inflections and a few common synonyms (``WORDS``), e.g. happiness → happy,
     anger → angry, afraid/scared/frightened → fear, worried/worry/anxious → MER's worried.
  3. Negation. A mention preceded, within ``NEGATION_WINDOW`` words of the same clause, by a negator (not,
     no, never, neither, nor, without, hardly, barely, cannot, any "n't" word), or written as a negated
     compound ("un-happy", "non-angry"), is dropped: "not angry, rather sad" reads as sad, and "not angry"
     alone has no label. We never infer the opposite ("not happy" is not sad). Negation further away
     ("I don't think he is angry") is not detected; such answers read as the label they name.
  4. Verdict. Exactly one distinct class → that class; none → invalid ('no_label'); several distinct classes
     → invalid ('several_labels'), even when one is mentioned more often. Invalid answers are never mapped
     to a default class; the scorer counts them as wrong.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

# Word forms of each emotion concept. Kept deliberately small: inflections plus synonyms that leave no doubt.
WORDS: dict[str, tuple[str, ...]] = {
    "happy": ("happy", "happiness", "happily", "happier", "happiest"),
    "sad": ("sad", "sadness", "sadly", "sadder", "saddest", "saddened"),
    "neutral": ("neutral", "neutrality", "neutrally"),
    "angry": ("angry", "anger", "angrily", "angrier", "angriest", "angered"),
    "surprise": ("surprise", "surprised", "surprises"),
    "disgust": ("disgust", "disgusted", "disgusts"),
    "fear": ("fear", "fears", "feared", "fearful", "fearfully", "afraid", "scared", "frightened"),
    "contempt": ("contempt", "contemptuous", "contemptuously"),
    "anxiety": ("anxiety", "anxious", "anxiously", "worried", "worry", "worries", "worrying"),
    "helplessness": ("helplessness", "helpless", "helplessly"),
    "disappointment": ("disappointment", "disappointed"),
}
# A benchmark class name -> the concept whose words it accepts (class names not listed are concepts).
CLASS_CONCEPT = {"happiness": "happy", "sadness": "sad", "anger": "angry", "worried": "anxiety"}

NEGATORS = frozenset({"not", "no", "never", "neither", "nor", "without", "hardly", "barely", "cannot"})
NEGATED_PREFIXES = frozenset({"un", "non", "not"})  # "un-happy", "non-angry"
CLAUSE_BREAKS = frozenset({"but", "however", "yet", "although", "though", "instead", "rather", "whereas"})
NEGATION_WINDOW = 3

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_OPEN_ANSWER_RE = re.compile(r"<answer>", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>.*?(</think>|$)", re.IGNORECASE | re.DOTALL)
# Words (with inner apostrophes and hyphens) and the punctuation that ends a clause.
_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)*(?:-[a-z]+(?:'[a-z]+)*)*|[.,;:!?()\n]")


@dataclasses.dataclass(frozen=True)
class Parsed:
    label: str | None  # the class name, or None when invalid
    reason: str  # 'ok' | 'no_label' | 'several_labels'
    matches: tuple[str, ...]  # distinct classes mentioned (not negated), in order of first mention
    span: str  # the text that was read

    @property
    def valid(self) -> bool:
        return self.label is not None


def answer_span(response: str) -> str:
    """Rule 1: the text of the last ``<answer>`` span, else the response without ``<think>`` blocks."""
    spans = _ANSWER_RE.findall(response)
    if spans:
        return spans[-1]
    opens = list(_OPEN_ANSWER_RE.finditer(response))
    if opens:
        return response[opens[-1].end():]
    return _THINK_RE.sub(" ", response)


def _is_negator(word: str) -> bool:
    return word in NEGATORS or word.endswith("n't")


class LabelParser:
    """Parses answers against one label set (class names in the benchmark's id order)."""

    def __init__(self, classes: Sequence[str], words: Mapping[str, Sequence[str]] = WORDS):
        self.classes = tuple(classes)
        self.word_to_class: dict[str, str] = {}
        for name in self.classes:
            concept = CLASS_CONCEPT.get(name, name)
            if concept not in words:
                raise ValueError(f"class {name!r} has no word list; known concepts: {sorted(words)}")
            for form in {name, *words[concept]}:
                other = self.word_to_class.setdefault(form, name)
                if other != name:
                    raise ValueError(f"word {form!r} would mean both {other!r} and {name!r}")

    def mentions(self, text: str) -> list[str]:
        """Rules 2-3: classes named in ``text`` (not negated), in order, with repeats."""
        tokens = _TOKEN_RE.findall(text.lower().replace("\u2019", "'"))
        found = []
        for i, token in enumerate(tokens):
            parts = token.split("-")
            if len(parts) > 1 and parts[0] in NEGATED_PREFIXES:
                continue  # "un-happy": a negated compound, no mention
            hits = [self.word_to_class[p] for p in parts if p in self.word_to_class]
            if not hits or self._negated(tokens, i):
                continue
            found += hits
        return found

    @staticmethod
    def _negated(tokens: list[str], i: int) -> bool:
        for j in range(i - 1, max(-1, i - 1 - NEGATION_WINDOW), -1):
            word = tokens[j]
            if not word[0].isalpha() or word in CLAUSE_BREAKS:
                return False  # punctuation or a contrast word closes the clause
            if _is_negator(word):
                return True
        return False

    def __call__(self, response: str | None) -> Parsed:
        span = answer_span(response or "")
        distinct = tuple(dict.fromkeys(self.mentions(span)))
        if len(distinct) == 1:
            return Parsed(distinct[0], "ok", distinct, span)
        return Parsed(None, "no_label" if not distinct else "several_labels", distinct, span)
