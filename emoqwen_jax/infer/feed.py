"""Many questions through one engine, in order: prompts are built by a host thread pool while the engine runs
earlier ones (media decoding overlaps device work), and each request joins the engine as soon as its prompt
is ready (continuous batching: no static batches waiting for their longest row).

The cache length (``max_len``) is sized from the prompts seen so far (the next 64 · 2^k that holds the
longest prompt + ``max_tokens``); a longer prompt later lets the engine drain and starts a larger one.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Callable, Iterator, Sequence

from emoqwen_jax.infer.engine import Completion, Engine, SamplingParams
from emoqwen_jax.infer.session import Prompt, Session

Job = tuple[str, Sequence[tuple[str, str]], str | None]  # (user text, [(kind, path)], subtitle or None)


def cache_length(tokens: int) -> int:
    """The engine length for ``tokens`` (prompt + budget): the next 64 · 2^k."""
    length = 64
    while length < tokens:
        length *= 2
    return length


def complete_in_order(session: Session, jobs: Sequence[Job], params: Callable[[int], SamplingParams], *,
                      max_batch: int, workers: int | None = None, engine_kwargs: dict | None = None
                      ) -> Iterator[tuple[int, Completion | Exception]]:
    """Yields (index, Completion) per job in order, or (index, the exception) when its prompt could not be
    built (e.g. ``data.reasons.Rejected`` for unreadable media). ``params(i)``: job i's sampling settings.
    ``workers``: prompt-building threads (default: one per CPU core, at most 4; more only contend for the
    cores with the engine)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    lookahead = 2 * max_batch + workers
    # Evaluation wants throughput: one prefill may take every free slot (the engine's default is tuned for a
    # server's time to first token).
    engine_kwargs = {"prefill_batch": max_batch, **(engine_kwargs or {})}
    prompts: dict[int, concurrent.futures.Future] = {}
    handles: dict = {}
    engine: Engine | None = None
    queued = 0  # jobs handed to the pool so far
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="emoqwen-prompt") as pool:
        try:
            for i in range(len(jobs)):
                while True:
                    while queued < min(len(jobs), i + lookahead):
                        text, media, subtitle = jobs[queued]
                        prompts[queued] = pool.submit(session.prompt, text, list(media), subtitle)
                        queued += 1
                    for j in sorted(prompts):  # submit every ready prompt (in order), keep the engine fed
                        if j in handles or not prompts[j].done() or prompts[j].exception() is not None:
                            continue
                        engine = _room_for(engine, session, prompts[j].result(), params(j), handles, max_batch,
                                           engine_kwargs)
                        handles[j] = engine.submit(prompts[j].result(), params(j))
                    if prompts[i].done() and prompts[i].exception() is not None:
                        yield i, prompts.pop(i).exception()
                        break
                    if i in handles and handles[i].done():
                        prompts.pop(i)
                        yield i, handles.pop(i).result()
                        break
                    time.sleep(0.002)
        finally:
            if engine is not None:
                for h in handles.values():
                    h.cancel()
                engine.stop()


def _room_for(engine: Engine | None, session: Session, prompt: Prompt, params: SamplingParams, handles: dict,
              max_batch: int, kwargs: dict) -> Engine:
    """``engine``, or a new one with a cache long enough for ``prompt`` (the old one finishes its requests
    first)."""
    need = len(prompt.input_ids) + params.max_tokens
    if engine is not None and need <= engine.max_len:
        return engine
    if engine is not None:
        for h in list(handles.values()):
            h.result()
        engine.stop()
    engine = Engine(session, max_batch=max_batch, max_len=cache_length(max(need, 2)), **kwargs)
    engine.warmup(prompt, params)  # every prefill row count compiles now, not in the middle of the run
    engine.start()
    return engine
