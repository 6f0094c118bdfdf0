"""The benchmarks: label sets in their id order, label-file columns, prompts, the standard generation
settings, fold files, and the readers for label CSVs and prediction JSONL files.

Label ids: the class lists come from ``emoqwen_jax.data.manifests.BENCHMARK_CLASSES`` (the one place they
are written), where CSV id i (1-based) is class i − 1:
  DFEW  1 happy · 2 sad · 3 neutral · 4 angry · 5 surprise · 6 disgust · 7 fear   (official split CSVs)
  MAFW  1 anger · 2 disgust · 3 fear · 4 happiness · 5 neutral · 6 sadness · 7 surprise · 8 contempt ·
        9 anxiety · 10 helplessness · 11 disappointment   (MAFW's own single-label numbering)
  MER   label names (neutral, angry, happy, sad, worried, surprise) in ``discrete``; no ids.
Some re-distributed MAFW annotation files number the classes in DFEW's order instead (happiness, sadness,
neutral, anger, surprise, disgust, fear, contempt, …): a silent permutation of the classes. Class NAMES in
a label file are always read by name; for numeric ids in another order pass ``classes=`` (``--classes``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from typing import Sequence

from emoqwen_jax.data.manifests import BENCHMARK_CLASSES, BENCHMARK_COLUMNS, benchmark_prompt
from emoqwen_jax.runtime import storage

NUM_FOLDS = 5


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    data_format: str  # the key of the label set and CSV columns in emoqwen_jax.data.manifests
    headline: tuple[str, ...]  # the metrics the literature reports for it
    has_folds: bool

    @property
    def classes(self) -> tuple[str, ...]:
        return BENCHMARK_CLASSES[self.data_format]

    @property
    def columns(self) -> tuple[str, str]:
        """(id column, label column) of the benchmark's label CSV."""
        return BENCHMARK_COLUMNS[self.data_format]

    @property
    def prompt(self) -> str:
        """The user turn for every clip (the one training's benchmark manifests use)."""
        return benchmark_prompt(self.data_format)


BENCHMARKS = {
    "dfew": Benchmark("dfew", "dfew", ("uar", "war"), True),
    "mafw": Benchmark("mafw", "mafw", ("uar", "war"), True),
    "mer2023": Benchmark("mer2023", "mer", ("weighted_f1",), False),
    "mer2024": Benchmark("mer2024", "mer", ("weighted_f1",), False),
}

# Standard generation settings for every model on the classification benchmarks: greedy decoding, frames
# at 3 fps (the qwen-vl-utils eval rate, docs/design.md, Video sampling) and the default per-frame pixel budget of
# ``emoqwen_jax.data.defaults`` — never the checkpoint's own training settings, so models compare fairly.
# The prompt-length cap is lifted: a training cap (e.g. 2048) would reject long clips, which would then
# count as invalid answers for reasons that have nothing to do with the model.
EVAL_DATA = {"fps": 3.0, "min_frames": 4, "max_frames": 768, "video_min_pixels": 128 * 28 * 28,
             "video_max_pixels": 768 * 28 * 28, "video_total_pixels": int(128000 * 28 * 28 * 0.9),
             "max_length": 131072}
EVAL_MAX_NEW_TOKENS = 32  # a one-word answer (with an <answer> span or a short sentence) fits
EMER_MAX_NEW_TOKENS = 512  # reasoning descriptions


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def resolve_classes(benchmark: Benchmark, classes: Sequence[str] | None) -> tuple[str, ...]:
    """The class list in id order: the benchmark's, or a re-ordering of it (same names, other order)."""
    if not classes:
        return benchmark.classes
    classes = tuple(c.strip().lower() for c in classes)
    if sorted(classes) != sorted(benchmark.classes):
        raise ValueError(f"--classes {list(classes)} must be an ordering of {benchmark.name}'s classes "
                         f"{list(benchmark.classes)}")
    return classes


def _label_index(raw: str, classes: Sequence[str], where: str) -> int:
    value = raw.strip().lower()
    if value.isdigit() and 1 <= int(value) <= len(classes):
        return int(value) - 1
    if value in classes:
        return classes.index(value)
    raise ValueError(f"{where}: label {raw!r} is neither an id 1..{len(classes)} nor one of {list(classes)}")


def read_labels(path: str, benchmark: Benchmark, classes: Sequence[str] | None = None) -> dict[str, int]:
    """A benchmark label CSV -> {clip id: class index} in file order (ids as written, stripped)."""
    classes = resolve_classes(benchmark, classes)
    if not storage.isfile(path):
        raise FileNotFoundError(f"label file {path} does not exist")
    id_col, label_col = benchmark.columns
    with storage.open(path, "r", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or id_col not in reader.fieldnames or label_col not in reader.fieldnames:
            raise ValueError(f"{path}: a {benchmark.name} label file needs columns {id_col},{label_col}; "
                             f"its header is {reader.fieldnames}")
        labels: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            clip, raw = (row.get(id_col) or "").strip(), row.get(label_col)
            if not clip or raw is None or not raw.strip():
                raise ValueError(f"{path}:{line}: empty {id_col} or {label_col} in {row}")
            if clip in labels:
                raise ValueError(f"{path}:{line}: clip id {clip!r} appears twice")
            labels[clip] = _label_index(raw, classes, f"{path}:{line}")
    if not labels:
        raise ValueError(f"{path} has no labelled rows")
    return labels


def read_predictions(path: str) -> dict[str, str | None]:
    """A predictions JSONL (``{"id": …, "response": "…"}`` per line) -> {id: response or None}."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"predictions file {path} does not exist")
    out: dict[str, str | None] = {}
    with storage.open(path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{path}:{line_no}: expected an object with an 'id', got {line.strip()[:80]}")
            clip, response = str(row["id"]).strip(), row.get("response")
            if response is not None and not isinstance(response, str):
                raise ValueError(f"{path}:{line_no}: 'response' must be a string or null")
            if clip in out:
                raise ValueError(f"{path}:{line_no}: id {clip!r} appears twice")
            out[clip] = response
    return out


_FOLD_RE = re.compile(r"(set|fold)([_-]?)([1-9])", re.IGNORECASE)


def fold_paths(labels: str, num_folds: int = NUM_FOLDS) -> list[str]:
    """The label files of all folds from one of them: ``{fold}`` in the path is replaced by 1..5, else the
    last ``set_N``/``fold_N`` in the path (DFEW ``…/set_1.csv``, MAFW ``…/set_1/test.csv``) is."""
    if "{fold}" in labels:
        paths = [labels.replace("{fold}", str(k)) for k in range(1, num_folds + 1)]
    else:
        hits = list(_FOLD_RE.finditer(labels))
        if not hits:
            raise ValueError(f"--folds: cannot find the fold number in {labels!r}; name it like set_1.csv or "
                             f"put {{fold}} where the number goes")
        m = hits[-1]
        paths = [labels[:m.start()] + f"{m.group(1)}{m.group(2)}{k}" + labels[m.end():]
                 for k in range(1, num_folds + 1)]
    missing = [p for p in paths if not storage.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--folds: missing label files {missing}")
    return paths
