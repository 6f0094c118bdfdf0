"""Media references -> local files the data pipeline reads, under the server's rules.

A reference is a ``data:`` URL (``data:<mime type>;base64,<payload>``) or a ``file://`` URL whose path lies
inside ``--media_root`` after resolving ``..`` and symlinks. Anything else (``http(s)://``, a bare path, a
``file://`` URL without a media root or outside it) is refused with 403: the server never fetches from the
network and never reads outside the root. A media type the pipeline does not read is refused with 415; a
``file://`` file larger than the upload limit with 413.

Decoded ``data:`` payloads are written to a private temporary folder for the pipeline (which reads paths)
and removed as soon as the prompt is built (``Materialized.close``).
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
import urllib.parse

import av

from emoqwen_jax.data.manifests import resolve_path
from emoqwen_jax.data.reasons import Rejected
from emoqwen_jax.data.video_io import probe
from emoqwen_jax.data.vision import sample_indices
from emoqwen_jax.serve.schema import MAX_URL, ApiError

# Media types the pipeline decodes, by kind (PIL for images, PyAV for video and audio).
MIME_TYPES = {
    "image": {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
              "image/gif": ".gif", "image/bmp": ".bmp", "image/tiff": ".tif"},
    "video": {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
              "video/avi": ".avi", "video/x-msvideo": ".avi", "video/mpeg": ".mpg", "video/ogg": ".ogv"},
    "audio": {"audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/mpeg": ".mp3",
              "audio/mp3": ".mp3", "audio/flac": ".flac", "audio/x-flac": ".flac", "audio/ogg": ".ogg",
              "audio/webm": ".weba", "audio/mp4": ".m4a", "audio/aac": ".aac", "audio/x-m4a": ".m4a"},
}
EXTENSIONS = {kind: {ext for ext in types.values()} | ({".jpeg", ".tiff"} if kind == "image" else set())
              | ({".m4v"} if kind == "video" else set()) for kind, types in MIME_TYPES.items()}
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac"}  # input_audio's formats


def _unsupported(kind: str, what: str) -> ApiError:
    valid = sorted(MIME_TYPES[kind])
    return ApiError(415, f"unsupported {kind} media type {what!r}; valid: {valid}", "unsupported_media_type")


class Materialized:
    """The local files of one request's media: ``items`` [(kind, path)] in request order; ``close`` removes
    the temporary copies (``file://`` media are read in place)."""

    def __init__(self, media_root: str | None, max_bytes: int):
        self.media_root = os.path.realpath(media_root) if media_root else None
        self.max_bytes = max_bytes
        self.items: list[tuple[str, str]] = []
        self._tmp: str | None = None

    def __enter__(self) -> Materialized:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _write(self, payload: bytes, suffix: str) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="emoqwen_serve_")
        path = os.path.join(self._tmp, f"{len(self.items)}{suffix}")
        with open(path, "wb") as f:
            f.write(payload)
        return path

    def add_url(self, kind: str, url: str) -> str:
        """Resolves ``url`` for a medium of ``kind`` (video | image | audio); returns its local path."""
        if url.startswith("data:"):
            head, sep, payload = url[5:].partition(",")
            if not sep or not head.endswith(";base64"):
                raise ApiError(400, "a data: URL must be data:<media type>;base64,<payload>", "bad_data_url")
            mime = head[: -len(";base64")].split(";")[0].strip().lower()
            if mime not in MIME_TYPES[kind]:
                raise _unsupported(kind, mime)
            return self.add_bytes(kind, _b64decode(payload), MIME_TYPES[kind][mime])
        if len(url) > MAX_URL:
            raise ApiError(400, f"a file:// URL longer than {MAX_URL} characters", "url_too_long")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "file":
            raise ApiError(403, f"only data: URLs and file:// paths inside --media_root are read; got a "
                                f"{parsed.scheme or 'bare'} reference (the server never fetches from the network)",
                           "url_not_allowed")
        if self.media_root is None:
            raise ApiError(403, "file:// URLs are refused: the server was started without --media_root",
                           "url_not_allowed")
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(403, f"file:// URL with host {parsed.netloc!r}; only local paths are read",
                           "url_not_allowed")
        try:
            path = resolve_path(self.media_root, urllib.parse.unquote(parsed.path))
        except Rejected as err:
            raise ApiError(403 if err.reason == "path_escapes_root" else 400,
                           f"{err.reason}: the path is outside --media_root" if err.reason == "path_escapes_root"
                           else str(err), err.reason) from None
        if not os.path.isfile(path):
            raise ApiError(400, f"missing_file: {parsed.path} is not a file under --media_root", "missing_file")
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS[kind]:
            raise ApiError(415, f"unsupported {kind} file type {ext or '(none)'!r}; valid: "
                                f"{sorted(EXTENSIONS[kind])}", "unsupported_media_type")
        if os.path.getsize(path) > self.max_bytes:
            raise ApiError(413, f"the file is over the upload limit of {self.max_bytes} bytes", "too_large")
        self.items.append((kind, path))
        return path

    def add_audio(self, data: str, fmt: str) -> str:
        """An OpenAI ``input_audio`` part (base64 and a format name)."""
        if fmt not in AUDIO_FORMATS:
            raise ApiError(415, f"unsupported input_audio format {fmt!r}; valid: {sorted(AUDIO_FORMATS)}",
                           "unsupported_media_type")
        return self.add_bytes("audio", _b64decode(data), MIME_TYPES["audio"][AUDIO_FORMATS[fmt]])

    def add_bytes(self, kind: str, payload: bytes, suffix: str) -> str:
        if not payload:
            raise ApiError(400, f"empty {kind} payload", "bad_data_url")
        path = self._write(payload, suffix)
        self.items.append((kind, path))
        return path


def _b64decode(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the media payload is not valid base64", "bad_data_url") from None


def frame_times(path: str, data: dict) -> list[float]:
    """Seconds of the frames the pipeline samples from the clip at ``path`` (float, from the clip's start),
    with the session's data settings ``data`` (fps, min_frames, max_frames). Demuxes only: no decoding."""
    with av.open(path) as container:
        info = probe(container)
        index = sample_indices(info.num_frames, info.fps, fps=float(data["fps"]), min_frames=int(data["min_frames"]),
                               max_frames=int(data["max_frames"]))
        seconds = (info.pts[index] - info.pts[0]) * float(container.streams.video[0].time_base)
    return [round(float(s), 4) for s in seconds]

