"""Test-wide setup: CPU only, float32 matmuls at full precision, eight host devices."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Eight host devices for the mesh tests (unsharded code still runs on device 0).
jax.config.update("jax_num_cpu_devices", 8)


class ScratchFS(MemoryFileSystem):
    """A filesystem of our own under ``scratch://`` (stands in for gs:// and friends; no network)."""

    protocol = "scratch"
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def scratch():
    """``scratch://bucket``: an empty fsspec filesystem registered for one test (user paths given as URIs)."""
    import fsspec

    fsspec.register_implementation("scratch", ScratchFS, clobber=True)
    ScratchFS.store.clear()
    ScratchFS.pseudo_dirs[:] = [""]
    yield "scratch://bucket"
    ScratchFS.store.clear()


@pytest.fixture
def upload():
    """``upload(local_dir, uri, suffixes=())``: copies the files under a local folder (those ending in one of
    ``suffixes`` when given) to ``uri``, same relative paths."""
    from emoqwen_jax.runtime import storage

    def copy(local, uri: str, suffixes: tuple[str, ...] = ()) -> None:
        for path in sorted(local.rglob("*")):
            if path.is_file() and (not suffixes or path.suffix in suffixes):
                with storage.open(storage.join(uri, *path.relative_to(local).parts), "wb") as f:
                    f.write(path.read_bytes())

    return copy
