"""The suite report: one JSON file with the settings and every benchmark's metrics, and the same as a Markdown
table, plus the reader ``emoqwen-forgetting`` uses.

report.json::

    {"format": "emoqwen_jax.eval.emotion.report", "version": 1,
     "settings": {"ckpt", "suite", "data": {fps, pixel budgets, …}, "sampling": {…}, "prompts": {bench: …},
                  "overrides": {…}},
     "benchmarks": {name: {"kind": "general"|"emotion", "benchmark", "headline", "n", "invalid_rate",
                           <metrics, nested per split / subtask / fold>, "predictions", …}}}

Metrics are fractions in [0, 1] except MME's points (acc, acc+ in percent; perception max 2000, cognition
max 800 with every subtask present).
"""

from __future__ import annotations

import json
from typing import Any

from emoqwen_jax.eval.general.data import load_json
from emoqwen_jax.runtime import storage

REPORT_FORMAT = "emoqwen_jax.eval.emotion.report"
# Keys of a benchmark result that are bookkeeping, not metrics.
_NOT_METRICS = frozenset({"n", "num_answers", "answered", "failed", "missing", "images", "tp", "fp", "tn", "fn",
                          "perception_max", "cognition_max", "no_reference_emotion"})


def flatten_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric metric of a benchmark result, nested keys joined by '.' (counts and paths left out)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in _NOT_METRICS or key == "folds":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def headline_value(result: dict) -> tuple[str, float, float]:
    """(metric name, value, maximum) of the benchmark's headline metric."""
    name = result["headline"]
    return name, float(result[name]), float(result.get(f"{name}_max", 1.0))


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Evaluation report: {s.get('ckpt', '')}", "",
             "| benchmark | metric | value | n | invalid rate |", "| --- | --- | --- | --- | --- |"]
    for name, result in report["benchmarks"].items():
        head = result["headline"]
        metrics = {k: v for k, v in flatten_metrics(result).items() if k != "invalid_rate"}  # it has a column
        for key in [head] + sorted(k for k in metrics if k != head):
            label = f"**{key}**" if key == head else key
            lines.append(f"| {name} | {label} | {_fmt(metrics[key])} | {result.get('n', '')} | "
                         f"{_fmt(result.get('invalid_rate', 0.0))} |")
    lines += ["", "Headline metrics in bold; fractions in [0, 1] except MME (points: acc and acc+ in percent, "
              "score = acc + acc+ per subtask, perception and cognition sums). Invalid answers count as wrong.",
              "", "## Settings", ""]
    data = s.get("data", {})
    lines += [f"- {k}: `{json.dumps(v)}`" for k, v in data.items()]
    lines += [f"- {name}: yes/no answers read by the {r['yes_no_rule']} rule" + (
        " (POPE's official script: yes unless the first sentence has no/not)" if r["yes_no_rule"] == "official" else
        " (only a clear yes or no counts; anything else is invalid)")
        for name, r in report["benchmarks"].items() if r.get("yes_no_rule")]
    lines += [f"- decoding: `{json.dumps(s.get('sampling', {}))}`",
              f"- overrides of the standard settings: `{json.dumps(s.get('overrides', {}))}`", "", "## Prompts", ""]
    lines += [f"- {name}: `{json.dumps(p)}`" for name, p in s.get("prompts", {}).items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str, stem: str = "report") -> tuple[str, str]:
    """Writes ``out_dir/report.json`` and ``out_dir/report.md``; returns their paths."""
    storage.makedirs(out_dir)
    report = {"format": REPORT_FORMAT, "version": 1, **report}
    json_path, md_path = storage.join(out_dir, f"{stem}.json"), storage.join(out_dir, f"{stem}.md")
    storage.write_json(json_path, report, indent=2)
    storage.write_text(md_path, markdown(report))
    return json_path, md_path


def read_report(path: str) -> dict[str, Any]:
    """A report.json (or the folder holding one)."""
    if storage.isdir(path):
        path = storage.join(path, "report.json")
    report = load_json(path, "report")
    if report.get("format") != REPORT_FORMAT or "benchmarks" not in report:
        raise ValueError(f"{path} is not an emoqwen-eval report (format {report.get('format')!r})")
    return report
