"""Forgetting report: the same suite before and after training, per benchmark before / after / delta, and a
bar chart.

The comparison uses each benchmark's headline metric (MMBench circular accuracy, MME perception, POPE mean
F1, ScienceQA / SEED-Bench accuracy, TextVQA / VQAv2 VQA accuracy, DFEW/MAFW UAR, MER weighted F1, EMER
word-overlap F1) and, with ``all_metrics``, every metric both reports share. Delta = after − before in the
metric's own units; the chart shows the headline metrics as a percentage of their maximum (MME: of
200 × subtasks) so that all benchmarks share one axis. Only benchmarks present in both reports are compared;
the others are listed as unmatched. Reports made with different settings (frames, pixels, prompts,
decoding) are flagged: their deltas mix the model change with the settings change.
"""

from __future__ import annotations

from emoqwen_jax.eval.suites.report import flatten_metrics, headline_value
from emoqwen_jax.runtime import storage

_COMPARED_SETTINGS = ("data", "sampling", "prompts", "overrides")


def compare(before: dict, after: dict, *, all_metrics: bool = False) -> dict:
    """Two reports -> {"rows": [{benchmark, metric, headline, before, after, delta, max}], "unmatched",
    "settings_differ"}."""
    rows, unmatched = [], []
    names = list(dict.fromkeys([*before["benchmarks"], *after["benchmarks"]]))
    for name in names:
        b, a = before["benchmarks"].get(name), after["benchmarks"].get(name)
        if b is None or a is None:
            unmatched.append(name)
            continue
        head, vb, top = headline_value(b)
        _, va, _ = headline_value(a)
        rows.append({"benchmark": name, "metric": head, "headline": True, "before": vb, "after": va,
                     "delta": round(va - vb, 6), "max": top, "n_before": b.get("n"), "n_after": a.get("n"),
                     "invalid_before": b.get("invalid_rate"), "invalid_after": a.get("invalid_rate")})
        if all_metrics:
            fb, fa = flatten_metrics(b), flatten_metrics(a)
            for key in sorted(set(fb) & set(fa) - {head}):
                rows.append({"benchmark": name, "metric": key, "headline": False, "before": fb[key],
                             "after": fa[key], "delta": round(fa[key] - fb[key], 6)})
    sb, sa = before.get("settings", {}), after.get("settings", {})
    differ = [k for k in _COMPARED_SETTINGS if sb.get(k) != sa.get(k)]
    return {"before": sb.get("ckpt", ""), "after": sa.get("ckpt", ""), "rows": rows, "unmatched": unmatched,
            "settings_differ": differ}


def table(result: dict) -> str:
    """A Markdown table of the comparison."""
    lines = [f"before: {result['before']}", f"after:  {result['after']}", "",
             "| benchmark | metric | before | after | delta |", "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        metric = f"**{r['metric']}**" if r["headline"] else r["metric"]
        lines.append(f"| {r['benchmark']} | {metric} | {r['before']:.4f} | {r['after']:.4f} | {r['delta']:+.4f} |")
    if result["unmatched"]:
        lines.append(f"\nin one report only (not compared): {', '.join(result['unmatched'])}")
    if result["settings_differ"]:
        lines.append(f"\nWARNING: the reports differ in {', '.join(result['settings_differ'])}; deltas mix the "
                     f"model change with the settings change")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str:
    """Grouped bars (before, after) of each benchmark's headline metric in % of its maximum, deltas on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result["rows"] if r["headline"]]
    if not rows:
        raise ValueError("the two reports share no benchmark; nothing to plot")
    x = np.arange(len(rows))
    before = [100 * r["before"] / r["max"] for r in rows]
    after = [100 * r["after"] / r["max"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(rows), 4.0))
    ax.bar(x - 0.2, before, 0.4, label="before", color="#8fa8c8")
    ax.bar(x + 0.2, after, 0.4, label="after", color="#d9822b")
    for i, r in enumerate(rows):
        ax.text(x[i], max(before[i], after[i]) + 1.5, f"{100 * r['delta'] / r['max']:+.1f}", ha="center", fontsize=8)
    ax.set_xticks(x, [f"{r['benchmark']}\n{r['metric']}" for r in rows], fontsize=8)
    ax.set_ylabel("% of the metric's maximum")
    ax.set_ylim(0, 110)
    ax.set_title("Forgetting: headline metrics before and after (labels: delta in points)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with storage.open(path, "wb") as f:  # a local path or a URI (makes the folder)
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def write(result: dict, out_dir: str) -> dict[str, str]:
    """``forgetting.json``, ``forgetting.md`` and ``forgetting.png`` in ``out_dir``."""
    storage.makedirs(out_dir)
    paths = {"json": storage.join(out_dir, "forgetting.json"), "markdown": storage.join(out_dir, "forgetting.md"),
             "chart": storage.join(out_dir, "forgetting.png")}
    storage.write_json(paths["json"], result, indent=2)
    storage.write_text(paths["markdown"], table(result))
    plot(result, paths["chart"])
    return paths
