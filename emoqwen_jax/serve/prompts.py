"""Requests -> engine prompts and sampling settings; first-token scores -> class probabilities.

Chat: each user message's parts become one user turn, a media part becoming its ``<video>``/``<image>``/
``<audio>`` placeholder at its place in the text, so the prompt is the training chat template with the same
vision and audio blocks (``emoqwen_jax.data``). Emotion: the benchmark question of the label set (for a list
of words, the same question over those words), asked about the request's media.

Class scores: the answer's first-token log-probabilities over each class word's first token, renormalised
over the distinct first tokens. Classes whose words begin with the same token (a small tokenizer spells
"sad" and "surprise" from the same "s") share that token's probability equally; the greedy answer's text
breaks the tie for ``label``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from emoqwen_jax.data.manifests import BENCHMARK_CLASSES, benchmark_prompt
from emoqwen_jax.data.text import PLACEHOLDER_RE, prompt_ids
from emoqwen_jax.eval.emotion.emer import REASONING_PROMPT
from emoqwen_jax.infer.engine import SamplingParams
from emoqwen_jax.infer.generate import batch_vision
from emoqwen_jax.infer.session import Prompt, Session
from emoqwen_jax.serve.media import Materialized
from emoqwen_jax.serve.schema import MAX_MEDIA, ApiError, ChatRequest, EmotionRequest

DEFAULT_MAX_TOKENS = 512  # a chat completion's budget when the request names none (capped by --max_len)
_PART_KIND = {"image_url": "image", "video_url": "video", "input_audio": "audio"}


# A text-only request up to this size is built on the event loop, with no thread hop: tokenising 8192 characters
# took about half a millisecond on a 2-core CPU. Longer text goes to the worker pool, where it cannot hold up
# the streams.
INLINE_TEXT_CHARS = 8192


def short_text_only(request: ChatRequest) -> bool:
    """Whether the request has text parts only, INLINE_TEXT_CHARS characters at most in all."""
    size = 0
    for m in request.messages:
        parts = [m.content] if isinstance(m.content, str) else m.content
        for part in parts:
            if not isinstance(part, str) and part.type != "text":
                return False
            size += len(part if isinstance(part, str) else part.text)
    return size <= INLINE_TEXT_CHARS


def chat_turns(request: ChatRequest, media: Materialized) -> list[dict[str, str]]:
    """The request's messages as chat turns; media parts are resolved into ``media`` (in order)."""
    turns = []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, str):
            text = message.content
            if message.role == "user" and PLACEHOLDER_RE.search(text):
                raise _placeholder_error(i)
        else:
            pieces = []
            for part in message.content:
                if part.type == "text":
                    if message.role == "user" and PLACEHOLDER_RE.search(part.text):
                        raise _placeholder_error(i)
                    pieces.append(part.text)
                    continue
                if message.role != "user":
                    raise ApiError(400, f"messages[{i}]: media parts are allowed in user messages only",
                                   "media_outside_user_turn")
                if len(media.items) >= MAX_MEDIA:
                    raise ApiError(400, f"more than {MAX_MEDIA} media items in one request", "too_many_media")
                kind = _PART_KIND[part.type]
                if kind == "audio":
                    media.add_audio(part.input_audio.data, part.input_audio.format)
                else:
                    media.add_url(kind, getattr(part, part.type).url)
                pieces.append(f"<{kind}>\n")
            text = "".join(pieces)
        turns.append({"role": message.role, "content": text})
    if not any(t["role"] == "user" for t in turns):
        raise ApiError(400, "messages hold no user message", "missing_user_message")
    if turns[-1]["role"] == "assistant":
        raise ApiError(400, "the last message is from the assistant; nothing to answer", "bad_role")
    return turns


def _placeholder_error(i: int) -> ApiError:
    return ApiError(400, f"messages[{i}]: text may not contain <video>, <image> or <audio>; send media as "
                         "image_url / video_url / input_audio parts", "placeholder_in_text")


def build_prompts(session: Session, turn_lists: Sequence[list[dict[str, str]]],
                  media: Sequence[tuple[str, str]]) -> list[Prompt]:
    """Conversations over the same media (placeholders in media order) -> generation prompts, built as
    ``Session.prompt`` builds one user turn: each medium once through the training processor, then the chat
    template."""
    parts = [session._medium(kind, path) for kind, path in media]
    vision = batch_vision([v for v, _ in parts])
    vision = {k: v for k, v in vision.items() if v is not None}
    return [Prompt(np.asarray(prompt_ids(turns, [blocks for _, blocks in parts], session.tokenizer, session.info,
                                         system_prompt=session.data["system_prompt"],
                                         max_length=int(session.data["max_length"])), np.int32), vision)
            for turns in turn_lists]


