"""Evaluation runs: a label (or EMER reference) file + a video root -> answers for every clip in a
predictions JSONL (with a progress bar) -> scores.

Every labelled clip gets exactly one line, ``{"id", "response"}``; a clip whose video is missing or cannot
be decoded gets ``{"id", "response": null, "error": reason}`` and is scored as invalid — it is never dropped,
so a broken video counts against the model instead of silently shrinking the test set. A video root in
which not one clip is found is an error (a wrong path, not a broken clip).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
from tqdm import tqdm

from emoqwen_jax.data.manifests import VIDEO_EXTENSIONS, resolve_path
from emoqwen_jax.data.reasons import Rejected
from emoqwen_jax.eval.emotion import emer
from emoqwen_jax.eval.emotion.benchmarks import Benchmark, read_labels, read_predictions
from emoqwen_jax.eval.emotion.report import score_files
from emoqwen_jax.eval.emotion.scores import Scores
from emoqwen_jax.infer.engine import SamplingParams
from emoqwen_jax.infer.feed import complete_in_order
from emoqwen_jax.infer.generate import SamplingConfig
from emoqwen_jax.infer.session import Session
from emoqwen_jax.runtime import storage


def find_video(video_root: str, clip: str) -> str | None:
    """``video_root``/``clip`` (with its extension, or the first of VIDEO_EXTENSIONS that exists), or None."""
    try:
        if os.path.splitext(clip)[1].lower() in VIDEO_EXTENSIONS:
            path = resolve_path(video_root, clip)
            return path if storage.isfile(path) else None
        for ext in VIDEO_EXTENSIONS:
            path = resolve_path(video_root, clip + ext)
            if storage.isfile(path):
                return path
    except Rejected:  # a name that escapes the root
        return None
    return None


def locate(clips: Sequence[str], video_root: str) -> dict[str, str | None]:
    """{clip: path or None}; ValueError when the root has none of them."""
    if not storage.isdir(video_root):
        raise FileNotFoundError(f"--video_root {video_root} is not a directory")
    paths = {clip: find_video(video_root, clip) for clip in clips}
    if clips and not any(paths.values()):
        tried = storage.join(video_root, clips[0])
        raise ValueError(f"none of the {len(clips)} clips was found under {video_root} (e.g. {tried}"
                         f"{{{','.join(VIDEO_EXTENSIONS)}}}); is --video_root right?")
    return paths


Request = tuple[str, Sequence[tuple[str, "str | None"]], str]  # (id, [(kind, path or None)], user text)


def answer_requests(session: Session, requests: Sequence[Request], sampling: SamplingConfig, out_path: str, *,
                    batch_size: int, seed: int = 0, desc: str = "items") -> dict[str, int]:
    """Writes one JSON line per request (in order): ``{"id", "response"}``, or ``"response": null`` with the
    ``error`` reason when a medium is missing (path None) or cannot be processed; returns
    {'answered', 'failed'} counts.

    The requests run on the generation engine (``emoqwen_jax.infer.feed``): ``batch_size`` decode slots, each
    refilled as soon as its answer ends, prompts built by a thread pool meanwhile. Request i samples with
    seed ``seed + i`` (greedy by default), so an answer does not depend on the batching."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if jax.process_count() > 1:  # every process must make the same device calls: static batches
        return _answer_in_batches(session, requests, sampling, out_path, batch_size=batch_size, seed=seed, desc=desc)
    counts = {"answered": 0, "failed": 0}
    jobs = [(text, [(k, p) for k, p in media if p is not None] if all(p is not None for _, p in media) else None,
             None) for _, media, text in requests]
    ready = [i for i, (_, media, _) in enumerate(jobs) if media is not None]
    params = lambda i: SamplingParams(  # noqa: E731
        max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, seed=seed + ready[i])
    answers = complete_in_order(session, [jobs[i] for i in ready], params, max_batch=batch_size)
    with storage.open(out_path, "w", encoding="utf-8") as f, tqdm(total=len(requests), desc=desc, unit="item") as bar:
        for i, (key, _, _) in enumerate(requests):
            row = {"id": key, "response": None}
            if jobs[i][1] is None:
                row["error"] = "missing_file"
            else:
                _, done = next(answers)
                if isinstance(done, Rejected):
                    row["error"] = done.reason
                elif isinstance(done, Exception):
                    raise done
                elif done.finish_reason == "error":
                    raise RuntimeError(f"generation failed for {key}: {done.error}")
                else:
                    row["response"] = done.text
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["failed" if row["response"] is None else "answered"] += 1
            f.flush()
            bar.update(1)
    return counts


