"""A real server for the serve tests: uvicorn on 127.0.0.1 (a free port, in a thread of the test process)
over a tiny random checkpoint that stores small data settings, plus the demo clips to send it."""

import pytest
from serve_helpers import API_KEY, SMALL_FRAMES, Running
from tiny_checkpoint import save_tiny_checkpoint

from emoqwen_jax.data.demo import build_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo(str(root), num_clips=2, num_images=1, num_heldout=1)
    return root


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory, SMALL_FRAMES)


@pytest.fixture(scope="session")
def media_root(demo, tmp_path_factory):
    """A media root with the demo clip and still, a symlink to each that stays inside, and escapes: a symlink to
    a file outside, a symlinked folder outside; beside it, a file the server must never read."""
    import os
    import shutil

    root = tmp_path_factory.mktemp("media")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(demo / "videos" / "clip_000.mp4", root / "clip.mp4")
    shutil.copy(demo / "images" / "face_000.png", root / "face.png")
    shutil.copy(demo / "videos" / "clip_001.mp4", outside / "secret.mp4")
    (root / "notes.txt").write_text("not media")
    os.symlink(root / "clip.mp4", root / "inside_link.mp4")
    os.symlink(outside / "secret.mp4", root / "escape.mp4")
    os.symlink(outside, root / "escape_dir")
    return root


@pytest.fixture(scope="session")
def running(ckpt, media_root):
    """The shared server: 2 slots of 512 tokens, at most 8 requests admitted, a 1 MB body limit, an API key, two
    tokens per decode call (streams get tokens in pairs, rows end inside calls; the engine's tests cover one)."""
    from emoqwen_jax.serve import ServeConfig

    server = Running(ServeConfig(ckpt=ckpt, max_batch=2, max_len=512, media_root=str(media_root), api_key=API_KEY,
                                 max_upload_mb=1.0, max_inflight=8, decode_steps=2))
    yield server
    server.stop()


@pytest.fixture
def client(running):
    with running.client(API_KEY) as c:
        yield c
