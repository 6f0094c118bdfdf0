"""Every endpoint of a real server: the answers, streaming equality, class scores against the model's own
first-token logits (computed here without the engine), metrics, auth and the loading state."""

import concurrent.futures
import math
import time

import httpx
import jax
import numpy as np
import pytest
from serve_helpers import API_KEY, Running, data_url, parse_sse

from emoqwen_jax.infer.gate_timeline import gate_over_time
from emoqwen_jax.infer.generate import prefill

pytestmark = pytest.mark.slow  # starts a server

DFEW_QUESTION = ("<video>\nWhat is the emotion of the person in this video? Choose one of: happy, sad, neutral, "
                 "angry, surprise, disgust, fear. Answer with one word.")


def chat(client, content, **fields):
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, **fields}
    return client.post("/v1/chat/completions", json=body)


def test_healthz_and_models(running, client):
    assert httpx.get(f"{running.url}/healthz").json() == {"status": "ok"}  # no key needed
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 512


def test_chat_answer_equals_generate_alone(running, client, media_root):
    """Greedy text of a chat with an image equals the static ``generate`` path for the same prompt."""
    session = running.server.session
    r = chat(client, [{"type": "image_url", "image_url": {"url": data_url(media_root / "face.png", "image/png")}},
                      {"type": "text", "text": "How does this face look?"}], max_tokens=6)
    assert r.status_code == 200, r.text
    out = r.json()
    prompt = session.prompt("How does this face look?", [("image", str(media_root / "face.png"))])
    ids = session.generate_ids([prompt], session.sampling(6))[0]
    assert out["choices"][0]["message"]["content"] == session.decode(ids)
    assert out["usage"] == {"prompt_tokens": len(prompt.input_ids), "completion_tokens": len(ids),
                            "total_tokens": len(prompt.input_ids) + len(ids)}
    assert out["object"] == "chat.completion" and out["model"] == "tiny"


@pytest.mark.parametrize("extra", [{}, {"stop": ["e"]}])
def test_stream_joins_to_the_plain_text(client, extra):
    fields = dict(max_tokens=24, ignore_eos=True, min_tokens=24 if not extra else 0, **extra)
    plain = chat(client, "Tell me a story.", **fields).json()
    r = chat(client, "Tell me a story.", stream=True, stream_options={"include_usage": True}, **fields)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == plain["usage"]
    if extra:
        assert "e" not in text  # the text ends before the stop string
    else:
        assert plain["usage"]["completion_tokens"] == 24 and plain["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_repeats(client):
    a, b = (chat(client, "Say something.", max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=7).json()
            for _ in range(2))
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_emotion_scores_are_the_first_token_probabilities(running, client, media_root):
    """Scores equal the softmax of the prompt's next-token logits (a prefill run here, without the engine) over
    each class word's first token; words sharing that token split its probability."""
    r = client.post("/v1/emotion", json={"video": f"file://{media_root}/clip.mp4", "describe": True, "max_tokens": 8})
    assert r.status_code == 200, r.text
    out = r.json()
    classes = ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
    assert list(out["scores"]) == classes
    assert math.isclose(sum(out["scores"].values()), 1.0, rel_tol=1e-6)
    assert out["label"] == max(classes, key=lambda c: (out["scores"][c], out["answer"].startswith(c)))
    session = running.server.session
    prompt = session.prompt(DFEW_QUESTION, [("video", str(media_root / "clip.mp4"))])
    ids = np.asarray(prompt.input_ids)[None]
    inputs = session.model.prepare_inputs(ids, np.ones_like(ids), **prompt.vision)
    logits, _, _ = prefill(session.model, inputs.replace(rope_deltas=None), cache_len=ids.shape[1] + 1)
    logits = np.asarray(jax.device_get(logits), np.float64)[0]
    first = [session.tokenizer.encode(c, add_special_tokens=False).ids[0] for c in classes]
    unique = sorted(set(first))
    p = np.exp(logits[unique] - logits[unique].max())
    p /= p.sum()
    want = np.array([p[unique.index(i)] / first.count(i) for i in first])
    got = np.array([out["scores"][c] for c in classes])
    assert np.max(np.abs(got - want)) <= 1e-4 * want.max()
    assert out["frames"] == sorted(out["frames"]) and len(out["frames"]) == 4 and out["frames"][0] == 0.0
    assert 0 < out["frames"][-1] < 1.0  # a 1-s clip at 8 fps
    gates = np.asarray(out["gate_weights"])
    assert gates.shape[0] == 1 and np.allclose(gates.sum(axis=1), 1.0, atol=1e-5)
    assert isinstance(out["description"], str) and out["usage"]["completion_tokens"] > 0
    assert "gate_timeline" not in out  # only on request: it costs one more ViT pass


def test_emotion_gate_timeline_gives_one_row_per_temporal_group(running, client, media_root):
    r = client.post("/v1/emotion", json={"video": f"file://{media_root}/clip.mp4", "gate_timeline": True})
    assert r.status_code == 200, r.text
    out = r.json()
    session = running.server.session
    prompt = session.prompt(DFEW_QUESTION, [("video", str(media_root / "clip.mp4"))])
    want = gate_over_time(session, prompt)
    got = np.asarray(out["gate_timeline"]["weights"])
    assert got.shape == want.shape == (2, len(out["gate_weights"][0]))  # 4 frames, 2 per temporal group
    assert np.max(np.abs(got - want)) <= 1e-5  # the JSON rounds to 6 decimals
    assert out["gate_timeline"]["times"] == [out["frames"][0], out["frames"][2]]


def test_emotion_with_words_an_image_and_a_stream(client, media_root):
    body = {"image": data_url(media_root / "face.png", "image/png"), "labels": ["calm", "joyful", "upset"],
            "subtitle": "What a day.", "describe": True, "max_tokens": 6}
    plain = client.post("/v1/emotion", json=body).json()
    assert list(plain["scores"]) == ["calm", "joyful", "upset"] and plain["frames"] == []
    events = parse_sse(client.post("/v1/emotion", json={**body, "stream": True}).text)
    assert events[0] == {"object": "emotion.frames", "frames": []} and events[-1] == "[DONE]"
    scores = next(e for e in events[:-1] if e["object"] == "emotion.scores")
    assert scores["label"] == plain["label"]
    np.testing.assert_allclose(list(scores["scores"].values()), list(plain["scores"].values()), rtol=1e-4)
    done = events[-2]
    assert done["object"] == "emotion.done" and done["description"] == plain["description"]
    assert "".join(e["delta"] for e in events if isinstance(e, dict) and e["object"] == "emotion.delta") == \
        plain["description"]


def metric_values(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_metrics_count_requests_tokens_and_latency(client, media_root):
    before = metric_values(client)
    chat_usage = chat(client, "Hi.", max_tokens=3).json()["usage"]
    body = {"image": f"file://{media_root}/face.png", "describe": True, "max_tokens": 5, "stream": True}
    emotion_usage = parse_sse(client.post("/v1/emotion", json=body).text)[-2]["usage"]
    values = metric_values(client)
    for name, kind in (("generated", "completion_tokens"), ("prompt", "prompt_tokens")):
        counted = values[f"emoqwen_{name}_tokens_total"] - before.get(f"emoqwen_{name}_tokens_total", 0)
        assert counted == chat_usage[kind] + emotion_usage[kind], name
    key = 'emoqwen_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert values[key] == before.get(key, 0) + 1
    assert values["emoqwen_time_to_first_token_seconds_count"] == before.get(
        "emoqwen_time_to_first_token_seconds_count", 0) + 3  # one per engine request: chat, scores, description
    assert values["emoqwen_time_per_output_token_seconds_count"] > 0
    assert values["emoqwen_max_slots"] == 2 and "emoqwen_queue_depth" in values and "emoqwen_live_slots" in values


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}])
def test_a_missing_or_wrong_key_gets_401(running, headers):
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/emotion")):
        r = httpx.request(method, f"{running.url}{path}", headers=headers, json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)


