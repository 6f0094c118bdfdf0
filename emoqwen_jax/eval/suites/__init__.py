"""Suites: many benchmarks with one checkpoint into one report (``registry``, ``report``), one checkpoint on a
list of specs (``evaluate``: emoqwen-eval, emoqwen-forgetting and the trainer's stage hook ``stage_eval``),
and the before/after forgetting table (``forgetting``). The top of the eval import order."""
