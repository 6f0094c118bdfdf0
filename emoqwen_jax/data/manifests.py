"""Manifests → records of one form, whatever the source format.

A record (a JSON-serialisable dict, so prepared datasets can store it)::

    {"id": str, "media": [{"kind": "video"|"image"|"audio", "path": str (absolute, inside data_root)}],
     "conversations": [{"role": "user"|"assistant"|"system", "content": str}], "subtitle": str|None,
     "label": str|None, "source": str, "audio_required": bool}

or, for an entry that is already known to be bad, ``{"id", "rejected": reason, "detail"}`` — rejected entries
stay in the stream so the pipeline counts them with every other rejection.

Formats (``fmt``; 'auto' decides by extension and CSV header):
- ``conversation``: the official format, a JSON list or JSONL of ``{"id", "video"|"image"|"audio",
  "conversations", "subtitle"?, "audio_required"?}`` with ``<video>``/``<image>``/``<audio>`` placeholders
  (``video``/``image`` may be a list). ``audio`` names an audio-only file (wav/flac/mp3/ogg/m4a); a video's own
  audio track is used without a key. ``audio_required: true`` rejects a clip without an audio stream
  ('no_audio') instead of training it without audio tokens.
- ``dfew`` / ``mafw``: fold CSVs ``video_name,label`` with the benchmark's 1-based label ids (or names).
- ``mer``: ``name,discrete`` with label names.
Benchmark rows become a user turn with the benchmark's prompt and an assistant turn with the label word.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from typing import Any, Iterator

from emoqwen_jax.data.audio import AUDIO_EXTENSIONS
from emoqwen_jax.data.reasons import Rejected, rejection
from emoqwen_jax.runtime import storage

# Class lists in the benchmarks' id order (docs/design.md, Benchmark label sets); label ids in the CSVs are 1-based.
BENCHMARK_CLASSES = {
    "dfew": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
    "mafw": ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt", "anxiety",
             "helplessness", "disappointment"),
    "mer": ("neutral", "angry", "happy", "sad", "worried", "surprise"),
}
BENCHMARK_COLUMNS = {"dfew": ("video_name", "label"), "mafw": ("video_name", "label"), "mer": ("name", "discrete")}
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")


def benchmark_prompt(benchmark: str) -> str:
    """The user prompt for a benchmark clip (the eval code reuses it)."""
    classes = ", ".join(BENCHMARK_CLASSES[benchmark])
    return (f"<video>\nWhat is the emotion of the person in this video? Choose one of: {classes}. "
            "Answer with one word.")


def resolve_path(data_root: str, rel: Any) -> str:
    """``data_root``/``rel`` as a real path; Rejected('path_escapes_root') if it lands outside the root."""
    if not isinstance(rel, str) or not rel:
        raise Rejected("missing_file", f"media path {rel!r}")
    if storage.is_uri(data_root):  # no symlinks in object stores: a normalised prefix check
        root = storage.normalize(data_root)
        path = posixpath.normpath(posixpath.join(root, rel)).replace(":/", "://", 1)
        inside = path == root or path.startswith(root + "/")
    else:
        root = os.path.realpath(storage.normalize(data_root))
        path = os.path.realpath(os.path.join(root, rel))
        inside = os.path.commonpath([root, path]) == root
    if not inside:
        raise Rejected("path_escapes_root", f"{rel!r} → {path} is outside {root}")
    return path


def _has_surrogates(obj: Any) -> bool:
    """True if any string inside ``obj`` is not encodable as UTF-8 (undecodable bytes or JSON escapes)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(obj, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogates(v) for v in obj)
    return False


def conversation_record(entry: Any, data_root: str, source: str, index: int) -> dict[str, Any]:
    """One official-format entry → record (or a rejection record)."""
    if not isinstance(entry, dict):
        return rejection(f"{source}:{index}", Rejected("malformed_json", "entry is not an object"))
    sample_id = str(entry.get("id", f"{source}:{index}"))
    try:
        if _has_surrogates(entry):
            raise Rejected("non_utf8", "text is not valid UTF-8")
        media = []
        for kind in ("video", "image", "audio"):
            paths = entry.get(kind)
            if paths is None:
                continue
            for rel in paths if isinstance(paths, list) else [paths]:
                media.append({"kind": kind, "path": resolve_path(data_root, rel)})
                if kind == "audio" and os.path.splitext(media[-1]["path"])[1].lower() not in AUDIO_EXTENSIONS:
                    raise Rejected("corrupt_audio", f"{rel!r} is not an audio file ({', '.join(AUDIO_EXTENSIONS)})")
        if len({m["kind"] for m in media}) > 1:
            raise Rejected("placeholder_mismatch", "a sample mixes videos and images")
        turns = entry.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise Rejected("empty_conversation", "no conversations")
        subtitle = entry.get("subtitle")
        if subtitle is not None and not isinstance(subtitle, str):
            raise Rejected("malformed_json", "subtitle is not a string")
        required = entry.get("audio_required", False)
        if not isinstance(required, bool):
            raise Rejected("malformed_json", f"audio_required is {required!r}, not true/false")
        return {"id": sample_id, "media": media, "conversations": turns, "subtitle": subtitle,
                "label": entry.get("label"), "source": source, "audio_required": required}
    except Rejected as e:
        return rejection(sample_id, e)


