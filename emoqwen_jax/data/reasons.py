"""Bad input gets a named reason, never a crash.

Every loader and processor raises ``Rejected(reason, detail)`` for bad input; the pipeline catches it, turns
the sample into a rejection record, and a ``RejectCounter`` counts reasons, warns once per reason, keeps a few
example ids per reason, and stops the run with ``TooManyRejectsError`` when the rejected fraction passes
``config.data.max_reject_fraction``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Every reason the data code can give; docs/data.md and docs/audio.md list them with their causes.
REASONS = {
    "missing_file": "the media file does not exist under the data root",
    "path_escapes_root": "the media path resolves outside the data root (absolute path, '..', symlink)",
    "unreadable_image": "the image cannot be decoded",
    "corrupt_video": "the container or stream cannot be decoded (e.g. a truncated mp4)",
    "zero_frames": "the video decodes to no frames",
    "too_few_frames": "the clip has fewer than 2 frames (or than min_video_frames)",
    "bad_resolution": "a frame is tiny or enormous (side < min_input_side or pixels > max_input_pixels)",
    "bad_aspect_ratio": "longer/shorter side above max_aspect_ratio (200)",
    "malformed_json": "a manifest line or file is not valid JSON (or not an object)",
    "malformed_row": "a CSV row lacks its columns",
    "unknown_label": "a benchmark label id or name outside the benchmark's classes",
    "empty_conversation": "no conversation turns (or no media and no text)",
    "bad_role": "a turn without a role, or a role other than user/assistant/system",
    "no_assistant_turn": "nothing to learn: no assistant turn with text",
    "non_utf8": "text that is not valid UTF-8 (or contains lone surrogates)",
    "placeholder_mismatch": "the number of <video>/<image> placeholders differs from the media given",
    "too_long": "the tokenized sample (with all vision tokens) exceeds max_length; we never truncate",
    "no_audio": "the manifest marks audio as required (audio_required) but the file has no audio stream",
    "corrupt_audio": "the audio stream cannot be decoded, decodes to nothing, or is truncated",
    "bad_sample_rate": "the audio stream declares a sample rate of 0 (or none)",
    "bad_audio_samples": "the decoded audio holds NaN or infinite samples",
    "audio_too_long": "the audio is longer than data.max_audio_seconds (checked before decoding); never cut",
}


class Rejected(Exception):
    """Raised for bad input; ``reason`` is a key of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; valid: {sorted(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TooManyRejectsError(RuntimeError):
    """The rejected fraction passed ``max_reject_fraction``."""


def rejection(sample_id: str, err: Rejected) -> dict[str, Any]:
    """The record a rejected sample becomes inside the pipeline (filtered out before batching)."""
    return {"rejected": err.reason, "id": str(sample_id), "detail": err.detail[:300]}


class RejectCounter:
    """Counts ok/rejected samples by reason; warns once per reason; enforces the reject fraction.

    Its state is a plain dict (``get_state``/``set_state``) so it is checkpointed with the iterator.
    """

    def __init__(self, max_reject_fraction: float = 1.0, check_after: int = 0, max_examples: int = 3):
        self.max_reject_fraction = float(max_reject_fraction)
        self.check_after = int(check_after)
        self.max_examples = int(max_examples)
        self.ok = 0
        self.rejected: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    @property
    def seen(self) -> int:
        return self.ok + sum(self.rejected.values())

    @property
    def fraction(self) -> float:
        return (self.seen - self.ok) / max(self.seen, 1)

    def add_ok(self) -> None:
        self.ok += 1
        self.check()

    def add_rejected(self, reason: str, sample_id: str, detail: str = "") -> None:
        first = reason not in self.rejected
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{sample_id}: {detail}" if detail else str(sample_id))
        if first:
            # Once per reason: a dataset with 10k broken clips must not flood the log.
            log.warning("rejecting samples for reason %r (%s); first: %s %s", reason, REASONS.get(reason, "?"),
                        sample_id, detail)
        self.check()

    def check(self, final: bool = False) -> None:
        """Raises TooManyRejectsError when the rejected fraction passes the limit (after check_after samples)."""
        if not self.rejected or (self.seen < self.check_after and not final):
            return
        if self.fraction > self.max_reject_fraction:
            raise TooManyRejectsError(
                f"{self.seen - self.ok} of {self.seen} samples rejected ({self.fraction:.1%} > "
                f"max_reject_fraction {self.max_reject_fraction:.1%}); by reason {self.rejected}; examples "
                f"{self.examples}. Fix the data (see `emoqwen-data check`) or raise config.data.max_reject_fraction.")

    def summary(self) -> dict[str, Any]:
        """``{"ok": n, "rejected": {reason: count}, "examples": {reason: [id: detail, ...]}}``."""
        return {"ok": self.ok, "rejected": dict(sorted(self.rejected.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    def get_state(self) -> dict[str, Any]:
        return self.summary()

    def set_state(self, state: dict[str, Any]) -> None:
        self.ok = int(state["ok"])
        self.rejected = {k: int(v) for k, v in state["rejected"].items()}
        self.examples = {k: list(v) for k, v in state["examples"].items()}
