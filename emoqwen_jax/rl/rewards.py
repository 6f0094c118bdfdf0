"""Verifiable rewards for the RL stage, by name; each is a plain function of one sampled completion.

Built in (R1-Omni's two 0/1 rewards, plus DAPO's soft length penalty):
  accuracy        1 when the content of the completion's last ``<answer>…</answer>`` span, lower-cased with runs
                  of white space made one space and the ends stripped, equals the label word (normalised the
                  same way), else 0. The label word is the reference answer's own ``<answer>`` content, or the
                  whole reference answer when it has none: a benchmark CSV's class name (the label sets of
                  ``emoqwen_jax.data.manifests.BENCHMARK_CLASSES``, which the evaluation reads too) or a
                  conversation's one-word answer.
  format          1 when the whole completion is ``<think>…</think>`` then ``<answer>…</answer>`` (white space
                  around and between allowed), else 0.
  length_penalty  DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13): 0 up to max_tokens − buffer
                  tokens, then falling linearly to −1 at max_tokens, −1 for a completion cut at max_tokens
                  without stopping.

Register a reward of your own before the run starts::

    from emoqwen_jax.rl.rewards import register_reward

    @register_reward("mentions_face")
    def mentions_face(sample):            # sample: RewardInput
        return float("face" in sample.text)

and name it in the stage config with its weight: ``stages.stage4_rl.rl.rewards = {"accuracy": 1.0,
"mentions_face": 0.2}`` (illustrative). The step's reward is the weighted sum.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from emoqwen_jax.eval.parse import answer_span


@dataclasses.dataclass(frozen=True)
class RewardInput:
    text: str  # the completion, decoded without special tokens
    reference: str  # the data's reference answer (the assistant turn)
    num_tokens: int  # generated tokens, the stop token included
    max_tokens: int  # the rollout's max_new_tokens
    stopped: bool  # False when generation hit max_tokens
    length_buffer: int = 0  # length_penalty: tokens before max_tokens where the penalty ramps (0: max_tokens // 4)


RewardFn = Callable[[RewardInput], float]
REWARDS: dict[str, RewardFn] = {}

_CLOSED_ANSWER_RE = re.compile(r"<answer>.*?</answer>", re.IGNORECASE | re.DOTALL)
FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: makes ``fn(RewardInput) -> float`` available to stage configs as ``name``."""
    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({REWARDS[name].__module__})")
        REWARDS[name] = fn
        return fn

    return add


def normalize_word(text: str) -> str:
    """Lower case, white space runs as one space, ends stripped."""
    return " ".join(text.lower().split())


def label_word(reference: str) -> str:
    """The label a reference answer gives: its ``<answer>`` content (last span) or the whole answer, normalised
    (the evaluation parser's ``answer_span``)."""
    return normalize_word(answer_span(reference))


@register_reward("accuracy")
def accuracy(sample: RewardInput) -> float:
    """The last closed ``<answer>`` span (the evaluation parser's ``answer_span``) equals the label word."""
    closed = _CLOSED_ANSWER_RE.search(sample.text) is not None
    return float(closed and normalize_word(answer_span(sample.text)) == label_word(sample.reference))


@register_reward("format")
def format_reward(sample: RewardInput) -> float:
    return float(FORMAT_RE.fullmatch(sample.text) is not None)


@register_reward("length_penalty")
def length_penalty(sample: RewardInput) -> float:
    if not sample.stopped:
        return -1.0
    buffer = sample.length_buffer or max(sample.max_tokens // 4, 1)
    over = sample.num_tokens - (sample.max_tokens - buffer)
    return 0.0 if over <= 0 else -min(over / buffer, 1.0)


def check_rewards(weights: Mapping[str, float]) -> None:
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown or not weights:
        raise ValueError(f"rewards {unknown or '{}'} are not registered; registered: {sorted(REWARDS)} "
                         f"(register your own with emoqwen_jax.rl.rewards.register_reward)")


def score(samples: Sequence[RewardInput], weights: Mapping[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(float32[N] weighted total, {name: float32[N] unweighted}) for the rewards named in ``weights``."""
    check_rewards(weights)
    parts = {name: np.array([REWARDS[name](s) for s in samples], np.float32) for name in weights}
    total = sum(float(weights[name]) * parts[name] for name in weights)
    return np.asarray(total, np.float32).reshape(len(samples)), parts

