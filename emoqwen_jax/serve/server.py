"""The server's state over one generation engine (``emoqwen_jax.infer.engine``), and the request plumbing.

Start-up: uvicorn listens at once; a loader thread reads the checkpoint, starts the engine and compiles the
common shapes with warm-up requests (every prefill row count of text at each length bucket, an image, a
clip). ``/healthz`` answers 503 until then and every API call 503 with ``Retry-After``.

A request: bearer check -> body read under the upload limit -> JSON -> schema -> admission (at most
``4 x max_batch`` requests in flight, else 503) -> media resolved and prompts built on a worker thread (so
decoding overlaps the engine's device work) -> engine.submit -> the answer, or server-sent events fed by the
engine's per-token callback. A client that goes away cancels its requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError

from emoqwen_jax.data.manifests import _has_surrogates  # the manifests' own check of JSON text
from emoqwen_jax.data.reasons import Rejected
from emoqwen_jax.infer.engine import Completion, Engine, QueueFull, SamplingParams
from emoqwen_jax.infer.session import Prompt, Session, pixel_range_warning
from emoqwen_jax.runtime import storage
from emoqwen_jax.serve import prompts
from emoqwen_jax.serve.metrics import Metrics, TokenClock
from emoqwen_jax.serve.schema import ApiError

log = logging.getLogger("emoqwen_jax.serve")
_DISCONNECT_POLL_S = 0.1  # how often a waiting request checks that its client is still there


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What ``emoqwen-serve`` takes (see its --help); ``data``: data-setting overrides (``--set``)."""

    ckpt: str
    max_batch: int = 8
    max_len: int = 4096
    media_root: str | None = None
    api_key: str | None = None
    max_upload_mb: float = 64.0
    data: dict = dataclasses.field(default_factory=dict)
    dtype: str | None = None
    warmup: bool = True
    max_inflight: int | None = None  # requests admitted at once (None: 4 x max_batch); more get 503
    decode_steps: int = 1  # tokens per slot that one decode call draws (Engine's decode_steps)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_len < 16 or not self.max_upload_mb > 0 or self.decode_steps < 1:
            raise ValueError(f"--max_batch {self.max_batch} (>= 1), --max_len {self.max_len} (>= 16), "
                             f"--max_upload_mb {self.max_upload_mb} (> 0) or --decode_steps {self.decode_steps} "
                             f"(>= 1) is out of range")
        if not storage.isdir(self.ckpt):
            raise FileNotFoundError(f"--ckpt {self.ckpt} is not a directory")
        if self.media_root is not None and not os.path.isdir(self.media_root):
            raise FileNotFoundError(f"--media_root {self.media_root} is not a directory")

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def admitted(self) -> int:
        return self.max_inflight or 4 * self.max_batch


