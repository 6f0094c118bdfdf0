"""The HTTP API and the page: FastAPI routes over ``emoqwen_jax.serve.server.Server``.

  GET  /healthz               200 {"status": "ok"} once loaded and compiled, 503 before
  GET  /v1/models             the one model (named after the checkpoint folder)
  POST /v1/chat/completions   OpenAI chat completions (text, image_url, video_url, input_audio; stream)
  POST /v1/emotion            label, class scores, gate weights, sampled frames, optional description
  GET  /metrics               Prometheus text
  GET  /                      the page (static files, no build step)
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from emoqwen_jax.infer.engine import Completion, SamplingParams
from emoqwen_jax.infer.gate_timeline import gate_over_time, group_times
from emoqwen_jax.serve import prompts
from emoqwen_jax.serve.media import Materialized, frame_times
from emoqwen_jax.serve.schema import ApiError, ChatRequest, EmotionRequest
from emoqwen_jax.serve.server import _DISCONNECT_POLL_S, Job, ServeConfig, Server, usage, wait_all

log = logging.getLogger("emoqwen_jax.serve")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/emotion")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# uvicorn's event loop and HTTP parser, both in C: with many streams on few cores, h11's pure-Python HTTP cut the
# 8-client throughput by up to a quarter (bench/RESULTS.md, Serving)
UVICORN_STACK = {"loop": "uvloop", "http": "httptools"}


def sse(obj: Any) -> str:
    """One server-sent event line pair: ``data: <json>`` (or a bare string such as ``[DONE]``)."""
    import json  # noqa: PLC0415

    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _gates(c: Completion) -> list[list[float]] | None:
    return None if c.gate_weights is None else np.asarray(c.gate_weights, np.float32).round(6).tolist()


def _timeline(session, prompt, frames: list[float]) -> dict | None:
    """``{"times": [s], "weights": [[w]]}``: the gate over the clip's temporal patch groups (None without a gate
    or a clip)."""
    weights = gate_over_time(session, prompt)
    if weights is None:
        return None
    return {"times": group_times(frames, len(weights)), "weights": weights.round(6).tolist()}


async def _events(request: Request, queue: asyncio.Queue, jobs: list[Job]) -> AsyncIterator[tuple[str, str | None]]:
    """Yields the jobs' ``(tag, delta | None)`` items until all have finished; a gone client cancels them.
    Deltas of one tag already queued one after another come joined: when the event loop runs behind the engine
    (many streams on few cores) a stream sends one chunk per turn of the loop instead of one per token."""
    open_jobs, held = len(jobs), None
    while open_jobs:
        if held is not None:
            (tag, delta), held = held, None
        else:
            try:  # what is queued already is taken without wait_for's task per item (one per streamed token)
                tag, delta = queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    tag, delta = await asyncio.wait_for(queue.get(), timeout=_DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ConnectionError("the client went away") from None
                    continue
        while delta is not None and not queue.empty():
            following = queue.get_nowait()
            if following[0] != tag or following[1] is None:
                held = following
                break
            delta += following[1]
        open_jobs -= delta is None
        yield tag, delta


class ClosingStream(StreamingResponse):
    """A streamed response that closes its generator however the response ends (a client that hangs up
    makes the send fail and leaves the generator suspended): the generator's cleanup cancels its jobs."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def add_routes(app: FastAPI, server: Server) -> None:
    config = server.config

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if server.ready:
            return JSONResponse({"status": "ok"})
        status = "error" if server.load_error else "loading"
        return JSONResponse({"status": status, "detail": server.load_error}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        server.check_key(request)
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.check_key(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "emoqwen_jax", "max_model_len": config.max_len}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        server.check_key(request)
        server.check_ready()
        body: ChatRequest = await server.read_json(request, ChatRequest)
        if body.model not in (None, "", server.model_name):
            raise ApiError(404, f"model {body.model!r} is not served; this server serves {server.model_name!r}",
                           "model_not_found")
        server.admit()
        released = False
        try:
            def build():
                with Materialized(config.media_root, config.max_bytes) as media:
                    turns = prompts.chat_turns(body, media)
                    return prompts.build_prompts(server.session, [turns], media.items)[0]

            prompt = await server.prepare(build, inline=prompts.short_text_only(body))
            params = prompts.chat_params(body, len(prompt.input_ids), config.max_len)
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if not body.stream:
                (done,) = await wait_all(request, server.submit([(prompt, params, "")]))
                return JSONResponse({
                    "id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                 "finish_reason": _finish(done)}],
                    "usage": usage(done)})
            queue: asyncio.Queue = asyncio.Queue()
            (job,) = server.submit([(prompt, params, "")], queue)
            server.release_after([job])
            released = True
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return ClosingStream(_chat_stream(request, server, job, queue, rid, created, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
        finally:
            if not released:
                server.release()

    @app.post("/v1/emotion")
    async def emotion(request: Request) -> Response:
        server.check_key(request)
        server.check_ready()
        body: EmotionRequest = await server.read_json(request, EmotionRequest)
        classes = prompts.Classes.of(server.session, body.labels)
        refs = prompts.emotion_media(body)
        server.admit()
        released = False
        try:
            def build():
                with Materialized(config.media_root, config.max_bytes) as media:
                    for kind, url in refs:
                        media.add_url(kind, url)
                    noun = refs[0][0]
                    questions = [prompts.emotion_question(body.labels, classes.words, noun)]
                    if body.describe:
                        questions.append(prompts.describe_question(noun))
                    built = prompts.question_prompts(server.session, questions, media.items, body.subtitle)
                    video = [path for kind, path in media.items if kind == "video"]
                    frames = frame_times(video[0], server.session.data) if video else []
                    timeline = _timeline(server.session, built[0], frames) if body.gate_timeline else None
                    return built, frames, timeline

            (cls_prompt, *desc_prompt), frames, timeline = await server.prepare(build)
            work = [(cls_prompt, classes.params(), "scores")]
            for p in desc_prompt:  # the description gets what --max_len leaves (the engine refuses less than 1)
                room = max(1, config.max_len - len(p.input_ids))
                work.append((p, SamplingParams(max_tokens=min(body.max_tokens, room)), "description"))

            def scored(c: Completion) -> dict:
                label, scores = classes.result(c.first_scores, c.text)
                out = {"label": label, "scores": scores, "answer": c.text, "gate_weights": _gates(c)}
                return out if timeline is None else {**out, "gate_timeline": timeline}

            if not body.stream:
                jobs = server.submit(work)
                done = await wait_all(request, jobs)
                out = {"object": "emotion", "model": server.model_name, **scored(done[0]), "frames": frames}
                if body.describe:
                    out["description"] = done[1].text
                out["usage"] = usage(*done)
                return JSONResponse(out)
            queue: asyncio.Queue = asyncio.Queue()
            jobs = server.submit(work, queue)
            server.release_after(jobs)
            released = True
            return ClosingStream(_emotion_stream(request, server, jobs, queue, frames, scored),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
        finally:
            if not released:
                server.release()


def _finish(c: Completion) -> str:
    return "stop" if c.finish_reason == "stop" else "length"


async def _chat_stream(request: Request, server: Server, job: Job, queue: asyncio.Queue, rid: str, created: int,
                       include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunks: the role, then the deltas as they come (tokens queued together join into one), a last
    delta reconciling with the final text (stop strings are cut from it), the finish reason, optionally usage,
    then [DONE]."""
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    sent = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for _, delta in _events(request, queue, [job]):
            if delta is not None:
                sent += delta
                yield chunk({"content": delta})
        done = await job.completion()
        if done.text.startswith(sent) and len(done.text) > len(sent):
            yield chunk({"content": done.text[len(sent):]})
        elif not done.text.startswith(sent):
            log.warning("streamed text %r is not a prefix of the final text %r", sent, done.text)
        yield chunk({}, _finish(done))
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(done)})
        yield sse("[DONE]")
    except ApiError as err:
        yield sse(err.body())
        yield sse("[DONE]")
    finally:
        job.cancel()


async def _emotion_stream(request: Request, server: Server, jobs: list[Job], queue: asyncio.Queue,
                          frames: list[float], scored) -> AsyncIterator[str]:
    """Events: ``emotion.frames`` at once, ``emotion.scores`` when the answer is scored, ``emotion.delta``
    per description token (tokens queued together join into one), ``emotion.done`` with the whole description
    and usage, then [DONE]."""
    sent = ""
    try:
        yield sse({"object": "emotion.frames", "frames": frames})
        async for tag, delta in _events(request, queue, jobs):
            if tag == "scores" and delta is None:
                yield sse({"object": "emotion.scores", **scored(await jobs[0].completion())})
            elif tag == "description" and delta is not None:
                sent += delta
                yield sse({"object": "emotion.delta", "delta": delta})
        done = [await job.completion() for job in jobs]
        end = {"object": "emotion.done", "usage": usage(*done)}
        if len(done) > 1:
            end["description"] = done[1].text
        yield sse(end)
        yield sse("[DONE]")
    except ApiError as err:
        yield sse(err.body())
        yield sse("[DONE]")
    finally:
        for job in jobs:
            job.cancel()


class CountRequests:
    """Counts answered requests by endpoint and status (a plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` would hide a client's disconnect from the endpoints)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.server.metrics.requests.labels(endpoint, str(status[0])).inc()


def create_app(config: ServeConfig, *, load: bool = True) -> FastAPI:
    """The app; with ``load`` its start-up loads the checkpoint on a thread (``/healthz`` says when done)."""
    server = Server(config)

    async def lifespan(app: FastAPI):
        if load:
            threading.Thread(target=server.load, name="serve-load", daemon=True).start()
        yield
        server.close()

    app = FastAPI(title="emoqwen-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    add_routes(app, server)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=err)  # a bug: 500, the server stays up
        return JSONResponse(ApiError(500, "internal error", "internal_error").body(), status_code=500)

    app.add_middleware(CountRequests, server=server)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(os.path.join(STATIC, "index.html"))

    return app


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves until interrupted (the ``emoqwen-serve`` command)."""
    import uvicorn  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                **UVICORN_STACK)
