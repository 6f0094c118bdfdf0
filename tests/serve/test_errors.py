"""Bad input gets a clear JSON error with the right status, never a crash: media rules (403), corrupt media
(400 with the data pipeline's reason), unsupported types (415), size limits (413), prompt limits (400),
malformed bodies (400/422), a full server (503 with Retry-After)."""

import base64
import concurrent.futures
import json

import httpx
import pytest
from serve_helpers import API_KEY

from emoqwen_jax.data.reasons import REASONS

pytestmark = pytest.mark.slow  # starts a server


def chat_body(parts, **fields):
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 2, **fields}


def video_part(url):
    return [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "How does she feel?"}]


def error(r, status):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["message"] and body["code"]
    return body


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/clip.mp4", "https://example.com/clip.mp4", "ftp://example.com/clip.mp4", "/clip.mp4",
    "clip.mp4", "file://otherhost{root}/clip.mp4", "file://{root}/../outside/secret.mp4",
    "file://{root}/%2e%2e/%2e%2e/etc/passwd", "file:///etc/passwd", "file://{root}/escape.mp4",
    "file://{root}/escape_dir/secret.mp4"])
def test_urls_outside_the_media_root_get_403(client, media_root, url):
    url = url.format(root=media_root)
    for r in (client.post("/v1/chat/completions", json=chat_body(video_part(url))),
              client.post("/v1/emotion", json={"video": url})):
        assert error(r, 403)["code"] in ("url_not_allowed", "path_escapes_root")


def test_a_symlink_that_stays_inside_is_read(client, media_root):
    r = client.post("/v1/emotion", json={"video": f"file://{media_root}/inside_link.mp4"})
    assert r.status_code == 200, r.text


def _truncated_clip(media_root) -> str:
    raw = (media_root / "clip.mp4").read_bytes()
    return "data:video/mp4;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()


@pytest.mark.parametrize("case, reason", [
    ("truncated_clip", "corrupt_video"), ("garbage_image", "unreadable_image"), ("garbage_clip", "corrupt_video")])
def test_corrupt_media_get_400_with_the_pipeline_reason(client, media_root, case, reason):
    url = {"truncated_clip": _truncated_clip(media_root),
           "garbage_image": "data:image/png;base64," + base64.b64encode(b"\x89PNG not really" * 20).decode(),
           "garbage_clip": "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" * 50).decode(),
           }[case]
    kind = "image" if "image" in case else "video"
    part = [{"type": f"{kind}_url", f"{kind}_url": {"url": url}}, {"type": "text", "text": "?"}]
    for r in (client.post("/v1/chat/completions", json=chat_body(part)), client.post("/v1/emotion", json={kind: url})):
        body = error(r, 400)
        assert body["code"] == reason and body["code"] in REASONS and body["message"].startswith(reason)


def test_bad_base64_and_empty_payloads_get_400(client):
    for url in ("data:video/mp4;base64,@@@not base64@@@", "data:video/mp4;base64,", "data:video/mp4,plain"):
        assert error(client.post("/v1/emotion", json={"video": url}), 400)["code"] == "bad_data_url"


@pytest.mark.parametrize("body", [
    {"video": "data:application/pdf;base64,JVBERi0x"},
    {"image": "data:video/mp4;base64,AAAA"},
    {"audio": "data:text/plain;base64,aGVsbG8="},
    {"video": "file://{root}/notes.txt"},
])
def test_unsupported_media_types_get_415(client, media_root, body):
    body = {k: v.format(root=media_root) for k, v in body.items()}
    assert error(client.post("/v1/emotion", json=body), 415)["code"] == "unsupported_media_type"


def test_unsupported_audio_format_gets_415(client):
    part = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}]
    assert error(client.post("/v1/chat/completions", json=chat_body(part)), 415)["code"] == "unsupported_media_type"


def test_audio_for_a_checkpoint_without_an_audio_encoder_gets_400(client):
    part = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF" + b"\0" * 64).decode(),
                                                    "format": "wav"}}]
    assert error(client.post("/v1/chat/completions", json=chat_body(part)), 400)


def test_a_body_over_the_limit_gets_413_declared_or_streamed(running, client):
    big = json.dumps(chat_body("x" * (1024 * 1024 + 10))).encode()
    assert error(client.post("/v1/chat/completions", content=big,
                             headers={"content-type": "application/json"}), 413)["code"] == "too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(f"{running.url}/v1/chat/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert error(r, 413)["code"] == "too_large"


def test_a_prompt_over_max_len_gets_400_naming_the_limit(client):
    for fields in ({"messages": [{"role": "user", "content": "hello " * 600}]},
                   {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 600}):
        body = error(client.post("/v1/chat/completions", json=fields), 400)
        assert body["code"] == "too_long" and "512" in body["message"]


@pytest.mark.parametrize("raw, status", [
    (b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400), (b'{"messages": "hi"}', 422), (b"{}", 422),
    (b'{"messages": []}', 422), (b'{"messages": [{"role": "robot", "content": "hi"}]}', 422),
    (b'{"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}', 422),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 422),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 422),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 422),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    (b'{"messages": [{"role": "user", "content": "see <video> here"}]}', 400),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}', 404),
])
def test_malformed_requests_get_a_json_error(client, raw, status):
    error(client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), status)


@pytest.mark.parametrize("body", [{}, {"video": None}, {"image": "x", "labels": "affectnet"},
                                  {"image": "x", "labels": []}, {"image": "x", "labels": ["a", "a"]},
                                  {"image": "x", "extra": 1}])
def test_bad_emotion_requests_get_a_json_error(client, body):
    r = client.post("/v1/emotion", json=body)
    assert r.status_code in (400, 422)
    error(r, r.status_code)


def test_a_full_server_answers_503_with_retry_after(running, client):
    """8 requests are admitted at once: the rest of 14 simultaneous long ones get 503 and Retry-After."""
    body = chat_body("Count slowly.", max_tokens=48, ignore_eos=True)
    with concurrent.futures.ThreadPoolExecutor(14) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(14)))
    full = [r for r in answers if r.status_code == 503]
    assert full and all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in full)
    assert all(r.status_code == 200 for r in answers if r not in full)
    assert running.server.inflight == 0
