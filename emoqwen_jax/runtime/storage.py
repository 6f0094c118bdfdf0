"""Paths a user gives (workdir, init_from, manifests, data roots, eval roots, export targets): local paths or URIs.

A plain path is made absolute; ``file:///abs/path`` is the same local path. Any other ``scheme://`` goes through
fsspec, the layer ``etils.epath`` (and so orbax) uses for ``gs://``, ``s3://``, ``az://`` and ``hf://``:
``gs://`` needs gcsfs (``pip install 'emoqwen_jax[gcs]'``), and a filesystem registered with
``fsspec.register_implementation`` (``memory://`` in the tests) works everywhere these helpers are used.
Orbax checkpoints take the same strings (``as_epath``): local and ``gs://`` work; tensorstore has no driver for
other fsspec protocols.

Never ``os.path`` on such a path: ``os.path.abspath("gs://b/run")`` is the local folder ``./gs:/b/run``.
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
import json
import os
import posixpath
import shutil
from typing import IO, Any, Iterator

from etils import epath


def scheme(path: str | os.PathLike) -> str:
    """'' for a local path (``file://`` included), else the URI scheme ('gs', 's3', 'memory'…)."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    if not sep or "/" in head or not head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return ""
    return "" if head == "file" else head.lower()


def is_uri(path: str | os.PathLike) -> bool:
    """True for a remote (non-local) URI such as ``gs://bucket/run``."""
    return bool(scheme(path))


def normalize(path: str | os.PathLike) -> str:
    """An absolute local path (``~`` expanded, ``file://`` stripped) or the URI without a trailing slash."""
    text = os.fspath(path)
    if not text:
        raise ValueError("empty path: give a local path or a URI such as gs://bucket/dir")
    if is_uri(text):
        return text.rstrip("/") if not text.endswith("://") else text
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(os.path.expanduser(text))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = normalize(base)
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def basename(path: str | os.PathLike) -> str:
    return posixpath.basename(normalize(path))


def dirname(path: str | os.PathLike) -> str:
    """The folder holding ``path`` (``gs://b/x/f.json`` -> ``gs://b/x``)."""
    path = normalize(path)
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(path)


def resolve(base: str | os.PathLike, rel: str | os.PathLike) -> str:
    """``rel`` (a URI, an absolute or ``~`` path: kept) else ``base``/``rel`` with ``..`` folded (config files
    naming paths relative to themselves)."""
    rel = os.fspath(rel)
    if is_uri(rel) or rel.startswith("file://") or os.path.isabs(os.path.expanduser(rel)):
        return normalize(rel)
    base = normalize(base)
    if not is_uri(base):
        return os.path.normpath(os.path.join(base, rel))
    head, _, inner = base.partition("://")
    return f"{head}://" + posixpath.normpath(posixpath.join(inner, rel)).lstrip("/")


def _fs(path: str):
    """(fsspec filesystem, path inside it) of a URI, with a clear message when its package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as err:
        hint = " (pip install 'emoqwen_jax[gcs]')" if scheme(path) == "gs" else ""
        raise ValueError(f"cannot open {path!r}: no filesystem for {scheme(path)}://{hint}: {err}") from err


def _query(path: str | os.PathLike, local, method: str) -> bool:
    """``local(path)`` for a local path, else the fsspec filesystem's ``method``."""
    path = normalize(path)
    if not is_uri(path):
        return local(path)
    fs, inner = _fs(path)
    return getattr(fs, method)(inner)


def exists(path: str | os.PathLike) -> bool:
    return _query(path, os.path.exists, "exists")


def isdir(path: str | os.PathLike) -> bool:
    return _query(path, os.path.isdir, "isdir")


def isfile(path: str | os.PathLike) -> bool:
    return _query(path, os.path.isfile, "isfile")


def listdir(path: str | os.PathLike) -> list[str]:
    """Entry names (not paths) of a directory, sorted."""
    path = normalize(path)
    if not is_uri(path):
        return sorted(os.listdir(path))
    fs, inner = _fs(path)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def glob(folder: str | os.PathLike, pattern: str) -> list[str]:
    """Paths of ``folder``'s entries whose names match the shell ``pattern`` (one level), sorted; [] when
    ``folder`` does not exist."""
    if not isdir(folder):
        return []
    return [join(folder, name) for name in listdir(folder) if fnmatch.fnmatch(name, pattern)]


def makedirs(path: str | os.PathLike) -> str:
    path = normalize(path)
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
    else:
        fs, inner = _fs(path)
        fs.makedirs(inner, exist_ok=True)  # object stores have no folders; harmless there
    return path


def open(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> IO:  # noqa: A001 - mirrors builtins.open
    """A file object on a local path or a URI (writes make the parent folder first)."""
    path = normalize(path)
    if not is_uri(path):
        if any(m in mode for m in "wax"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return builtins.open(path, mode, **kwargs)
    fs, inner = _fs(path)
    return fs.open(inner, mode, **kwargs)


def read_text(path: str | os.PathLike) -> str:
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_text(path: str | os.PathLike, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_text(path))


def write_json(path: str | os.PathLike, value: Any, **kwargs: Any) -> None:
    write_text(path, json.dumps(value, **kwargs))


def remove(path: str | os.PathLike) -> None:
    """Deletes a file or a whole folder (no error when absent)."""
    path = normalize(path)
    if not is_uri(path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        return
    fs, inner = _fs(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


@contextlib.contextmanager
def local_file(path: str | os.PathLike) -> Iterator[str]:
    """A local path holding ``path``'s bytes: the path itself when local, else a temporary copy (for libraries
    that only take file names)."""
    path = normalize(path)
    if not is_uri(path):
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, basename(path))
        fs, inner = _fs(path)
        fs.get(inner, local)
        yield local


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[str]:
    """A local folder to write ``path``'s files into: ``path`` itself when local, else a temporary folder whose
    files are uploaded to the URI when the block ends without error (for writers that need file names)."""
    path = normalize(path)
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        fs, inner = _fs(path)
        for root, _, names in os.walk(tmp):
            rel = os.path.relpath(root, tmp)
            for name in names:
                target = posixpath.join(inner, name) if rel == "." else posixpath.join(inner, *rel.split(os.sep), name)
                fs.put_file(os.path.join(root, name), target)


def as_epath(path: str | os.PathLike) -> epath.Path:
    """The ``etils.epath.Path`` orbax takes for ``path``."""
    return epath.Path(normalize(path))