def test_page_and_static_files_are_served(running):
    page = httpx.get(f"{running.url}/")
    assert page.status_code == 200 and "/static/page.js" in page.text
    assert httpx.get(f"{running.url}/static/page.js").status_code == 200


def test_loading_server_answers_503(ckpt):
    """Before the weights are loaded and compiled: /healthz 503, API calls 503 with Retry-After."""
    from emoqwen_jax.serve import ServeConfig

    server = Running(ServeConfig(ckpt=ckpt), load=False)
    try:
        health = httpx.get(f"{server.url}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "not_ready"
    finally:
        server.stop()


def test_start_up_warns_when_frames_are_far_outside_the_trained_pixel_range(ckpt, caplog):
    """The checkpoint was trained on 3,136-pixel frames; serving at the standard 128·28² minimum logs the
    warning with the --set flags that restore the trained range."""
    from emoqwen_jax.serve import ServeConfig
    from emoqwen_jax.serve.server import Server

    server = Server(ServeConfig(ckpt=ckpt, warmup=False, data={"video_min_pixels": 100352,
                                                               "video_max_pixels": 602112}))
    with caplog.at_level("WARNING", logger="emoqwen_jax.serve"):
        server.load()
    server.close()
    assert server.ready and server.load_error is None
    warned = [r.getMessage() for r in caplog.records if r.name == "emoqwen_jax.serve"]
    assert any("--set video_min_pixels=3136 --set video_max_pixels=3136" in m for m in warned), warned


def test_a_client_that_hangs_up_before_its_answer_frees_its_slot(running, client):
    """A non-streamed request whose client goes away is cancelled. The engine's loop is paused while two long
    requests and then the one that hangs up arrive, so the hung-up one is certainly still waiting for a slot
    when the server notices (however fast the engine is); the loop resumes once the cancel is queued."""
    engine = running.server.engine
    cancelled = engine.stats().get("finished_cancelled", 0)
    long = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 400, "ignore_eos": True}
    engine.stop()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(client.post, "/v1/chat/completions", json=long) for _ in range(2)]
            deadline = time.monotonic() + 20
            while engine.stats()["queue_depth"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{running.url}/v1/chat/completions", json=long, timeout=httpx.Timeout(30, read=0.05),
                           headers={"Authorization": f"Bearer {API_KEY}"})
            while not engine._cancelled and time.monotonic() < deadline:  # the server has seen the hang-up
                time.sleep(0.01)
            assert engine._cancelled and engine.stats()["queue_depth"] == 3
            engine.start()
            assert all(f.result().status_code == 200 for f in busy)
    finally:
        engine.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and engine.stats()["live_slots"]:
        time.sleep(0.05)
    stats = engine.stats()
    assert stats.get("finished_cancelled", 0) == cancelled + 1 and stats["live_slots"] == 0
