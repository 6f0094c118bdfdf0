"""EMER (explainable emotion reasoning): a judge-free, reproducible score for free-text descriptions, and
the requests for an LLM judge as an option.

Judge-free metric (emotion-word overlap). Each text is reduced to the set of emotion CONCEPTS it asserts:
words of ``EMER_WORDS`` (the benchmark word lists of ``parse.WORDS`` plus more emotion words and synonyms,
so "joyful" and "happy" meet), whole words only, negated mentions dropped — the same reading rules as
``parse.LabelParser`` (rules 2-3). For a prediction set P and reference set R:

  precision = |P ∩ R| / |P|   (0 when P is empty)      recall = |P ∩ R| / |R|
  f1        = 2·precision·recall / (precision + recall)  (0 when both are 0)

averaged over the clips whose reference names at least one concept (the others cannot be scored and are
counted in ``no_reference_emotion``); a clip without a prediction scores 0. It rewards naming the
reference's emotions and penalises naming others; it ignores the clues (faces, voice, words) the EMER
judge also rates, which is what the judge requests are for.

LLM judge (optional): ``judge_requests`` writes one JSON line per clip with a prompt that asks a judge
model for the EMER 1-10 overlap score; send them to any model and average its scores.
"""

from __future__ import annotations

import csv
import json
from typing import Sequence

import numpy as np

from emoqwen_jax.eval.emotion.benchmarks import read_predictions
from emoqwen_jax.eval.parse import WORDS, LabelParser
from emoqwen_jax.runtime import storage

# The default question of emoqwen-describe and of EMER runs.
REASONING_PROMPT = ("Please analyse the emotional state of the person in this video. Describe the facial "
                    "expressions, body movements, voice and words that reveal it, then say which emotion the "
                    "person feels.")

_EXTRA_WORDS: dict[str, tuple[str, ...]] = {
    "happy": ("joy", "joyful", "cheerful", "delighted", "pleased", "glad"),
    "sad": ("sorrow", "sorrowful", "upset", "unhappy", "grief", "depressed"),
    "angry": ("furious", "rage", "irritated", "irritation", "annoyed", "annoyance"),
    "fear": ("terrified", "panic", "panicked"),
    "anxiety": ("nervous", "nervousness", "uneasy", "tense", "tension"),
    "calm": ("calm", "calmness", "calmly", "relaxed", "peaceful"),
    "excited": ("excited", "excitement", "thrilled"),
    "frustrated": ("frustrated", "frustration"),
    "confused": ("confused", "confusion", "puzzled"),
    "embarrassed": ("embarrassed", "embarrassment", "awkward"),
    "proud": ("proud", "pride"),
    "dissatisfied": ("dissatisfied", "dissatisfaction"),
}
EMER_WORDS: dict[str, tuple[str, ...]] = {
    concept: WORDS.get(concept, ()) + _EXTRA_WORDS.get(concept, ())
    for concept in dict.fromkeys([*WORDS, *_EXTRA_WORDS])
}
TEXT_COLUMNS = ("english", "description", "reason", "reference")

_PARSER = LabelParser(tuple(EMER_WORDS), EMER_WORDS)


def emotion_concepts(text: str | None) -> set[str]:
    """The emotion concepts ``text`` asserts (whole words, synonyms merged, negated mentions dropped)."""
    return set(_PARSER.mentions(text or ""))


def overlap(pred: set[str], ref: set[str]) -> tuple[float, float, float]:
    """(precision, recall, f1) of concept set ``pred`` against a non-empty ``ref``."""
    hit = len(pred & ref)
    p = hit / len(pred) if pred else 0.0
    r = hit / len(ref)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def score_emer(predictions: dict[str, str | None], references: dict[str, str]) -> dict:
    """Mean word-overlap precision/recall/F1 over the clips whose reference asserts an emotion."""
    extra = [k for k in predictions if k not in references]
    if extra:
        raise ValueError(f"{len(extra)} prediction ids are not in the references, e.g. {extra[:5]}")
    rows, skipped = [], 0
    for clip, ref_text in references.items():
        ref = emotion_concepts(ref_text)
        if not ref:
            skipped += 1
            continue
        rows.append(overlap(emotion_concepts(predictions.get(clip)), ref))
    if not rows:
        raise ValueError("no reference description names an emotion word; nothing to score")
    p, r, f = (float(x) for x in np.mean(np.asarray(rows), axis=0))
    return {"n": len(rows), "precision": round(p, 6), "recall": round(r, 6), "f1": round(f, 6),
            "missing": sum(1 for k in references if predictions.get(k) is None),
            "no_reference_emotion": skipped}


def read_references(path: str, text_column: str | None = None, id_column: str = "name") -> dict[str, str]:
    """An EMER CSV -> {clip id: reference description}."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"reference file {path} does not exist")
    with storage.open(path, "r", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        column = text_column or next((c for c in TEXT_COLUMNS if c in fields), None)
        if id_column not in fields or column not in fields:
            raise ValueError(f"{path}: need an id column {id_column!r} and a text column "
                             f"({text_column or ' or '.join(TEXT_COLUMNS)}); header is {fields}")
        refs: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            clip = (row.get(id_column) or "").strip()
            if not clip:
                raise ValueError(f"{path}:{line}: empty {id_column}")
            if clip in refs:
                raise ValueError(f"{path}:{line}: clip id {clip!r} appears twice")
            refs[clip] = row.get(column) or ""
    return refs


def score_emer_files(predictions_path: str, references_path: str, text_column: str | None = None) -> dict:
    return score_emer(read_predictions(predictions_path), read_references(references_path, text_column))


JUDGE_TEMPLATE = (
    "Please act as an assessment expert in the field of emotion recognition. We provide a reference "
    "description of a person's emotional state with its clues, and a predicted description. Score from 1 "
    "to 10 how well the predicted emotional state and its clues overlap with the reference (10 = the same "
    "emotions, supported by the same clues). Reply with the score only.\n\n"
    "Reference: {reference}\n\nPrediction: {prediction}")


def judge_requests(predictions: dict[str, str | None], references: dict[str, str], path: str,
                   ids: Sequence[str] | None = None) -> str:
    """Writes ``{"id", "prompt"}`` JSON lines for an LLM judge (clips without a prediction are skipped)."""
    with storage.open(path, "w", encoding="utf-8") as f:
        for clip in ids or references:
            if predictions.get(clip):
                f.write(json.dumps({"id": clip, "prompt": JUDGE_TEMPLATE.format(
                    reference=references[clip], prediction=predictions[clip])}) + "\n")
    return path
