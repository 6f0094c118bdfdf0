"""A small benchmark suite at the end of a training stage, logged beside the training metrics.

``config.stages.<name>.eval_suite`` says what runs (empty or absent: nothing):
  * a suite config path, optionally with the list to run: ``"eval/suite.json"`` (all lists) or
    ``"eval/suite.json:general"``;
  * or benchmark specs (the suite-config form, paths absolute or relative to the working directory): a
    tuple of dicts in a Python config, or the same as a JSON string, which a string field can take from the
    command line: ``--config.stages.stage3_video.eval_suite='[{"benchmark": "pope", "root": "/data/POPE",
    "limit": 100}]'``.
Declare the field as a string (``s.eval_suite = ""``): ConfigDict refuses to change a field's type.
``{demo}`` in a spec's paths is the run's demo set (``workdir/demo_data``; the demo preset scores its held-out
clips, ``{demo}/eval_dfew.csv``, this way).
``config.stages.<name>.eval_set`` (optional dict) overrides data settings on top of the suite's ``set``.

The stage's saved weights are answered with emoqwen-eval's standard settings; the report goes to
``workdir/eval/<stage>/report.json`` and ``report.md``, and one row goes to ``metrics.jsonl`` with
``stage = "<stage>/eval"`` (kept apart from the stage's loss rows, which the loss plots read),
``global_step``, and ``<benchmark>/<metric>`` for every metric — TensorBoard shows them as
``<stage>/eval/<benchmark>/<metric>``. In a multi-host run every process evaluates (the weights sharded over
the run's mesh, as in training) and process 0 writes; see ``run_stage_eval``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from typing import Any, Iterator

from emoqwen_jax.data.demo import DEMO_PLACEHOLDER, build_demo, demo_root, fill_demo
from emoqwen_jax.eval.suites.report import flatten_metrics
from emoqwen_jax.runtime import storage


def resolve_eval_suite(eval_suite: Any) -> tuple[list[dict], dict]:
    """``eval_suite`` (a path[:suite] string or a sequence of specs) -> (specs, data overrides)."""
    from emoqwen_jax.eval.suites import registry as suites

    if not eval_suite:
        return [], {}
    if isinstance(eval_suite, str) and eval_suite.lstrip()[:1] in ("[", "{"):
        try:
            eval_suite = json.loads(eval_suite)
        except json.JSONDecodeError as e:
            raise ValueError(f"eval_suite is not valid JSON ({e}): {eval_suite[:80]}") from None
        eval_suite = [eval_suite] if isinstance(eval_suite, dict) else eval_suite
    if isinstance(eval_suite, str):
        path, suite = _suite_and_list(eval_suite)
        return suites.load_suite(path, suite or "all")
    specs = [dict(s) for s in eval_suite]
    suites.check_specs(specs)
    return specs, {}


def _suite_and_list(eval_suite: str) -> tuple[str, str]:
    """``"path[:list]"`` -> (path, list); the path may be a URI (``gs://b/suite.json:general``)."""
    if storage.isfile(eval_suite):
        return eval_suite, ""
    path, sep, suite = eval_suite.rpartition(":")
    return (path, suite) if sep and "/" not in suite else (eval_suite, "")


@contextlib.contextmanager
def _report_dir(out_dir: str) -> Iterator[str]:
    """``out_dir`` on process 0; a temporary folder, deleted afterwards, on the others (same answers: one
    writer)."""
    import jax

    if jax.process_index() == 0:
        yield out_dir
        return
    with tempfile.TemporaryDirectory(prefix="stage_eval_") as tmp:
        yield tmp


def stage_row(stage_name: str, global_step: int, report: dict) -> dict:
    """The metrics.jsonl row of a stage's eval report."""
    row: dict[str, Any] = {"stage": f"{stage_name}/eval", "global_step": int(global_step)}
    for bench, result in report["benchmarks"].items():
        for key, value in flatten_metrics(result).items():
            row[f"{bench}/{key}"] = value
        row[f"{bench}/n"] = result.get("n", 0)
    return row


def run_stage_eval(config: Any, stage_name: str, model_dir: str, workdir: str, writer: Any) -> dict:
    """Runs ``config.stages[stage_name].eval_suite`` on the weights in ``model_dir``; logs one row to
    ``writer`` (a ``train.metrics.MetricsWriter``; only process 0 writes) and returns the report ({} when no
    suite is configured).

    With several processes every one of them calls this (the trainer does) and answers the same questions:
    the weights are restored onto the run's mesh (``config.mesh``), sharded across the hosts as in training,
    so no host ever holds the whole model; process 0 writes the report, the others answer into a temporary
    folder that is then deleted."""
    import jax

    from emoqwen_jax.eval.emotion.benchmarks import EVAL_MAX_NEW_TOKENS
    from emoqwen_jax.eval.suites.evaluate import evaluate
    from emoqwen_jax.model_dir import read_model_config

    stage = config.stages[stage_name]
    specs, suite_sets = resolve_eval_suite(stage.get("eval_suite", ()))
    if not specs:
        return {}
    if DEMO_PLACEHOLDER in json.dumps(specs):  # the demo set's held-out clips (the demo preset's final eval)
        from emoqwen_jax.parallel import hosts

        root = demo_root(workdir)  # a remote workdir: a local folder on every host
        if (storage.is_uri(workdir) or jax.process_index() == 0) and not storage.isfile(
                storage.join(root, "eval_dfew.csv")):
            build_demo(root)
        hosts.barrier("stage_eval_demo")  # the others read it only once it is there
        specs = fill_demo(specs, root)
    mesh = None
    if jax.process_count() > 1:  # parameters span the hosts' devices: restore them sharded, as training held them
        from emoqwen_jax.parallel.mesh import make_mesh

        mesh = make_mesh(config.mesh)
    eval_set = stage.get("eval_set", None)
    overrides = {**suite_sets, **(eval_set.to_dict() if eval_set is not None else {})}
    _, meta = read_model_config(model_dir)
    with _report_dir(storage.join(workdir, "eval", stage_name)) as out_dir:
        report = evaluate(model_dir, specs, out_dir, overrides=overrides, suite=f"stage {stage_name}",
                          max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=int(stage.get("eval_batch_size", 4)),
                          mesh=mesh)
    global_step = int(meta.get("global_step", 0))
    writer.write(stage_row(stage_name, global_step, report))
    return report