class Server:
    """The state behind the app: session, engine, metrics, worker pools and the admission count."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.model_name = os.path.basename(os.path.normpath(config.ckpt)) or "emoqwen"
        self.session: Session | None = None
        self.engine: Engine | None = None
        self.ready = False
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine is not None else {})
        self.prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="serve-media")
        self.inflight = 0
        self.live: set[Job] = set()  # jobs not finished yet (cancelled at shutdown)
        self._lock = threading.Lock()
        self._mailbox: LoopMailbox | None = None

    # ---- start-up -----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Reads the checkpoint, starts the engine, compiles the common shapes; sets ``ready``."""
        try:
            t0 = time.perf_counter()
            overrides = {**self.config.data, "max_length": self.config.max_len}
            self.session = Session.from_checkpoint(self.config.ckpt, overrides, dtype=self.config.dtype)
            warning = pixel_range_warning(self.session)
            if warning:  # answers at frame sizes the checkpoint never saw are poor: say so, with the fix
                log.warning("%s", warning)
            self.engine = Engine(self.session, max_batch=self.config.max_batch, max_len=self.config.max_len,
                                 decode_steps=self.config.decode_steps)
            self.engine.start()
            if self.config.warmup:
                self._warm_up()
            self.ready = True
            log.info("ready: %s, %d slots of %d tokens, in %.1f s", self.config.ckpt, self.config.max_batch,
                     self.config.max_len, time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 — reported by /healthz and the log, the process stays up
            self.load_error = f"{type(err).__name__}: {err}"
            log.exception("loading %s failed", self.config.ckpt)

    def _warm_up(self) -> None:
        """Compiles every prefill row count of each common prompt kind (text of every length bucket; an image
        and a clip when the model sees; ``Engine.warmup``), so neither the first users nor a burst of
        concurrent ones wait for compilation."""
        from emoqwen_jax.data.demo import draw_face, write_clip  # noqa: PLC0415

        text = self.session.prompt(prompts.emotion_question("dfew", prompts.Classes.of(self.session, "dfew").words,
                                                            "video")).input_ids
        for length in sorted({min(b, self.engine.max_len - 2) for b in self.engine.length_buckets}):
            self.engine.warmup(Prompt(np.resize(text, length).astype(np.int32), {}))  # its tokens repeated

        with tempfile.TemporaryDirectory(prefix="emoqwen_warmup_") as tmp:
            media = [[]]
            if self.session.model.config.vision is not None:
                from PIL import Image  # noqa: PLC0415

                Image.fromarray(draw_face(96, 128, "happy", cx=0.5, cy=0.5, hue=0)).save(f"{tmp}/face.png")
                write_clip(f"{tmp}/clip.mp4", 0, "happy")
                media += [[("image", f"{tmp}/face.png")], [("video", f"{tmp}/clip.mp4")]]
            classes = prompts.Classes.of(self.session, "dfew")
            handles = []
            for items in media:
                prompt = self.session.prompt(prompts.emotion_question("dfew", classes.words, "video"), items)
                self.engine.warmup(prompt)
                handles.append(self.engine.submit(prompt, classes.params()))
            for handle in handles:
                handle.result()

    def close(self, grace_s: float = 10.0) -> None:
        """Cancels what is in flight (so no waiter thread blocks the exit), then stops the engine."""
        if self.engine is not None:
            for job in list(self.live):
                job.cancel()
            deadline = time.monotonic() + grace_s
            # The handles, not ``live``: this runs on the event loop, which cannot deliver the endings meanwhile.
            while any(not job.handle.done() for job in list(self.live)) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.engine.stop()
        self.prep.shutdown(wait=False, cancel_futures=True)

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        """The one mailbox from the engine's thread to ``loop`` (the server's event loop)."""
        with self._lock:
            if self._mailbox is None or self._mailbox.loop is not loop:
                self._mailbox = LoopMailbox(loop)
            return self._mailbox

    # ---- per request --------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), self.config.api_key.encode())
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})

    def check_ready(self) -> None:
        if not self.ready:
            why = f"loading failed: {self.load_error}" if self.load_error else "the model is loading"
            raise ApiError(503, why, "not_ready", {"Retry-After": "5"})

    async def read_json(self, request: Request, schema: type[BaseModel]) -> Any:
        """The body (at most ``--max_upload_mb``, counted while reading) parsed and validated."""
        limit = self.config.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _too_large(limit) if declared.isdigit() else ApiError(400, "bad Content-Length", "bad_request")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
        try:
            data = json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}", "malformed_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", "malformed_json")
        if _has_surrogates(data):  # lone surrogates from JSON escapes
            raise ApiError(400, "text that is not valid UTF-8 (a lone surrogate escape)", "non_utf8")
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:8])
            raise ApiError(422, f"invalid request: {details}", "invalid_request") from None

    def admit(self) -> None:
        with self._lock:
            if self.inflight >= self.config.admitted:
                raise ApiError(503, f"the server is full ({self.inflight} requests in flight)", "queue_full",
                               {"Retry-After": "1"})
            self.inflight += 1

    def release(self) -> None:
        with self._lock:
            self.inflight -= 1

    def release_after(self, jobs: list[Job]) -> None:
        """Ends the admission when every job has finished (they always do: stop, length, cancelled or
        error), whatever becomes of the response that streams them."""
        left = [len(jobs)]

        def one_done(_) -> None:
            left[0] -= 1
            if left[0] == 0:
                self.release()

        for job in jobs:
            job.future.add_done_callback(one_done)

    async def prepare(self, fn: Callable[[], Any], inline: bool = False) -> Any:
        """Runs ``fn`` (media and prompt building) on a worker thread, or on the event loop when ``inline`` (a
        short text-only prompt: no thread hop there and back), mapping bad input to API errors."""
        try:
            return fn() if inline else await asyncio.get_running_loop().run_in_executor(self.prep, fn)
        except Rejected as err:
            if err.reason == "too_long":
                raise ApiError(400, f"too_long: the prompt is longer than the server's --max_len of "
                                    f"{self.config.max_len} tokens ({err.detail})", "too_long") from None
            raise ApiError(400, f"{err.reason}: {err.detail}", err.reason) from None
        except FileNotFoundError as err:
            raise ApiError(400, f"missing_file: {err}", "missing_file") from None
        except ValueError as err:  # e.g. audio for a checkpoint without an audio encoder
            raise ApiError(400, str(err), "unsupported_input") from None

    def submit(self, requests: list[tuple[Prompt, SamplingParams, str]], queue: asyncio.Queue | None = None
               ) -> list[Job]:
        """One job per (prompt, params, tag); if one cannot be submitted, those before it are cancelled."""
        jobs: list[Job] = []
        try:
            for prompt, params, tag in requests:
                jobs.append(Job(self, prompt, params, queue, tag))
        except ApiError:
            for job in jobs:
                job.cancel()
            raise
        return jobs


