"""A real server for the serve tests: uvicorn on 127.0.0.1 (a free port, in a thread of the test process)
over a tiny random checkpoint that stores small data settings, plus the demo clips to send it."""

import base64
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from flax import nnx

from emoqwen_jax.checkpoint import save_model
from emoqwen_jax.data.demo import build_demo
from emoqwen_jax.model import EmotionQwen, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402

# Small frames (56 x 56 -> 4 x 4 patches per frame) keep prompts short: these are plumbing tests.
SMALL_FRAMES = {"video_min_pixels": 3136, "video_max_pixels": 3136, "image_min_pixels": 3136,
                "image_max_pixels": 3136}
API_KEY = "test-key-0123456789"


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo(str(root), num_clips=2, num_images=1, num_heldout=1)
    return root


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    config = emotion_qwen.get_config("tiny")
    model = EmotionQwen(ModelConfig.from_run_config(config), rngs=nnx.Rngs(0))
    data = {"tokenizer_vocab_size": config.model.text.vocab_size,
            "tokenizer_cache_dir": str(tmp_path_factory.mktemp("tokcache")), **SMALL_FRAMES}
    return save_model(model, str(tmp_path_factory.mktemp("ckpt") / "tiny"), meta={"data": data})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread: ``url``, ``server`` (the app's state), ``client(**kw)``."""

    def __init__(self, config, load_timeout: float = 240.0, load: bool = True):
        """``load`` False: the app never loads the checkpoint (its loading state); returns once it listens."""
        import uvicorn

        from emoqwen_jax.serve import create_app

        self.app = create_app(config, load=load)
        self.server = self.app.state.server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + load_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200 or not load:
                    return
            except httpx.TransportError:
                pass
            if self.server.load_error:
                raise RuntimeError(self.server.load_error)
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


def data_url(path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def parse_sse(text: str) -> list:
    """The ``data:`` payloads of a server-sent event stream (JSON decoded; ``[DONE]`` kept as a string)."""
    import json

    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


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
    """The shared server: 2 slots of 512 tokens, at most 8 requests admitted, a 1 MB body limit, an API key."""
    from emoqwen_jax.serve import ServeConfig

    server = Running(ServeConfig(ckpt=ckpt, max_batch=2, max_len=512, media_root=str(media_root), api_key=API_KEY,
                                 max_upload_mb=1.0, max_inflight=8))
    yield server
    server.stop()


@pytest.fixture
def client(running):
    with running.client(API_KEY) as c:
        yield c