def _answer_in_batches(session: Session, requests: Sequence[Request], sampling: SamplingConfig, out_path: str, *,
                       batch_size: int, seed: int, desc: str) -> dict[str, int]:
    """``answer_requests`` in static batches through ``Session.answer`` (a multi-process run, where every process
    must issue the same device calls)."""
    counts = {"answered": 0, "failed": 0}
    with storage.open(out_path, "w", encoding="utf-8") as f, tqdm(total=len(requests), desc=desc, unit="item") as bar:
        for start in range(0, len(requests), batch_size):
            rows, ready = [], []  # ready: (row index, prompt) of the requests that processed
            for key, media, text in requests[start:start + batch_size]:
                try:
                    if any(path is None for _, path in media):
                        raise Rejected("missing_file", key)
                    ready.append((len(rows), session.prompt(text, list(media))))
                    rows.append({"id": key, "response": None})
                except Rejected as err:
                    rows.append({"id": key, "response": None, "error": err.reason})
            if ready:
                answers = session.answer([p for _, p in ready], sampling, seed=seed + start)
                for (i, _), answer in zip(ready, answers, strict=True):
                    rows[i]["response"] = answer
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["failed" if row["response"] is None else "answered"] += 1
            f.flush()
            bar.update(len(rows))
    return counts


def answer_clips(session: Session, paths: dict[str, str | None], prompt: str, sampling: SamplingConfig,
                 out_path: str, *, batch_size: int, seed: int = 0, desc: str = "clips") -> dict[str, int]:
    """Writes one JSON line per clip (in ``paths`` order) answering ``prompt``; see ``answer_requests``."""
    requests = [(clip, [("video", path)], prompt) for clip, path in paths.items()]
    return answer_requests(session, requests, sampling, out_path, batch_size=batch_size, seed=seed, desc=desc)


def run_benchmark(session: Session, benchmark: Benchmark, labels_path: str, video_root: str, out_path: str, *,
                  sampling: SamplingConfig, batch_size: int, classes: Sequence[str] | None = None,
                  seed: int = 0) -> tuple[Scores, dict]:
    """Answers every clip of one label file with the benchmark prompt, then scores the answers."""
    labels = read_labels(labels_path, benchmark, classes)
    paths = locate(list(labels), video_root)
    counts = answer_clips(session, paths, benchmark.prompt, sampling, out_path, batch_size=batch_size, seed=seed,
                          desc=f"{benchmark.name} {os.path.basename(labels_path)}")
    scores, written = score_files(benchmark, out_path, labels_path, classes)
    return scores, {"predictions": out_path, **written, **counts}


def run_emer(session: Session, references_path: str, video_root: str, out_path: str, *, sampling: SamplingConfig,
             batch_size: int, text_column: str | None = None, seed: int = 0) -> dict:
    """Writes reasoning descriptions for every EMER clip, scores them by word overlap, and writes the
    LLM-judge requests beside the predictions (``P.judge_requests.jsonl``)."""
    references = emer.read_references(references_path, text_column)
    paths = locate(list(references), video_root)
    counts = answer_clips(session, paths, emer.REASONING_PROMPT, sampling, out_path, batch_size=batch_size,
                          seed=seed, desc="emer")
    predictions = read_predictions(out_path)
    requests = emer.judge_requests(predictions, references, os.path.splitext(out_path)[0] + ".judge_requests.jsonl")
    return {**emer.score_emer(predictions, references), "predictions": out_path, "judge_requests": requests,
            **counts}