def _read_text(path: str) -> str:
    with storage.open(path, "rb") as f:
        # surrogateescape keeps undecodable bytes visible, so the bad entry alone is rejected ('non_utf8').
        return f.read().decode("utf-8", errors="surrogateescape")


def read_conversations(path: str, data_root: str, source: str) -> Iterator[dict[str, Any]]:
    """Records from an official JSON or JSONL manifest."""
    text = _read_text(path)
    stripped = text.lstrip()
    if path.endswith(".json") or stripped.startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {path} is not valid JSON: {e}") from None
        if not isinstance(entries, list):
            raise ValueError(f"manifest {path}: expected a JSON list of samples, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            yield conversation_record(entry, data_root, source, i)
        return
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            yield rejection(f"{source}:{i + 1}", Rejected("malformed_json", f"line {i + 1}: {e}"))
            continue
        yield conversation_record(entry, data_root, source, i + 1)


def _label_name(benchmark: str, raw: str) -> str:
    classes = BENCHMARK_CLASSES[benchmark]
    value = raw.strip().lower()
    if value.isdigit() and 1 <= int(value) <= len(classes):
        return classes[int(value) - 1]
    if value in classes:
        return value
    raise Rejected("unknown_label", f"{raw!r} not in 1..{len(classes)} or {classes}")


def _media_path(data_root: str, name: str) -> str:
    """A benchmark clip name → path; a name without extension gets the first existing video extension."""
    if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
        return resolve_path(data_root, name)
    for ext in VIDEO_EXTENSIONS:
        path = resolve_path(data_root, name + ext)
        if storage.exists(path):
            return path
    return resolve_path(data_root, name + VIDEO_EXTENSIONS[0])


def read_benchmark_csv(path: str, data_root: str, benchmark: str, source: str) -> Iterator[dict[str, Any]]:
    """Records from a DFEW/MAFW fold CSV or a MER CSV."""
    name_col, label_col = BENCHMARK_COLUMNS[benchmark]
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    if not reader.fieldnames or name_col not in reader.fieldnames or label_col not in reader.fieldnames:
        raise ValueError(f"{path}: {benchmark} CSV needs columns {name_col},{label_col}; got {reader.fieldnames}")
    for i, row in enumerate(reader):
        name, raw = row.get(name_col), row.get(label_col)
        sample_id = f"{source}:{name or i + 2}"
        try:
            if not name or raw is None:
                raise Rejected("malformed_row", f"row {i + 2}: {row}")
            if _has_surrogates(row):
                raise Rejected("non_utf8", f"row {i + 2}")
            label = _label_name(benchmark, raw)
            yield {"id": str(name), "media": [{"kind": "video", "path": _media_path(data_root, name.strip())}],
                   "conversations": [{"role": "user", "content": benchmark_prompt(benchmark)},
                                     {"role": "assistant", "content": label}],
                   "subtitle": None, "label": label, "source": source}
        except Rejected as e:
            yield rejection(sample_id, e)


def detect_format(path: str) -> str:
    """'conversation' for .json/.jsonl; for .csv the benchmark whose columns the header has."""
    if path.endswith((".json", ".jsonl")):
        return "conversation"
    if path.endswith(".csv"):
        with storage.open(path, "rb") as f:
            header = f.readline().decode("utf-8", errors="replace").strip().lower().split(",")
        if header[:2] == ["name", "discrete"]:
            return "mer"
        if header[:2] == ["video_name", "label"]:
            return "dfew"  # DFEW and MAFW share columns; pass fmt='mafw' for MAFW's 11 classes
    raise ValueError(f"cannot tell the manifest format of {path}; pass one of conversation, dfew, mafw, mer")


def load_manifest(path: str, data_root: str, fmt: str = "auto") -> list[dict[str, Any]]:
    """All records of a manifest (rejection records included, in file order)."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"manifest {path} does not exist")
    if not storage.isdir(data_root):
        raise FileNotFoundError(f"data root {data_root} is not a directory")
    fmt = detect_format(path) if fmt == "auto" else fmt
    source = storage.basename(path)
    if fmt == "conversation":
        return list(read_conversations(path, data_root, source))
    if fmt in BENCHMARK_CLASSES:
        return list(read_benchmark_csv(path, data_root, fmt, source))
    raise ValueError(f"unknown manifest format {fmt!r}; valid: auto, conversation, {', '.join(BENCHMARK_CLASSES)}")
