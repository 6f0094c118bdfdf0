"""Command-line plumbing shared by emoqwen-describe, emoqwen-eval and emoqwen-score: data overrides
(``--set key=value``), the generation options, and the error contract (bad input -> message, exit 2)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from emoqwen_jax.data.defaults import parse_overrides


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
