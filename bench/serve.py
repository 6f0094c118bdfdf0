r"""Serving throughput: N concurrent clients on loopback against ``emoqwen-serve``, and one client at a time.

  python bench/serve.py [--ckpt DIR] [--clients 8] [--requests 64] [--max_batch 8] [--tokens 32] [--decode_steps 1]

Starts ``emoqwen-serve`` (its own process, 127.0.0.1, a free port) on ``--ckpt`` — by default a random model
of the ``demo`` preset saved with the demo's data settings (throughput does not depend on the weights when
every completion has a fixed length) — and waits for /healthz. Two workloads, each with 1 client and with
``--clients`` clients, every client sending its share of ``--requests`` back to back:

  completion      POST /v1/chat/completions, a short text prompt, ``--tokens`` tokens (``ignore_eos``,
                  ``min_tokens``: fixed lengths, as vLLM's serving benchmark fixes them), streamed: time to
                  first token and time per output token after it, (latency - TTFT) / (tokens - 1), vLLM's TPOT
                  (a chunk may carry several tokens), measured at the client
  classification  POST /v1/emotion on a demo clip (the short answer: the label and the class scores)

Prints per setting requests/s, generated tokens/s, time to first token p50/p95, per-token latency p50 and the
ratio of N clients' throughput to one client's, and a JSON line with all figures and ``machine``
(``machine_info()`` before and after: a run whose load exceeded the core count is marked unreliable).
The clients are aiohttp's, as in vLLM's serving benchmark: they share the machine with the server, and a
lighter client leaves more of it to the server (httpx's took three times the CPU per request).
The default 64 requests check that it runs; a ratio needs the N-client phase to last seconds, not a fraction
of one (``--requests 2048`` on the demo model: 4 to 7 s with 8 clients; at 256 two runs a minute apart gave
3.3× and 5.1×).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time

import aiohttp
import httpx
import numpy as np
from machine import describe, machine_info  # bench/machine.py (this script's directory is on sys.path)

from emoqwen_jax.runtime.commands import command_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_checkpoint(root: str, preset: str) -> str:
    """A random model of ``preset`` saved with that preset's data settings."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import emotion_qwen  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from emoqwen_jax.model import EmotionQwen, ModelConfig  # noqa: PLC0415
    from emoqwen_jax.model_dir import save_model  # noqa: PLC0415

    config = emotion_qwen.get_config(preset)
    model = EmotionQwen(ModelConfig.from_run_config(config), rngs=nnx.Rngs(0))
    data = {k: v for k, v in config.data.to_dict().items()
            if isinstance(v, (int, float, str, bool, dict, list)) and k not in ("mixture", "manifest", "data_root")}
    data["tokenizer_cache_dir"] = os.path.join(root, "tokenizer")
    return save_model(model, os.path.join(root, preset), meta={"data": json.loads(json.dumps(data, default=str))})


def start_server(ckpt: str, max_batch: int, max_len: int, timeout: float, decode_steps: int = 1
                 ) -> tuple[subprocess.Popen, str]:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "emoqwen_jax.cli.serve", "--ckpt", ckpt, "--port", str(port),
                             "--max_batch", str(max_batch), "--max_len", str(max_len),
                             "--decode_steps", str(decode_steps)],
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"emoqwen-serve exited with {proc.returncode}")
        time.sleep(0.5)
    proc.terminate()
    raise TimeoutError(f"emoqwen-serve was not ready within {timeout} s")


