"""Evaluate one checkpoint on benchmark specs with the standard settings: the one code path behind
``emoqwen-eval``, ``emoqwen-forgetting`` and the trainer's per-stage evaluation (``stage_eval``)."""

from __future__ import annotations

import logging
from typing import Any, Callable

from emoqwen_jax.eval.emotion.benchmarks import EMER_MAX_NEW_TOKENS, EVAL_MAX_NEW_TOKENS
from emoqwen_jax.eval.general.benchmarks import GENERAL_MAX_NEW_TOKENS
from emoqwen_jax.eval.suites import registry as suites
from emoqwen_jax.eval.suites.report import write_report
from emoqwen_jax.runtime import storage

log = logging.getLogger(__name__)


def default_max_new_tokens(specs: list[dict]) -> int:
    """The generation budget the specs' benchmarks are scored with (EMER's long descriptions, short general
    answers, else the emotion default)."""
    kinds = {suites.kind_of(s) for s in specs}
    return (EMER_MAX_NEW_TOKENS if any(s["benchmark"] == "emer" for s in specs) else
            GENERAL_MAX_NEW_TOKENS if kinds == {"general"} else EVAL_MAX_NEW_TOKENS)


def evaluate(ckpt: str, specs: list[dict], out_dir: str, *, overrides: dict | None = None, suite: str = "",
             max_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             batch_size: int = 4, dtype: str | None = None, subdirs: bool | None = None, mesh: Any = None,
             warn: Callable[[str], None] | None = None) -> dict:
    """Runs ``specs`` with checkpoint ``ckpt``; writes report.json/.md in ``out_dir``; returns the report.

    ``overrides``: data settings on top of the standard ones (recorded in the report). A suite (``subdirs``
    defaults to ``bool(suite)``) puts each benchmark's files in ``out_dir/<name>/``; else they go in ``out_dir``.
    ``max_new_tokens`` 0: ``default_max_new_tokens(specs)``. ``mesh``: shard the parameters over it (see
    ``Session.from_checkpoint``; every process of a multi-host run calls this with the same arguments).
    ``warn``: where the pixel-range warning goes (``infer.session.pixel_range_warning``; default the log); it is
    also recorded in the report's settings."""
    from emoqwen_jax.infer.session import Session, pixel_range_warning  # noqa: PLC0415 — loads the model stack

    overrides = dict(overrides or {})
    session = Session.from_checkpoint(ckpt, {**suites.standard_data(), **overrides}, dtype=dtype, mesh=mesh)
    sampling = session.sampling(max_new_tokens or default_max_new_tokens(specs), temperature, top_p, top_k)
    settings = {"ckpt": storage.normalize(ckpt), "suite": suite, "overrides": overrides, "specs": specs}
    warning = pixel_range_warning(session)
    if warning:  # before the run starts: a new user's first eval should not silently score noise
        (warn or log.warning)(warning)
        settings["warnings"] = [warning]
    if mesh is not None:  # the weights were sharded over it (a multi-host run's stage eval)
        settings["mesh"] = {str(k): int(v) for k, v in mesh.shape.items()}
    report = suites.run_suite(session, specs, out_dir, sampling=sampling, batch_size=batch_size, seed=seed,
                              settings=settings, subdirs=bool(suite) if subdirs is None else subdirs)
    write_report(report, out_dir)
    return report
