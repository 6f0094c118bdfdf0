"""Benchmark suites: a list of benchmarks from one config, run with one checkpoint into one report.

A suite config is a JSON file (paths relative to the file's folder)::

    {"set": {"image_max_pixels": 200704},                     # optional: overrides for every benchmark
     "general": [{"benchmark": "mmbench", "root": "MMBench", "circular": true},
                 {"benchmark": "mme", "root": "MME_Benchmark_release_version"},
                 {"benchmark": "pope", "root": "POPE", "image_root": "coco/val2014"}, …],
     "emotion": [{"benchmark": "dfew", "labels": "DFEW/set_1.csv", "video_root": "DFEW/clips", "folds": true},
                 {"benchmark": "emer", "labels": "EMER/descriptions.csv", "video_root": "MER2023/test3"}]}

``--suite general|emotion|all`` picks the lists (all = both). Every spec may set ``name`` (its report key and
output folder, default the benchmark) and ``limit`` (the first N questions). ``emoqwen_jax.eval.general.benchmarks``
documents the general specs; emotion specs take ``labels``, ``video_root``, ``folds``, ``classes``,
``text_column`` (the emoqwen-eval flags).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

from emoqwen_jax.eval.emotion import benchmarks
from emoqwen_jax.eval.emotion.emer import REASONING_PROMPT
from emoqwen_jax.eval.general import benchmarks as general
from emoqwen_jax.eval.general.data import MC_INSTRUCTION, SHORT_ANSWER, load_json
from emoqwen_jax.runtime import storage

SUITES = ("general", "emotion", "all")
EMOTION_BENCHMARKS = (*benchmarks.BENCHMARKS, "emer")
_PATH_KEYS = ("root", "image_root", "labels", "video_root")
_EMOTION_KEYS = ("benchmark", "name", "labels", "video_root", "folds", "classes", "text_column", "limit")
# Settings every report records (the data settings that change what a model sees).
REPORTED_DATA = ("fps", "min_frames", "max_frames", "video_min_pixels", "video_max_pixels", "video_total_pixels",
                 "image_min_pixels", "image_max_pixels", "max_length", "system_prompt", "faces",
                 "tokenizer_vocab_size")


def kind_of(spec: dict) -> str:
    name = spec.get("benchmark", "")
    if name in general.GENERAL_BENCHMARKS:
        return "general"
    if name in EMOTION_BENCHMARKS:
        return "emotion"
    valid = ", ".join([*general.GENERAL_BENCHMARKS, *EMOTION_BENCHMARKS])
    raise ValueError(f"unknown benchmark {name!r}; valid: {valid}")


def check_specs(specs: Sequence[dict]) -> None:
    names = []
    for spec in specs:
        if kind_of(spec) == "general":
            general.check_spec(spec)
        else:
            unknown = set(spec) - set(_EMOTION_KEYS)
            if unknown:
                raise ValueError(f"{spec['benchmark']}: unknown spec keys {sorted(unknown)}; "
                                 f"valid: {list(_EMOTION_KEYS)}")
            if not spec.get("labels") or not spec.get("video_root"):
                raise ValueError(f"{spec['benchmark']}: an emotion spec needs 'labels' and 'video_root'")
        names.append(spec.get("name") or spec["benchmark"])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"benchmarks {dup} appear twice in the suite; give them distinct 'name's")


def load_suite(path: str, suite: str) -> tuple[list[dict], dict]:
    """A suite config file -> (the specs of ``suite`` with absolute paths, the suite's data overrides)."""
    if suite not in SUITES:
        raise ValueError(f"--suite {suite!r}; valid: {SUITES}")
    blob = load_json(path, "suite config")
    unknown = set(blob) - {"set", "general", "emotion"}
    if unknown:
        raise ValueError(f"suite config {path}: unknown keys {sorted(unknown)}; valid: set, general, emotion")
    base = storage.dirname(path)
    lists = ("general", "emotion") if suite == "all" else (suite,)
    specs = []
    for key in lists:
        for spec in blob.get(key, []):
            spec = dict(spec)
            for k in _PATH_KEYS:
                if spec.get(k):
                    spec[k] = storage.resolve(base, spec[k])
            specs.append(spec)
    if not specs:
        raise ValueError(f"suite config {path} lists no {' or '.join(lists)} benchmarks")
    check_specs(specs)
    return specs, dict(blob.get("set", {}))


def standard_data() -> dict:
    """The standard settings, the same for every model (videos: ``benchmarks.EVAL_DATA``; images:
    ``general.GENERAL_EVAL_DATA``)."""
    return {**benchmarks.EVAL_DATA, **general.GENERAL_EVAL_DATA}


def prompt_of(spec: dict) -> str:
    name = spec["benchmark"]
    if name == "emer":
        return REASONING_PROMPT
    if name in benchmarks.BENCHMARKS:
        return benchmarks.get_benchmark(name).prompt
    if general.get_general(name).answer_format == "option letter":
        return f"[context]\n<question>\nA. …\nB. …\n{MC_INSTRUCTION}"
    return f"<question>\n{SHORT_ANSWER}"


def run_emotion(session: Any, spec: dict, out_dir: str, *, sampling: Any, batch_size: int, seed: int = 0,
                verbose: bool = True) -> dict:
    """One emotion benchmark (one label file, all folds, or EMER) -> its result with a headline."""
    from emoqwen_jax.eval.emotion import runner
    from emoqwen_jax.eval.emotion.scores import mean_scores

    name = spec["benchmark"]
    folds = bool(spec.get("folds"))
    if name == "emer":
        if folds:
            raise ValueError("--folds: emer has no folds")
        out = storage.join(out_dir, os.path.splitext(storage.basename(spec["labels"]))[0] + ".jsonl")
        summary = runner.run_emer(session, spec["labels"], spec["video_root"], out, sampling=sampling,
                                  batch_size=batch_size, seed=seed, text_column=spec.get("text_column") or None)
        result = {k: summary[k] for k in ("n", "precision", "recall", "f1", "missing", "no_reference_emotion")}
        clips = max(1, summary["n"] + summary["no_reference_emotion"])
        return {**result, "headline": "f1", "invalid_rate": round(summary["missing"] / clips, 6),
                "files": [{k: summary[k] for k in ("predictions", "judge_requests", "answered", "failed")}]}
    bench = benchmarks.get_benchmark(name)
    if folds and not bench.has_folds:
        raise ValueError(f"--folds: {name} has no folds")
    label_files = benchmarks.fold_paths(spec["labels"]) if folds else [spec["labels"]]
    for path in label_files:
        if not storage.isfile(path):
            raise FileNotFoundError(f"--labels {path} does not exist")
    classes = spec.get("classes") or None
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c.strip()] or None
    scores, files = [], []
    for k, labels in enumerate(label_files, start=1):
        stem = f"fold{k}" if folds else os.path.splitext(storage.basename(labels))[0]
        s, written = runner.run_benchmark(session, bench, labels, spec["video_root"],
                                          storage.join(out_dir, stem + ".jsonl"), sampling=sampling,
                                          batch_size=batch_size, classes=classes, seed=seed)
        if verbose:
            print(f"{stem}: {json.dumps(s.summary())}", file=sys.stderr)
        scores.append(s)
        files.append(written)
    result = mean_scores(scores) if folds else scores[0].summary()
    return {**result, "headline": bench.headline[0], "files": files}


