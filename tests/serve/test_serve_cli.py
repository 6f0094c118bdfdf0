"""The ``emoqwen-serve`` command: its flags, its errors, and a real process that listens at once and answers
/healthz 503 while it loads."""

import os
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import free_port

from emoqwen_jax.cli.serve import build_parser, main

pytestmark = pytest.mark.slow  # starts servers

FLAGS = ("--ckpt", "--host", "--port", "--max_batch", "--max_len", "--media_root", "--api_key", "--max_upload_mb",
         "--decode_steps")


def test_the_flags_and_their_defaults():
    text = build_parser().format_help()
    assert all(flag in text for flag in FLAGS)
    args = build_parser().parse_args(["--ckpt", "c"])
    assert (args.host, args.port, args.max_batch, args.max_upload_mb) == ("127.0.0.1", 8000, 8, 64.0)
    assert args.decode_steps == 1


def test_bad_arguments_exit_2(tmp_path, ckpt, capsys):
    assert main(["--ckpt", str(tmp_path / "missing")]) == 2
    assert "--ckpt" in capsys.readouterr().err
    assert main(["--ckpt", ckpt, "--media_root", str(tmp_path / "missing")]) == 2
    assert main(["--ckpt", ckpt, "--max_batch", "0"]) == 2
    assert main(["--ckpt", ckpt, "--decode_steps", "0"]) == 2


def test_the_command_listens_at_once_and_says_it_is_loading(ckpt):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "emoqwen_jax.cli.serve", "--ckpt", ckpt, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.status_code in (200, 503)
        if health.status_code == 503:
            assert health.json()["status"] == "loading" and health.headers["retry-after"] == "5"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