class LoopMailbox:
    """Calls from the engine's thread to the event loop, one wake-up per batch.

    ``post(fn, arg)`` queues ``fn(arg)``; the first post after a delivery schedules one ``deliver`` on the
    loop, which runs everything posted until then, in order. (One ``call_soon_threadsafe`` per streamed token
    wakes the loop, through its self-pipe, once per row and token: 8 times a decode step with 8 streams.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._posted: list[tuple[Callable[[Any], None], Any]] = []

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        with self._lock:
            self._posted.append((fn, arg))
            if len(self._posted) > 1:  # a delivery is scheduled and has not taken the list yet
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed (shutdown): nobody is left to read it
            pass

    def _deliver(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, []
        for fn, arg in posted:
            try:
                fn(arg)
            except Exception:  # one reader's failure must not stop the others' deliveries
                log.exception("delivering to the event loop failed")


class Job:
    """One engine request seen from the event loop: ``future`` resolves to its Completion; with a ``queue``,
    ``(tag, text_delta)`` items arrive as tokens are generated and ``(tag, None)`` when it is finished. Tokens
    and the ending come through the server's mailbox, in the order the engine made them."""

    def __init__(self, server: Server, prompt: Prompt, params: SamplingParams, queue: asyncio.Queue | None,
                 tag: str):
        loop = asyncio.get_running_loop()
        self.server, self.clock = server, TokenClock()
        mailbox = server.mailbox(loop)

        def on_token(token_id: int, delta: str) -> None:  # the engine's thread
            self.clock.tick()
            if queue is not None and delta:
                mailbox.post(queue.put_nowait, (tag, delta))

        limit = server.config.max_len
        try:
            self.handle = server.engine.submit(prompt, params, on_token=on_token)
        except QueueFull:
            raise ApiError(503, "the engine's queue is full", "queue_full", {"Retry-After": "1"}) from None
        except ValueError as err:
            raise ApiError(400, f"too_long: {err} (the server's --max_len is {limit})", "too_long") from None
        self.future: asyncio.Future = loop.create_future()
        server.live.add(self)
        self.future.add_done_callback(self._finished)
        if queue is not None:
            self.future.add_done_callback(lambda _: queue.put_nowait((tag, None)))
        self.handle.add_done_callback(lambda done: mailbox.post(self._resolve, done))

    def _resolve(self, done: Completion) -> None:
        if not self.future.done():
            self.future.set_result(done)

    def cancel(self) -> None:
        if not self.handle.done():
            self.handle.cancel()

    def _finished(self, future: asyncio.Future) -> None:
        self.server.live.discard(self)
        if not future.cancelled() and future.exception() is None:
            done = future.result()
            self.clock.record(self.server.metrics, done.prompt_tokens, len(done.token_ids))

    async def completion(self) -> Completion:
        done = await self.future
        if done.finish_reason == "error":
            raise ApiError(500, f"generation failed: {done.error}", "engine_error")
        return done


async def wait_all(request: Request, jobs: list[Job]) -> list[Completion]:
    """The jobs' completions; a client that disconnects first cancels them (frees their slots)."""
    pending = {job.future for job in jobs}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=_DISCONNECT_POLL_S)
        if pending and await request.is_disconnected():
            for job in jobs:
                job.cancel()
    return [await job.completion() for job in jobs]


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is over the upload limit of {limit} bytes (--max_upload_mb)", "too_large")


def usage(*completions: Completion) -> dict[str, int]:
    p = sum(c.prompt_tokens for c in completions)
    g = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}