def run_spec(session: Any, spec: dict, out_dir: str, *, sampling: Any, batch_size: int, seed: int = 0) -> dict:
    """One benchmark of any kind into ``out_dir`` -> its result (``kind`` and ``benchmark`` added)."""
    kind = kind_of(spec)
    if kind == "general":
        result = general.run_general(session, spec, out_dir, sampling=sampling, batch_size=batch_size, seed=seed)
    else:
        result = run_emotion(session, spec, out_dir, sampling=sampling, batch_size=batch_size, seed=seed)
    return {"kind": kind, "benchmark": spec["benchmark"], **({"limit": spec["limit"]} if spec.get("limit") else {}),
            **result}


def run_suite(session: Any, specs: Sequence[dict], out_dir: str, *, sampling: Any, batch_size: int, seed: int = 0,
              settings: dict | None = None, subdirs: bool = True) -> dict:
    """Every benchmark of ``specs`` (each in ``out_dir/<name>/``, or in ``out_dir`` itself without ``subdirs``)
    -> the report dict (not yet written)."""
    check_specs(specs)
    results = {}
    for spec in specs:
        name = spec.get("name") or spec["benchmark"]
        spec = copy.deepcopy(spec)
        if kind_of(spec) == "emotion" and spec.get("limit"):
            raise ValueError(f"{name}: 'limit' applies to general benchmarks; shorten the label file instead")
        where = storage.join(out_dir, name) if subdirs else out_dir
        results[name] = run_spec(session, spec, where, sampling=sampling, batch_size=batch_size, seed=seed)
    report_settings = {
        **(settings or {}), "data": {k: session.data[k] for k in REPORTED_DATA if k in session.data},
        "sampling": dataclasses.asdict(sampling),
        "prompts": {spec.get("name") or spec["benchmark"]: prompt_of(spec) for spec in specs}}
    return {"settings": report_settings, "benchmarks": results}