def question_prompts(session: Session, questions: Sequence[str], media: Sequence[tuple[str, str]],
                     subtitle: str | None) -> list[Prompt]:
    """One user question per prompt about all of ``media`` (placeholders first), with the subtitle appended
    as training appends it."""
    head = "".join(f"<{kind}>\n" for kind, _ in media)
    tail = "\nSubtitle: " + subtitle if subtitle else ""
    return build_prompts(session, [[{"role": "user", "content": head + q + tail}] for q in questions], media)


def chat_params(request: ChatRequest, prompt_tokens: int, max_len: int) -> SamplingParams:
    """The request's sampling settings; the token budget must fit ``max_len`` with the prompt."""
    room = max_len - prompt_tokens
    if room < 1:
        raise too_long(prompt_tokens, max_len)
    asked = request.max_tokens or request.max_completion_tokens
    max_tokens = asked or min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                            f"server's --max_len of {max_len} tokens", "too_long")
    if request.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens ({request.min_tokens}) exceeds max_tokens ({max_tokens})", "bad_min_tokens")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                          top_k=max(request.top_k, 0), min_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
                          stop=stop, seed=request.seed)


def too_long(prompt_tokens: int, max_len: int) -> ApiError:
    return ApiError(400, f"the prompt is {prompt_tokens} tokens, over the server's --max_len of {max_len} tokens",
                    "too_long")


def label_words(labels: str | list[str]) -> tuple[str, ...]:
    """A label set's class words (a benchmark's, in its id order) or the given words, stripped and unique."""
    if isinstance(labels, str):
        return BENCHMARK_CLASSES[labels]
    words = tuple(w.strip() for w in labels)
    if any(not w or PLACEHOLDER_RE.search(w) or "," in w for w in words):
        raise ApiError(400, "labels must be non-empty words without commas or media placeholders", "bad_labels")
    if len(set(words)) != len(words):
        raise ApiError(400, f"labels {list(words)} repeat a word", "bad_labels")
    return words


def emotion_question(labels: str | list[str], words: Sequence[str], noun: str) -> str:
    """The benchmark question (without its placeholder) over ``words``, about "this ``noun``"."""
    base = benchmark_prompt(labels if isinstance(labels, str) else "dfew")
    base = base.replace(", ".join(BENCHMARK_CLASSES[labels if isinstance(labels, str) else "dfew"]), ", ".join(words))
    return base.replace("<video>\n", "").replace("this video", f"this {noun}")


def describe_question(noun: str) -> str:
    return REASONING_PROMPT.replace("this video", f"this {noun}")


def emotion_media(request: EmotionRequest) -> list[tuple[str, str]]:
    media = [(kind, url) for kind, url in (("video", request.video), ("image", request.image),
                                           ("audio", request.audio)) if url]
    if not media:
        raise ApiError(400, "give at least one of video, image, audio", "no_media")
    return media


@dataclasses.dataclass(frozen=True)
class Classes:
    """A label set as the scoring sees it: the words, each word's first token id, the distinct ids."""

    words: tuple[str, ...]
    first_ids: tuple[int, ...]
    ids: tuple[int, ...]
    longest: int  # tokens of the longest word

    @classmethod
    def of(cls, session: Session, labels: str | list[str]) -> Classes:
        words = label_words(labels)
        tokens = [session.tokenizer.encode(w, add_special_tokens=False).ids for w in words]
        first = tuple(t[0] for t in tokens)
        return cls(words, first, tuple(dict.fromkeys(first)), max(len(t) for t in tokens))

    def params(self) -> SamplingParams:
        """Greedy, long enough to spell the longest word (the answer breaks ties), scoring the first ids."""
        return SamplingParams(max_tokens=min(16, self.longest + 1), score_token_ids=self.ids)

    def result(self, first_scores: Sequence[float] | None, answer: str) -> tuple[str, dict[str, float]]:
        """(label, {word: probability}) from log-probabilities over ``ids`` at the first answer position."""
        if first_scores is None:
            raise ApiError(500, "the engine returned no first-token scores", "engine_error")
        top = max(first_scores)
        mass = [math.exp(s - top) for s in first_scores]
        total = sum(mass)
        prob_of = {i: m / total for i, m in zip(self.ids, mass, strict=True)}
        scores = {w: prob_of[i] / self.first_ids.count(i) for w, i in zip(self.words, self.first_ids, strict=True)}
        said = answer.strip().lower()
        label = max(self.words, key=lambda w: (round(scores[w], 12), said.startswith(w.lower())))
        return label, scores