async def completion(client: aiohttp.ClientSession, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": "Describe how the person in the story feels."}],
            "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    first = None
    async with client.post("/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:  # one SSE line at a time
            if first is None and line.startswith(b"data: {") and b'"content"' in line and b'"role"' not in line:
                first = time.perf_counter()
    end = time.perf_counter()
    ttft = (first or end) - start
    return {"latency": end - start, "ttft": ttft, "tokens": tokens,
            "tpot": (end - start - ttft) / (tokens - 1) if tokens > 1 else None}


async def classification(client: aiohttp.ClientSession, clip_url: str) -> dict:
    start = time.perf_counter()
    async with client.post("/v1/emotion", json={"video": clip_url}) as r:
        r.raise_for_status()
        usage = (await r.json())["usage"]
    end = time.perf_counter()
    return {"latency": end - start, "ttft": end - start, "tokens": usage["completion_tokens"], "tpot": None}


async def run(url: str, workload: str, clients: int, requests: int, tokens: int, clip_url: str) -> dict:
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=600)) as client:
        async def one():
            if workload == "completion":
                return await completion(client, tokens)
            return await classification(client, clip_url)

        for _ in range(2):  # warm: this workload's compiled shapes at this concurrency (not timed)
            await asyncio.gather(*(one() for _ in range(clients)))
        queue = list(range(requests))
        results: list[dict] = []

        async def worker():
            while queue:
                queue.pop()
                results.append(await one())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ttft = np.array([r["ttft"] for r in results])
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    return {"workload": workload, "clients": clients, "requests": requests, "seconds": round(wall, 3),
            "requests_per_s": round(requests / wall, 3),
            "generated_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
            "ttft_p50_ms": round(1000 * float(np.percentile(ttft, 50)), 2),
            "ttft_p95_ms": round(1000 * float(np.percentile(ttft, 95)), 2),
            "per_token_ms_p50": round(1000 * float(np.percentile(tpot, 50)), 3) if tpot else None}


def main() -> None:
    parser = command_parser(__doc__, prog="python bench/serve.py")
    parser.add_argument("--ckpt", default=None, help="a model directory (default: a random demo-preset model)")
    parser.add_argument("--preset", default="demo", help="the random model's preset when --ckpt is not given")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="requests per setting")
    parser.add_argument("--max_batch", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--decode_steps", type=int, default=1, help="emoqwen-serve's --decode_steps")
    parser.add_argument("--workloads", nargs="+", default=["completion", "classification"],
                        choices=["completion", "classification"])
    parser.add_argument("--ready_timeout", type=float, default=900.0)
    args = parser.parse_args()
    from emoqwen_jax.data.demo import write_clip  # noqa: PLC0415

    before = machine_info()
    with tempfile.TemporaryDirectory(prefix="emoqwen_bench_serve_") as tmp:
        ckpt = args.ckpt or random_checkpoint(tmp, args.preset)
        write_clip(os.path.join(tmp, "clip.mp4"), 0, "happy")
        with open(os.path.join(tmp, "clip.mp4"), "rb") as f:
            clip_url = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
        proc, url = start_server(ckpt, args.max_batch, args.max_len, args.ready_timeout, args.decode_steps)
        try:
            rows = []
            for workload in args.workloads:
                for clients in (1, args.clients):
                    row = asyncio.run(run(url, workload, clients, args.requests, args.tokens, clip_url))
                    rows.append(row)
                    print(f"{workload:>14} clients {clients:>3}: {row['requests_per_s']:8.2f} req/s "
                          f"{row['generated_tokens_per_s']:9.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:8.1f} ms "
                          f"p95 {row['ttft_p95_ms']:8.1f} ms  per token {row['per_token_ms_p50']} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    ratios = {w: round(rows[2 * i + 1]["requests_per_s"] / rows[2 * i]["requests_per_s"], 3)
              for i, w in enumerate(args.workloads)}
    machine = machine_info(before)
    print(f"throughput with {args.clients} clients / 1 client: {ratios}; {describe(machine)}")
    print(json.dumps({"bench": "serve", "ckpt": args.ckpt or f"random {args.preset}", "max_batch": args.max_batch,
                      "tokens": args.tokens, "decode_steps": args.decode_steps, "rows": rows,
                      "ratio_vs_one_client": ratios, "machine": machine}))


if __name__ == "__main__":
    main()
