"""Request bodies of the server (pydantic), their size bounds, and the one error type every endpoint raises.

Every field is bounded: counts of messages, parts, stop strings and labels, the length of each string that
is not media, and token budgets (checked again against ``--max_len`` once the prompt's length is known).
Media bytes are bounded by the body limit (``--max_upload_mb``) and, for ``file://`` paths, by the same
limit on the file's size.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGES = 64
MAX_PARTS = 64
MAX_MEDIA = 8  # media items per request
MAX_TEXT = 32_000  # characters of one text part, message or subtitle
MAX_URL = 4096  # characters of a file:// URL (data: URLs are bounded by the body limit alone)
MAX_STOP = 4  # stop strings (as OpenAI)
MAX_STOP_CHARS = 64
MAX_LABELS = 64
MAX_LABEL_CHARS = 64


class ApiError(Exception):
    """An error answer: HTTP ``status``, a message, a machine-readable ``code`` (the data pipeline's reason
    code for bad media) and extra headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}

    def body(self) -> dict:
        """The OpenAI error shape: ``{"error": {"message", "type", "code"}}``."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MediaURL(_Strict):
    url: str  # data: URL (bounded by the body) or file:// URL (bounded by MAX_URL where it is resolved)
    detail: str | None = Field(default=None, max_length=16)  # OpenAI's image detail hint; ignored


class InputAudio(_Strict):
    data: str  # base64
    format: str = Field(max_length=16)  # wav | mp3 | flac (others: 415)


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


Part = Annotated[TextPart | ImagePart | VideoPart | AudioPart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send "name" and the like
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[Part], Field(min_length=1, max_length=MAX_PARTS)] = Field(
        union_mode="left_to_right")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Unknown OpenAI fields are ignored; those that change the answer and that
    we do not implement are refused (``n`` > 1)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # default greedy (deterministic answers)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # 0 or -1: off (-1 is vLLM's spelling)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None = Field(
        default=None, max_length=MAX_STOP)
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=1)


class EmotionRequest(_Strict):
    """POST /v1/emotion: at least one medium; ``labels`` a benchmark's label set or a list of words."""

    video: str | None = None
    image: str | None = None
    audio: str | None = None
    subtitle: str | None = Field(default=None, max_length=MAX_TEXT)
    labels: Literal["dfew", "mafw", "mer"] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]],
        Field(min_length=2, max_length=MAX_LABELS)] = "dfew"
    describe: bool = False
    gate_timeline: bool = False  # also the gate's weights per temporal patch group of the clip (one ViT pass more)
    max_tokens: int = Field(default=256, ge=1)  # the description's budget
    stream: bool = False  # server-sent events: frames, then the scores, then the description as it grows
