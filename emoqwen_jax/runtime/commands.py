"""Command-line help shared by every ``emoqwen-*`` command and ``bench/`` script (argparse only).

A command's module docstring reads ``PROG: summary``, then a paragraph of example command lines (indented; a
line indented further continues the command above it), then more paragraphs. ``command_parser(__doc__)``
shows the summary and the paragraphs, and ends ``--help`` with the examples.
"""

from __future__ import annotations

import argparse


def command_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a command whose module docstring reads ``PROG: summary``, a block of example command
    lines (indented), then more paragraphs. ``--help`` shows the summary and the paragraphs, then the examples."""
    description, examples = _split_examples(doc)
    prog = prog or doc.split(":", 1)[0].strip()
    return argparse.ArgumentParser(prog=prog, description=description, epilog=_epilog(examples),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def subcommand(subparsers, name: str, doc: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand's parser; its ``--help`` ends with the docstring's examples that use it."""
    prog = doc.split(":", 1)[0].strip()
    _, examples = _split_examples(doc)
    mine = [block for block in examples if block[0].split()[:2] == [prog, name]]
    return subparsers.add_parser(name, help=summary, description=summary, epilog=_epilog(mine or examples),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def _split_examples(doc: str) -> tuple[str, list[list[str]]]:
    """(the docstring without its example block, the examples: one list of lines per command, its indented
    continuation lines included)."""
    paragraphs = doc.strip().split("\n\n")
    is_examples = [p.startswith("  ") for p in paragraphs]
    if True not in is_examples:
        raise ValueError(f"no example command lines (an indented paragraph) in the docstring {doc[:60]!r}")
    at = is_examples.index(True)
    examples: list[list[str]] = []
    for line in paragraphs[at].splitlines():
        if line.startswith("    ") and examples:  # a continuation of the previous command
            examples[-1].append(line.strip())
        else:
            examples.append([line.strip()])
    return "\n\n".join(paragraphs[:at] + paragraphs[at + 1:]), examples


def _epilog(examples: list[list[str]]) -> str:
    return "Examples:\n" + "\n".join("  " + "\n      ".join(block) for block in examples)
