"""Helpers of the serve tests (a module of its own: with several test folders, only the first ``conftest``
imported is reachable by that name): a real uvicorn server in a thread, data: URLs, server-sent events."""

import base64
import json
import socket
import threading
import time
from pathlib import Path

import httpx

API_KEY = "test-key-0123456789"
# Small frames (56 x 56 -> 4 x 4 patches per frame) keep prompts short: these are plumbing tests.
SMALL_FRAMES = {"video_min_pixels": 3136, "video_max_pixels": 3136, "image_min_pixels": 3136,
                "image_max_pixels": 3136}


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
        from emoqwen_jax.serve.app import UVICORN_STACK

        self.app = create_app(config, load=load)
        self.server = self.app.state.server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     timeout_graceful_shutdown=2, **UVICORN_STACK))
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
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
