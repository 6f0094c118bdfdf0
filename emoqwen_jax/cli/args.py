"""Command-line plumbing shared by every ``emoqwen-*`` command (argparse).

  * run configs: ``--config=FILE[:ARG]`` (``get_config(ARG)`` of a Python file, as ml_collections'
    ``config_flags`` loads it) and ``--config.a.b=VALUE`` / ``--config.a.b VALUE`` overrides, each value parsed
    by the type of the field it replaces (``parse_config_args``);
  * data overrides (``--set key=value``), the generation options, and the error contract of describe, eval and
    score (bad input -> message, exit 2).
"""

from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.util
import json
import re
import sys
from typing import Any, Callable

import ml_collections

from emoqwen_jax.data.defaults import parse_overrides

# ---- run configs: --config=FILE[:ARG] and --config.a.b=VALUE ------------------------------------------------


def add_config_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--config", default=default, metavar="FILE[:ARG]",
                        help="run config: FILE's get_config(ARG) (default %(default)s); override any field with "
                             "--config.a.b=VALUE (parsed as the field's type: bool, int, float, str, tuple; a "
                             "Python literal where the field is None, a dict or a list)")


def parse_config_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses ``argv`` (default ``sys.argv[1:]``): the config named by ``--config`` is loaded, the
    ``--config.*`` overrides are taken out and applied in order, the rest goes to ``parser``; ``args.config`` is
    the resulting ConfigDict. A bad file, an unknown field or a value the field's type rejects is a usage error
    (exit 2). ``--help`` loads nothing."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(["--help"])
    try:
        config = load_config(_config_spec(argv, parser.get_default("config")))
        rest, overrides = split_config_overrides(argv, lambda key: isinstance(_field(config, key), bool))
        for key, raw in overrides:
            apply_override(config, key, raw)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        parser.error(err.args[0] if isinstance(err, KeyError) else str(err))  # KeyError's str() adds quotes
    args = parser.parse_args(rest)
    args.config = config
    return args


def _config_spec(argv: list[str], default: str) -> str:
    """The last ``--config=SPEC`` / ``--config SPEC`` before any ``--``, else ``default``."""
    spec = default
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("--config="):
            spec = arg.partition("=")[2]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _field(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value at dotted ``key``, or None where there is no such field."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


_OVERRIDE = re.compile(r"--(no)?config\.([A-Za-z_][\w.]*)(=.*)?$", re.DOTALL)


def split_config_overrides(argv: list[str], is_bool: Callable[[str], bool] = lambda key: False
                           ) -> tuple[list[str], list[tuple[str, str | None]]]:
    """(the other arguments, ``[(dotted key, raw value or None), …]``), as absl spells flags: ``--config.k=V``;
    ``--config.k V`` unless the field is a bool (``is_bool(key)``); a bare ``--config.k`` (None: True for a
    bool field) and ``--noconfig.k`` (False). Everything after ``--`` is left alone."""
    rest: list[str] = []
    overrides: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        match = _OVERRIDE.match(arg)
        i += 1
        if match is None:
            rest.append(arg)
            continue
        negated, key, value = match.groups()
        if negated:
            overrides.append((key, "False"))
        elif value is not None:
            overrides.append((key, value[1:]))
        elif i < len(argv) and not argv[i].startswith("--") and not is_bool(key):
            overrides.append((key, argv[i]))
            i += 1
        else:
            overrides.append((key, None))
    return rest, overrides


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``FILE[:ARG]`` -> ``get_config(ARG)`` of the Python file (``get_config()`` when there is no ``:``)."""
    path, sep, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_loader(
        "_emoqwen_run_config", importlib.machinery.SourceFileLoader("_emoqwen_run_config", path))
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no config file {path!r}") from None
    return module.get_config(arg) if sep else module.get_config()


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str | None) -> None:
    """Sets the field ``key`` (dotted) of ``config`` to ``raw`` parsed as that field's type; ``raw`` None (a
    bare flag) sets a bool field to True. KeyError for a field the config does not have."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(["config", *parts[:depth]])
            known = (f"its fields: {', '.join(sorted(node.keys()))}" if isinstance(node, ml_collections.ConfigDict)
                     else f"it is a {type(node).__name__}, not a config")
            raise KeyError(f"--config.{key}: {where} has no field {part!r}; {known}")
        if depth < len(parts) - 1:
            node = node[part]
    node[parts[-1]] = parse_value(node[parts[-1]], raw, key)


def parse_value(old: Any, raw: str | None, key: str = "") -> Any:
    """``raw`` as the type of ``old`` (the field's current value), like ml_collections' ``config_flags``: bool
    (true/false/1/0, any case), int, float, str (as given), tuple (a Python literal; a lone value becomes a
    1-tuple), ConfigDict (a dict literal); a None, list or dict field takes any Python literal (else the string).
    ValueError naming the field when ``raw`` is not of the field's type."""
    if raw is None:
        if isinstance(old, bool) or old is None:
            return True
        raise ValueError(f"--config.{key} needs a value ({type(old).__name__} field)")
    try:
        if isinstance(old, bool):
            return _parse_bool(raw)
        if isinstance(old, (int, float, str)):
            return type(old)(raw)
        if isinstance(old, tuple):
            value = _literal(raw, strict=False)
            return value if isinstance(value, tuple) else tuple(value) if isinstance(value, list) else (value,)
        if isinstance(old, ml_collections.ConfigDict):
            value = _literal(raw, strict=True)
            if not isinstance(value, dict):
                raise ValueError(f"{raw!r} is not a dict")
            return ml_collections.ConfigDict(value)
        return _literal(raw, strict=False)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"--config.{key}={raw}: not a valid {type(old).__name__} ({err})") from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "t", "1"):
        return True
    if lowered in ("false", "f", "0"):
        return False
    raise ValueError("expected true or false")


def _literal(raw: str, *, strict: bool) -> Any:
    """A Python literal; with ``strict`` False, text that is not one stays a string (``--config.x=abc``)."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if strict:
            raise
        return raw


# ---- describe, eval, score: data overrides, generation options, errors ------------------------------------


def parse_sets(items: list[str]) -> dict:
    """``["fps=1.0", "faces.fusion=extra"]`` -> nested dict of Python literals (strings stay strings)."""
    out: dict = {}
    for (*path, leaf), value in parse_overrides(items):
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int, *, ckpt: bool = True) -> None:
    """Checkpoint (unless ``ckpt`` is False), data overrides and sampling options (``max_new_tokens`` 0: the
    command picks)."""
    if ckpt:
        parser.add_argument("--ckpt", required=True,
                            help="our model directory (emoqwen-convert from-hf or the trainer)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a data setting, e.g. --set fps=1.0 (repeatable)")
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                        help="generation budget (0 = the command's default)" if not max_new_tokens else None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute dtype (default: the checkpoint's)")


def run_command(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
                argv: list[str] | None, render: Callable[[argparse.Namespace, Any], str] | None = None) -> int:
    """Parses ``argv``, runs, prints ``render(args, result)`` (default: one JSON line) and returns 0; a
    missing file or bad value prints ``PROG: error: …`` to stderr and returns 2."""
    from emoqwen_jax.data.reasons import Rejected

    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (FileNotFoundError, ValueError, Rejected) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(render(args, result) if render else json.dumps(result))
    return 0
