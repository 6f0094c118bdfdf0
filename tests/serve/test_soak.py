"""A soak against the running server: 200 requests from 8 clients at once, a quarter of them bad, some
clients hanging up mid-stream. Afterwards every slot is free, every good request was answered, memory is
steady and a good request still gets its answer."""

import base64
import concurrent.futures
import random
import time

import httpx
import pytest
from serve_helpers import API_KEY, data_url

pytestmark = pytest.mark.slow  # starts a server

GOOD_CHAT = {"messages": [{"role": "user", "content": "Describe the weather."}], "max_tokens": 6, "temperature": 0}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def requests(media_root, n: int, seed: int) -> list[tuple[str, dict | bytes, int]]:
    """``n`` (kind, body, expected status) in a shuffled mix: 1/4 bad, 1/10 hang-ups, the rest good."""
    face = data_url(media_root / "face.png", "image/png")
    raw = (media_root / "clip.mp4").read_bytes()
    truncated = "data:video/mp4;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()
    bad = [("json", {"video": truncated}, 400), ("json", {"video": "http://127.0.0.1:9/x.mp4"}, 403),
           ("json", {"image": "data:application/pdf;base64,JVBERi0x"}, 415), ("raw", b"{oops", 400),
           ("chat", {"messages": []}, 422), ("chat", {**GOOD_CHAT, "max_tokens": 5000}, 400)]
    good = [("chat", GOOD_CHAT, 200), ("chat", {**GOOD_CHAT, "max_tokens": 12, "ignore_eos": True}, 200),
            ("json", {"image": face, "labels": "mer"}, 200), ("stream", {**GOOD_CHAT, "stream": True}, 200)]
    rng = random.Random(seed)
    out = [bad[i % len(bad)] for i in range(n // 4)] + [("hangup", None, 200) for _ in range(n // 10)]
    out += [good[i % len(good)] for i in range(n - len(out))]
    rng.shuffle(out)
    return out


def send(client: httpx.Client, kind: str, body) -> tuple[int, str | None]:
    """(status, the answer's text or None); a full server (503, hung-up streams still being cancelled) is
    asked again, as its Retry-After says (sooner here, to keep the test short)."""
    for _ in range(100):
        status, text = send_once(client, kind, body)
        if status != 503:
            return status, text
        time.sleep(0.1)
    return status, text


def send_once(client: httpx.Client, kind: str, body) -> tuple[int, str | None]:
    if kind == "raw":
        return client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                           ).status_code, None
    if kind == "json":
        r = client.post("/v1/emotion", json=body)
        return r.status_code, r.json().get("label")
    if kind == "chat":
        r = client.post("/v1/chat/completions", json=body)
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
    long = {**GOOD_CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body if kind == "stream" else long) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if kind == "hangup" and len(lines) >= 4:  # the role chunk and a delta: then hang up
                return r.status_code, None
        assert r.status_code != 200 or [line for line in lines if line][-1] == "data: [DONE]"
        return r.status_code, None


def test_soak(running, media_root):
    with running.client(API_KEY) as c:
        reference = c.post("/v1/chat/completions", json=GOOD_CHAT).json()["choices"][0]["message"]["content"]
    engine = running.server.engine
    cancelled0 = engine.stats().get("finished_cancelled", 0)
    rss = []
    t0 = time.monotonic()
    for seed, n in enumerate((100, 100)):  # two rounds: memory after the first is the baseline
        batch = requests(media_root, n, seed)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            clients = [running.client(API_KEY, timeout=120) for _ in range(8)]
            futures = [pool.submit(send, clients[i % 8], kind, body) for i, (kind, body, _) in enumerate(batch)]
            results = [f.result() for f in futures]
            for c in clients:
                c.close()
        for (kind, body, want), (status, text) in zip(batch, results, strict=True):
            assert status == want, (kind, status, want)
            if kind == "chat" and body is GOOD_CHAT:
                assert text == reference
        rss.append(rss_mb())
    assert time.monotonic() - t0 < 240
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["live_slots"] == 0 and stats["queue_depth"] == 0 and running.server.inflight == 0:
            break
        time.sleep(0.1)
    assert (stats["live_slots"], stats["queue_depth"], running.server.inflight) == (0, 0, 0)
    assert stats.get("finished_cancelled", 0) > cancelled0  # hang-ups freed their slots early
    assert rss[1] - rss[0] < 64, rss  # MB: steady after the first round
    with running.client(API_KEY) as c:
        assert c.post("/v1/chat/completions", json=GOOD_CHAT).json()["choices"][0]["message"]["content"] == reference
        text = c.get("/metrics").text
    assert 'emoqwen_requests_total{endpoint="/v1/emotion",status="403"}' in text
