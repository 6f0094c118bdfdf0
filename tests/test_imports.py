"""The import direction between packages , read from the source with ``ast`` (nothing runs).

  * ``model`` imports nothing from data, train, eval, convert, infer or cli;
  * ``data`` imports nothing from model, train, eval, convert, infer or cli;
  * ``layout`` (host-side index arrays, shared by data and model) imports only the shared top-level modules;
    ``runtime`` (paths and URIs, malloc settings; used everywhere) imports nothing else from the package;
  * nothing outside ``cli`` (bench and configs included) imports ``cli``;
  * ``train`` does not import ``eval``;
  * ``rl`` (the RL stage) may import data, model, train, infer and, from eval, only the answer parser and the
    benchmarks' label sets (``eval.parse``, ``eval.emotion.benchmarks``); inside the package only ``cli`` imports
    ``rl`` (``emoqwen-train`` hands its stage runner to the trainer), so train and eval never depend on it;
  * ``serve`` imports only infer, eval, data and model (and the shared layers: top-level modules, ``layout`` and
    ``runtime``); only ``cli`` imports ``serve``;
  * inside ``eval``: suites -> general -> emotion -> the shared parsers, never back;
  * no two modules import each other.
Every import counts, function-level ones included: a lazy import is still a dependency.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "emoqwen_jax"


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _sources(*tops: str) -> dict[str, str]:
    out = {}
    for top in tops:
        base = os.path.join(ROOT, top)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    out[_module_name(path)] = path
    return out


MODULES = _sources(PACKAGE)
OTHERS = _sources("bench", "configs")


def _imports(name: str, path: str) -> set[str]:
    """The project modules ``path`` imports (a name imported from a package resolves to its submodule)."""
    is_pkg = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = name.split(".")
                parts = parts if is_pkg else parts[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import a.b.c`` of a non-module attribute
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE):
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str:
    """The package a module belongs to: ``emoqwen_jax.model.text`` -> ``model``; top-level modules keep their name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(part: str, forbidden: set[str]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if _part(m) == part
                  for t in targets if _part(t) in forbidden)


def test_the_graph_is_read():
    assert "emoqwen_jax.model.emotion_qwen" in GRAPH
    assert "emoqwen_jax.inputs" in GRAPH["emoqwen_jax.layout.model_inputs"]
    assert "emoqwen_jax.model.config" in GRAPH["emoqwen_jax.model"]


def test_model_imports_no_pipeline_or_application_code():
    assert _violations("model", {"data", "train", "eval", "convert", "infer", "cli"}) == []


def test_data_imports_no_model_or_application_code():
    assert _violations("data", {"model", "train", "eval", "convert", "infer", "cli"}) == []


PACKAGES = {_part(m) for m in GRAPH if m.count(".") >= 2}  # top-level modules (inputs, tokens, ...) are not here
SHARED = {"layout", "runtime"}  # the shared layers under data and model


def test_layout_imports_only_the_shared_top_level_modules():
    assert _violations("layout", PACKAGES - {"layout"}) == []


def test_runtime_imports_nothing_else_from_the_package():
    assert {m for m in GRAPH if _part(m) == "runtime"} >= {"emoqwen_jax.runtime.storage", "emoqwen_jax.runtime.malloc"}
    assert sorted(f"{m} imports {t}" for m, ts in GRAPH.items() if _part(m) == "runtime" for t in ts
                  if _part(t) != "runtime") == []


def test_only_cli_imports_cli():
    inside = [f"{m} imports {t}" for m, ts in GRAPH.items() if _part(m) != "cli" for t in ts if _part(t) == "cli"]
    outside = [f"{m} imports {t}" for m, p in OTHERS.items() for t in _imports(m, p) if _part(t) == "cli"]
    assert sorted(inside + outside) == []


def test_train_does_not_import_eval():
    assert _violations("train", {"eval"}) == []


def test_serve_imports_only_what_it_serves_and_only_cli_imports_it():
    assert _violations("serve", PACKAGES - SHARED - {"serve", "infer", "eval", "data", "model"}) == []
    inside = [f"{m} imports {t}" for m, ts in GRAPH.items() if _part(m) not in ("cli", "serve") for t in ts
              if _part(t) == "serve"]
    outside = [f"{m} imports {t}" for m, p in OTHERS.items() for t in _imports(m, p) if _part(t) == "serve"]
    assert "emoqwen_jax.serve.app" in GRAPH and sorted(inside + outside) == []


def test_eval_parts_import_one_way():
    order = ["suites", "general", "emotion"]  # each may import the parts after it (and eval.parse/choice)

    def eval_part(module: str) -> str:
        parts = module.split(".")
        return parts[2] if len(parts) > 3 and parts[1] == "eval" else ""

    backwards = sorted(f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts
                       if eval_part(m) in order and eval_part(t) in order
                       and order.index(eval_part(t)) < order.index(eval_part(m)))
    assert {eval_part(m) for m in GRAPH} >= set(order)
    assert backwards == []


def test_no_two_modules_import_each_other():
    pairs = sorted({tuple(sorted((a, b))) for a, ts in GRAPH.items() for b in ts if a != b and a in GRAPH.get(b, ())})
    assert pairs == []


RL_MAY_IMPORT_FROM_EVAL = {"emoqwen_jax.eval.parse", "emoqwen_jax.eval.emotion.benchmarks"}


def test_rl_imports_only_the_parsers_from_eval_and_nothing_from_cli():
    assert _violations("rl", {"cli", "convert"}) == []
    from_eval = sorted(f"{m} imports {t}" for m, ts in GRAPH.items() if _part(m) == "rl" for t in ts
                       if _part(t) == "eval" and t not in RL_MAY_IMPORT_FROM_EVAL)
    assert from_eval == []


def test_only_cli_imports_rl():
    assert sorted(f"{m} imports {t}" for m, ts in GRAPH.items() if _part(m) not in ("cli", "rl")
                  for t in ts if _part(t) == "rl") == []
