"""The general vision-language benchmarks: how each is read, prompted and scored, and one run of one of them
with a checkpoint (image questions -> predictions JSONL -> scores).

A benchmark SPEC (from the command line or a suite config) is a dict: ``{"benchmark": "pope", "root": DIR}``
(DIR and the output folder: local paths or URIs such as ``gs://bucket/POPE``)
plus the reader's optional keys (``image_root``, ``splits``, ``circular``, ``file``, ``split``, ...; see
``vl_data``), ``limit`` (score only the first N questions — a quick check, reported as such) and, for POPE,
``yes_no_rule``: 'strict' (default; unclear answers are invalid) or 'official' (POPE's own script: an answer
is "yes" unless its first sentence has the word no/No/not; see ``choice.parse_yes_no_official``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from emoqwen_jax.eval.choice import parse_yes_no_by
from emoqwen_jax.eval.emotion.benchmarks import read_predictions
from emoqwen_jax.eval.general import data as vl_data
from emoqwen_jax.eval.general import scores as vl_scores
from emoqwen_jax.eval.general.data import VLItem
from emoqwen_jax.runtime import storage

# Image settings of the general benchmarks, the same for every model: qwen-vl-utils' image pixel range (the
# Qwen2.5-VL processor defaults), no prompt-length cap. Videos keep the emotion benchmarks' settings.
GENERAL_EVAL_DATA = {"image_min_pixels": 4 * 28 * 28, "image_max_pixels": 16384 * 28 * 28, "max_length": 131072}
GENERAL_MAX_NEW_TOKENS = 16  # a letter, yes/no or a short phrase


@dataclasses.dataclass(frozen=True)
class GeneralBenchmark:
    name: str
    read: Callable[[dict, str], list[VLItem]]  # (spec, output dir) -> items
    score: Callable[..., dict]  # (items, predictions) -> metrics; POPE also takes the spec (its yes_no_rule)
    options: tuple[str, ...]  # spec keys the reader accepts besides benchmark/root/limit
    answer_format: str  # for the report: 'option letter' | 'yes/no' | 'open (VQA accuracy)'


def _root(spec: dict) -> str:
    if not spec.get("root"):
        raise ValueError(f"{spec.get('benchmark')}: give the benchmark's folder ('root' / --root)")
    return spec["root"]


def _kw(spec: dict, *keys: str) -> dict:
    """The reader keyword arguments among ``keys`` that the spec sets (JSON lists become tuples)."""
    given = [k for k in keys if spec.get(k) not in (None, "")]
    return {k: tuple(spec[k]) if isinstance(spec[k], list) else spec[k] for k in given}


GENERAL_BENCHMARKS: dict[str, GeneralBenchmark] = {b.name: b for b in (
    GeneralBenchmark("mmbench", lambda s, out: vl_data.read_mmbench(
        _root(s), storage.join(out, "images"), **_kw(s, "circular", "file")),
        lambda items, p: vl_scores.score_choice(items, p, by="category"), ("circular", "file"), "option letter"),
    GeneralBenchmark("mme", lambda s, out: vl_data.read_mme(_root(s)), vl_scores.score_mme, (), "yes/no"),
    GeneralBenchmark("pope", lambda s, out: vl_data.read_pope(_root(s), **_kw(s, "image_root", "splits")),
                     lambda items, p, spec: vl_scores.score_pope(items, p, spec.get("yes_no_rule") or "strict"),
                     ("image_root", "splits", "yes_no_rule"), "yes/no"),
    GeneralBenchmark("scienceqa", lambda s, out: vl_data.read_scienceqa(_root(s), **_kw(s, "split")),
                     lambda items, p: vl_scores.score_choice(items, p, by="subject"), ("split",), "option letter"),
    GeneralBenchmark("seedbench", lambda s, out: vl_data.read_seedbench(_root(s), **_kw(s, "file", "image_dir")),
                     lambda items, p: vl_scores.score_choice(items, p, by="question_type"), ("file", "image_dir"),
                     "option letter"),
    GeneralBenchmark("textvqa", lambda s, out: vl_data.read_textvqa(_root(s), **_kw(s, "file", "image_dir")),
                     lambda items, p: vl_scores.score_vqa(items, p, gt_rule="always"), ("file", "image_dir"),
                     "open (VQA accuracy)"),
    GeneralBenchmark("vqav2", lambda s, out: vl_data.read_vqav2(
        _root(s), **_kw(s, "questions", "annotations", "image_dir")),
        lambda items, p: vl_scores.score_vqa(items, p, gt_rule="official"), ("questions", "annotations", "image_dir"),
        "open (VQA accuracy)"),
)}


def get_general(name: str) -> GeneralBenchmark:
    if name not in GENERAL_BENCHMARKS:
        raise ValueError(f"unknown general benchmark {name!r}; valid: {', '.join(GENERAL_BENCHMARKS)}")
    return GENERAL_BENCHMARKS[name]


def check_spec(spec: dict) -> None:
    bench = get_general(spec.get("benchmark", ""))
    unknown = set(spec) - {"benchmark", "name", "root", "limit", *bench.options}
    if unknown:
        raise ValueError(f"{bench.name}: unknown spec keys {sorted(unknown)}; valid: "
                         f"{['benchmark', 'name', 'root', 'limit', *bench.options]}")
    if spec.get("yes_no_rule"):
        parse_yes_no_by(spec["yes_no_rule"])  # a bad rule fails before any question is asked


def limit_items(items: list[VLItem], limit: int) -> list[VLItem]:
    """The items of the first ``limit`` groups (an MME image's pair and MMBench's variants stay together)."""
    if not limit:
        return items
    keep = set(list(dict.fromkeys(it.group or it.id for it in items))[:int(limit)])
    return [it for it in items if (it.group or it.id) in keep]


def load_items(spec: dict, out_dir: str) -> list[VLItem]:
    check_spec(spec)
    items = limit_items(get_general(spec["benchmark"]).read(spec, out_dir), int(spec.get("limit") or 0))
    if not items:
        raise ValueError(f"{spec['benchmark']}: no questions under {spec.get('root')}")
    if all(not it.image for it in items):
        raise ValueError(f"{spec['benchmark']}: none of the {len(items)} questions' images was found under "
                         f"{spec.get('root')} (is the image folder right?)")
    return items


def score_predictions(spec: dict, items: Sequence[VLItem], predictions_path: str) -> dict:
    bench = get_general(spec["benchmark"])
    predictions = read_predictions(predictions_path)
    if bench.name == "pope":  # the one scorer with a setting of its own: how yes/no answers are read
        return bench.score(items, predictions, spec)
    return bench.score(items, predictions)


def run_general(session: Any, spec: dict, out_dir: str, *, sampling: Any, batch_size: int, seed: int = 0) -> dict:
    """Answers every question of one general benchmark (``out_dir/<name>.jsonl``) and scores it."""
    from emoqwen_jax.eval.emotion.runner import answer_requests

    name = spec.get("name") or spec["benchmark"]
    items = load_items(spec, out_dir)
    out_path = storage.join(out_dir, f"{name}.jsonl")
    requests = [(it.id, [("image", it.image or None)], it.question) for it in items]
    counts = answer_requests(session, requests, sampling, out_path, batch_size=batch_size, seed=seed, desc=name)
    result = score_predictions(spec, items, out_path)
    bench = get_general(spec["benchmark"])
    result.update(predictions=out_path, answer_format=bench.answer_format, example_prompt=items[0].question,
                  **counts)
    storage.write_json(storage.join(out_dir, f"{name}.score.json"), result, indent=2)
    return result
