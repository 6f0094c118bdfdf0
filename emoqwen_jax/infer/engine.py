"""A continuous-batching generation engine: ``max_batch`` decode slots over one static KV cache.

  engine = Engine(session, max_batch=8, max_len=2048)
  done = engine.generate([session.prompt("How does she feel?", [("video", "clip.mp4")])],
                         SamplingParams(max_tokens=64))
  engine.start(); handle = engine.submit(prompt, SamplingParams(temperature=0.7, seed=1), on_token=print)

The loop (one thread: ``start``'s, or the caller's inside ``generate``) repeats:
  1. drop cancelled requests (a live one's slot is free from here on);
  2. if requests wait and slots are free: ONE prefill of up to ``prefill_batch`` waiting prompts (arrival
     order), written into free slots; their first token is drawn from the prefill's logits;
  3. one decode call that advances every live slot by one token, or by ``decode_steps`` tokens (several steps
     in one compiled loop); finished slots are free for the next round. The call is queued on the device first
     and the previous call's tokens are read back after it (one call in flight; the previous tokens feed it on
     the device), then this round's prefill (its first tokens feed the call on the device too), so the host's
     work on the tokens (detokenising, callbacks, the next inputs) overlaps the device's next call.
So a request that arrives waits at most for the running decode call, and the live requests are never held
up by more than one prefill between two of their calls (the interleaving policy).

Compiled shapes stay few (``engine_steps`` holds the device functions): the decode call has one shape per
``length_buckets`` entry, the cache columns its attention reads (the bucket that holds the longest live row's
last column), and per step count (1, and ``decode_steps``), each in two variants (all-greedy, or with sampled
rows); a prefill's shape is (rows, length, patches, items, audio
windows), each padded to a bucket: rows to a power of two <= ``prefill_batch``, length to ``length_buckets``
(64 · 2^k, and ``max_len``), patch rows to ``patch_buckets`` (256 · 2^k and 384 · 2^k) and items to a power of
two (both counted as if the padding rows held prompts like the real ones), audio windows to the checkpoint's
window buckets (else a multiple of 8), plus the ViT's ``layout.local_blocks`` (which block sizes hold the
batch's windows and frames whole: one value per kind of image). ``warmup`` compiles every row count of one kind
of prompt, and the decode call at every column bucket and step count, up front.

Greedy output equals ``emoqwen_jax.infer.generate`` for the prompt alone whatever else is in flight (each row
of every computation depends on its own inputs only); see ``engine_steps`` for the sampling streams.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import threading
import uuid
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from emoqwen_jax import layout
from emoqwen_jax.infer import engine_steps as steps
from emoqwen_jax.infer.detokenize import Detokenizer
from emoqwen_jax.infer.generate import batch_vision, check_sampling
from emoqwen_jax.infer.session import Prompt, Session, pad_audio_windows
from emoqwen_jax.model.emotion_qwen import layout_spec

log = logging.getLogger(__name__)
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class _Graph:
    """A model's graph definition and the tree structure of its state, as a jit static argument with its hash
    computed once: nnx's ``GraphDef`` hashes its whole tree on every call, and flattening an ``nnx.State`` (one
    pytree node per variable, sorted keys) on every call costs as much host time as a small model's decode step
    computes, so the steps take the state's leaves as a flat list and rebuild the state inside the trace."""

    __slots__ = ("graphdef", "state_def", "_hash")

    def __init__(self, graphdef, state_def):
        self.graphdef, self.state_def, self._hash = graphdef, state_def, hash((graphdef, state_def))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return (isinstance(other, _Graph) and self.state_def == other.state_def and
                (self.graphdef is other.graphdef or self.graphdef == other.graphdef))


def _on_graph(fn):
    """``fn(graphdef, state, ...)`` called as ``(graph: _Graph, state leaves: list, ...)``."""

    @functools.wraps(fn)
    def call(graph: _Graph, leaves: list, *args, **kwargs):
        return fn(graph.graphdef, jax.tree.unflatten(graph.state_def, leaves), *args, **kwargs)

    return call


# Module level: engines over the same model (equal graph definitions) share the compiled functions.
_JIT_PREFILL = jax.jit(_on_graph(steps.prefill_into), static_argnums=(0,),
                       static_argnames=("any_sampled", "vision_blocks"),
                       donate_argnums=(2,))
_JIT_DECODE = jax.jit(_on_graph(steps.decode_step), static_argnums=(0,),
                      static_argnames=("any_sampled", "visible", "steps"), donate_argnums=(2,))


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (``max_queue``); try again later."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings (vLLM's names; ``min_tokens`` and ``ignore_eos`` as vLLM defines them).

    ``stop``: strings that end the text (not included); ``stop_token_ids``: ids that end it (not included, like
    EOS); ``seed``: None = derived from the engine's seed and the request's arrival number. ``logprobs``: record
    log p(token) under the temperature-scaled logits (before top-p/top-k). ``score_token_ids``: also return the
    log-softmax over these ids at the first generated position (class scores)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    score_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        check_sampling(self.temperature, self.top_p, self.top_k)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")


@dataclasses.dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    logprobs: list[float] | None
    first_scores: list[float] | None
    gate_weights: np.ndarray | None  # float32[items, experts] (paper mode: a compressor with a gate)
    error: str | None = None
    # The id that ended the request and its log-prob under the temperature-scaled logits: an EOS or stop id
    # (not in token_ids), or the token that completed a stop string (token_ids' last); None when it ran out of
    # max_tokens, was cancelled or failed.
    end_token_id: int | None = None
    end_logprob: float | None = None


class RequestHandle:
    def __init__(self, request_id: str, engine: "Engine"):
        self.request_id = request_id
        self._engine, self._event, self._completion = engine, threading.Event(), None
        self._callbacks: list[Callable[[Completion], None]] | None = []  # None once finished
        self._callbacks_lock = threading.Lock()

    def result(self, timeout: float | None = None) -> Completion:
        """Blocks until the request finishes (TimeoutError after ``timeout`` seconds)."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._completion

    def cancel(self) -> None:
        """Ends the request with finish_reason 'cancelled'; its slot is free at the next step."""
        self._engine._cancel(self.request_id)

    def add_done_callback(self, fn: Callable[[Completion], None]) -> None:
        """Calls ``fn(completion)`` when the request finishes: on the engine's thread, or at once on this one if
        it has finished already. (A caller that waits on many requests needs no thread blocked in ``result``.)"""
        with self._callbacks_lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        fn(self._completion)

    def done(self) -> bool:
        return self._event.is_set()

    def _finish(self, completion: Completion) -> None:
        self._completion = completion
        self._event.set()
        with self._callbacks_lock:
            callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks:
            try:
                fn(completion)
            except Exception:  # a caller's callback must not take the engine down
                log.exception("done callback of request %s failed", self.request_id)


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    on_token: Callable[[int, str], None] | None
    handle: RequestHandle
    seed: int
    end_ids: frozenset  # ids that finish it (not part of the output)
    detok: Detokenizer
    slot: int = -1
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    first_scores: list | None = None
    gate_weights: np.ndarray | None = None
    drawn: int = 0  # tokens drawn so far (an ending id included)
    length0: int = 0  # prompt tokens: the first generated token goes to cache column length0
    position0: int = 0  # the first generated token's M-RoPE position (prompt maximum + 1)
    end_token_id: int | None = None  # the id that ended it (Completion.end_token_id)
    end_logprob: float | None = None


def _ladder(bases: Sequence[int], limit: int) -> tuple[int, ...]:
    """base · 2^k for every base, up to ``limit`` (inclusive), sorted."""
    out = {b << k for b in bases for k in range(40) if b << k <= limit}
    return tuple(sorted(out))


def _fit(n: int, buckets: Sequence[int], step: int) -> int:
    fits = [b for b in buckets if b >= n]
    return min(fits) if fits else -(-n // step) * step


class Engine:
    def __init__(self, session: Session, *, max_batch: int = 8, max_len: int = 2048, mesh=None, seed: int = 0,
                 prefill_batch: int = 4, max_queue: int = 4096, eos_ids: Sequence[int] | None = None,
                 decode_steps: int = 1):
        """``prefill_batch``: most prompts one prefill takes; ``max_queue``: most waiting requests (then
        ``submit`` raises QueueFull); ``eos_ids``: the ids that end a request unless ``ignore_eos`` (default:
        the tokenizer's ``<|im_end|>``/``<|endoftext|>``); ``mesh``: shard the weights (logical-axis rules) and
        the KV cache (slots over the batch axes, KV heads over 'tensor') over it; ``decode_steps``: tokens per
        slot that one decode call draws (vLLM's multi-step scheduling): the host's cost per call is paid once
        for that many tokens, and waiting prompts join between calls."""
        if max_batch < 1 or max_len < 2 or prefill_batch < 1 or decode_steps < 1:
            raise ValueError(f"need max_batch >= 1, max_len >= 2, prefill_batch >= 1, decode_steps >= 1; got "
                             f"{max_batch}, {max_len}, {prefill_batch}, {decode_steps}")
        self.session, self.max_batch, self.max_len, self.mesh = session, int(max_batch), int(max_len), mesh
        self.seed, self.prefill_batch, self.max_queue = int(seed), min(int(prefill_batch), self.max_batch), max_queue
        self.decode_steps = int(decode_steps)
        self.vocab = session.model.config.text.vocab_size
        self.eos_ids = tuple(int(i) for i in (session.info.stop_ids if eos_ids is None else eos_ids))
        self.pad_id = int(session.info.pad_id)
        self.length_buckets = _ladder((64,), self.max_len) + (self.max_len,)
        self.patch_buckets = _ladder((256, 384), 1 << 24)
        self._graphdef, state = nnx.split(session.model)
        self._graph = _Graph(self._graphdef, jax.tree.structure(state))
        spec = steps.cache_spec(session.model, self.max_batch, self.max_len)
        if mesh is None:
            self._set_state(state)
            # Committed to the weights' device like the step outputs that replace it, so the first prefill
            # compiles the same executable as the later ones (an uncommitted cache would compile twice).
            device = getattr(jax.tree.leaves(state)[0], "sharding", None) or jax.local_devices()[0]
            self._cache = jax.tree.map(lambda s: jax.device_put(jax.numpy.zeros(s.shape, s.dtype), device), spec)
            carried = jax.device_put(np.zeros(self.max_batch, np.int32), device)
        else:
            from emoqwen_jax.parallel.rules import param_shardings  # noqa: PLC0415

            self._set_state(jax.device_put(state, param_shardings(state, mesh)))
            sharding = steps.cache_sharding(mesh, spec, self.max_batch)
            self._cache = jax.tree.map(lambda s: jax.device_put(jax.numpy.zeros(s.shape, s.dtype), sharding), spec)
            carried = jax.device_put(np.zeros(self.max_batch, np.int32),
                                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self._lock = threading.Lock()  # guards the queue, the cancel set and the counters
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cancelled: set[str] = set()
        self._slots: list[_Request | None] = [None] * self.max_batch
        self._serial = itertools.count()
        self._step_lock = threading.Lock()  # one loop at a time (background thread or generate's caller)
        self._thread: threading.Thread | None = None
        self._running = False
        self._wake = threading.Condition(self._lock)
        self._counts = collections.Counter()
        self._shapes: set[tuple] = set()
        # The decode call queued on the device and not read back yet: (tokens, log-probs, the request of each
        # slot it advanced, its step count). Its last tokens feed the next call on the device, so the host's work
        # for one call (reading tokens, detokenising, callbacks, the next inputs) overlaps the device's next call.
        self._inflight: tuple | None = None
        self._prefilled: list[tuple] = []  # this round's prefills, queued and not read back: (requests, outputs)
        self._carried = carried  # the last decode call's last tokens (the ``carried`` input of the next one)

    # ---- public ----------------------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: SamplingParams, *, request_id: str | None = None,
               on_token: Callable[[int, str], None] | None = None) -> RequestHandle:
        """Queues one request. ValueError when the prompt + ``max_tokens`` exceed ``max_len``; QueueFull when
        ``max_queue`` requests already wait."""
        self.check(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        handle = RequestHandle(request_id, self)
        serial = next(self._serial)
        seed = params.seed if params.seed is not None else (self.seed * 1_000_003 + serial) % (1 << 31)
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        req = _Request(request_id, prompt, params, on_token, handle, int(seed) % (1 << 32), frozenset(ends),
                       Detokenizer(self.session.decode, params.stop))
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests wait (max_queue={self.max_queue})")
            self._waiting.append(req)
            self._counts["submitted"] += 1
            self._wake.notify_all()
        return handle

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """Submits every prompt, runs until all finish (in this thread unless ``start`` runs the loop), returns
        the completions in prompt order."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for p, s in zip(prompts, params, strict=True):  # all or nothing: no request starts when one cannot
            self.check(p, s)
        pending = collections.deque(zip(prompts, params, strict=True))
        handles = []
        while pending or not all(h.done() for h in handles):
            while pending:  # more prompts than max_queue: the rest go in as the queue drains
                try:
                    handles.append(self.submit(*pending[0]))
                except QueueFull:
                    break
                pending.popleft()
            if self._thread is None:
                self.step()
            elif handles:
                handles[-1 if pending else 0]._event.wait(0.01)
        return [h.result() for h in handles]

    def warmup(self, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Compiles, before any traffic, what prompts like ``prompt`` will need: the prefill of 1, 2, 4, …,
        ``prefill_batch`` copies of it and the decode step (greedy, or sampled when ``params`` samples), so
        that no compilation stalls a later round: the prefills by throw-away requests, the decode call at every
        visible length and step count by throw-away calls. Call it while the loop is idle."""
        temperature = 0.0 if params is None else params.temperature
        room = self.max_len - len(prompt.input_ids)  # a prompt that fills the cache but one column: no decode
        probe = SamplingParams(max_tokens=max(1, min(2, room)), temperature=temperature, ignore_eos=True, seed=0)
        self.check(prompt, probe)
        for n in sorted({min(1 << k, self.prefill_batch) for k in range(self.prefill_batch.bit_length() + 1)}):
            self.generate([prompt] * n, probe)  # n copies: a prefill of n rows padded to the next power of two
        self._warm_decode(temperature > 0)

    def _warm_decode(self, sampled: bool) -> None:
        """Compiles the decode call (each step count it runs) at every visible length (``length_buckets``) with
        throw-away calls that write past the cache's end (scatter drops them), so the slots' columns are left as
        they were."""
        b, far = self.max_batch, np.full(self.max_batch, self.max_len, np.int32)
        with self._step_lock, self._rules():
            for visible, n in itertools.product(self.length_buckets, sorted({1, self.decode_steps})):
                *_, self._cache = _JIT_DECODE(self._graph, self._leaves, self._cache, np.zeros(b, np.int32), far, far,
                                              self._rows([None] * b, b), any_sampled=sampled, carried=self._carried,
                                              use_carried=np.zeros(b, bool), visible=visible, steps=n)

    def check(self, prompt: Prompt, params: SamplingParams) -> None:
        """ValueError naming the limit when the engine cannot take this request (``submit`` checks it too)."""
        n = len(prompt.input_ids)
        if n < 1:
            raise ValueError("the prompt has no tokens")
        if n + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} "
                             f"exceeds the engine's max_len={self.max_len}")
        if len(self.eos_ids) + len(params.stop_token_ids) > steps.STOP_SLOTS:
            raise ValueError(f"at most {steps.STOP_SLOTS - len(self.eos_ids)} stop_token_ids, got "
                             f"{len(params.stop_token_ids)}")

    def start(self) -> None:
        """Runs the loop in a background thread (idle waits block on a condition, no spinning)."""
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="emoqwen-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the background loop (requests in flight stay where they are; ``start`` resumes them)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._lock:
            self._running = False
            self._wake.notify_all()
        thread.join()

    def set_params(self, params) -> None:
        """Swaps the model weights (same shapes): an ``nnx.State`` of parameters or its pure dict. Takes effect
        from the next step; the KV cache of requests in flight stays as it was computed."""
        with self._step_lock:
            model = nnx.merge(self._graphdef, self._state)
            if isinstance(params, dict):
                state = nnx.state(model, nnx.Param)
                nnx.replace_by_pure_dict(state, params)
                params = state
            nnx.update(model, params)
            _, state = nnx.split(model)
            if self.mesh is not None:
                from emoqwen_jax.parallel.rules import param_shardings  # noqa: PLC0415

                state = jax.device_put(state, param_shardings(state, self.mesh))
            self._set_state(state)

    def _set_state(self, state) -> None:
        """The weights the steps use: ``state`` (an ``nnx.State`` of ``self._graph``'s structure) and its leaves."""
        leaves, structure = jax.tree.flatten(state)
        if structure != self._graph.state_def:
            raise ValueError("the new weights' tree differs from the model's")
        self._state, self._leaves = state, leaves

    def stats(self) -> dict:
        with self._lock:
            return {"queue_depth": len(self._waiting), "live_slots": sum(r is not None for r in self._slots),
                    "max_batch": self.max_batch, "max_len": self.max_len, "prefill_batch": self.prefill_batch,
                    "compiled_prefill_shapes": len(self._shapes), **self._counts}

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and not any(self._slots) and not self._cancelled:
                    self._wake.wait()
                if not self._running:
                    return
            try:
                self.step()
            except Exception as err:  # a failed step must not hang the callers: fail what was in flight
                log.exception("engine step failed")
                self._fail_all(f"{type(err).__name__}: {err}")

    def step(self) -> None:
        """One round: cancellations, at most one prefill, one decode call over the live slots, then the previous
        decode call's tokens and this round's prefill are read back (the device runs the new call meanwhile)."""
        with self._step_lock, self._rules():
            self._drop_cancelled()
            batch = self._take_waiting()
            if batch:
                try:
                    self._prefill(batch)
                except Exception as err:  # a prompt the model cannot take fails alone, the loop goes on
                    self._fail_batch(batch, err)
            if any(self._slots):
                self._decode()
            prefilled, self._prefilled = self._prefilled, []
            for batch, outputs in prefilled:
                try:
                    self._accept_prefill(batch, outputs)
                except Exception as err:
                    self._fail_batch(batch, err)

    def _fail_batch(self, batch: list[_Request], err: Exception) -> None:
        log.exception("prefill of %d requests failed", len(batch))
        for r in batch:
            if not r.handle.done():
                self._finish(r, "error", f"{type(err).__name__}: {err}")

    def _rules(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        from emoqwen_jax.model.sharding import axis_rules  # noqa: PLC0415
        from emoqwen_jax.parallel.rules import DEFAULT_RULES  # noqa: PLC0415

        return axis_rules(self.mesh, DEFAULT_RULES)

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)
            self._wake.notify_all()

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            kept = collections.deque(r for r in self._waiting if r.request_id not in cancelled)
            dropped = [r for r in self._waiting if r.request_id in cancelled]
            self._waiting = kept
        dropped += [r for r in self._slots if r is not None and r.request_id in cancelled]
        for r in dropped:
            self._finish(r, "cancelled")

    def _take_waiting(self) -> list[_Request]:
        free = [i for i, r in enumerate(self._slots) if r is None]
        with self._lock:
            n = min(len(free), self.prefill_batch, len(self._waiting))
            batch = [self._waiting.popleft() for _ in range(n)]
        for r, slot in zip(batch, free, strict=False):  # fewer waiting requests than free slots
            r.slot = slot
            self._slots[slot] = r
        return batch

    def _rows(self, reqs: Sequence[_Request | None], count: int, ahead: Sequence[int] = ()) -> steps.RowSampling:
        """The rows' sampling state for their next draw; ``ahead[i]``: row i's drawn tokens not read back yet."""
        rows = steps.RowSampling.host(count, self.vocab)
        for i, r in enumerate(reqs):
            if r is None:
                continue
            p, drawn = r.params, r.drawn + (ahead[i] if ahead else 0)
            rows.temperature[i], rows.top_p[i], rows.top_k[i] = p.temperature, p.top_p, p.top_k
            rows.seed[i], rows.index[i] = r.seed, drawn
            if drawn < p.min_tokens:  # EOS and the stop ids are masked until min_tokens
                ids = sorted(set(p.stop_token_ids) | set(self.eos_ids))
                rows.ban[i], rows.ban_ids[i, :len(ids)] = p.min_tokens - drawn, ids
        return rows

    def _prefill(self, batch: list[_Request]) -> None:
        rows = 1 << (len(batch) - 1).bit_length()
        lengths = [len(r.prompt.input_ids) for r in batch]
        length = _fit(max(lengths), self.length_buckets, 64)
        ids = np.full((rows, length), self.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        mask[len(batch):, 0] = 1  # batch padding rows: one pad token each (never read)
        for i, r in enumerate(batch):
            ids[i, :lengths[i]], mask[i, :lengths[i]] = r.prompt.input_ids, 1
        vision = batch_vision([r.prompt.vision for r in batch])
        patches = sum(len(vision[k]) for k in ("pixel_values", "pixel_values_videos") if vision[k] is not None)
        items = sum(len(vision[k]) for k in ("image_grid_thw", "video_grid_thw") if vision[k] is not None)
        buckets = {}
        if patches:  # sized as if the batch-padding rows held prompts like the real ones: a part-full batch
            # gets the shapes of a full one, so the prompts of one kind compile one prefill per row count
            patches, items = -(-patches * rows // len(batch)), -(-items * rows // len(batch))
            buckets = dict(pad_patches_to=_fit(patches, self.patch_buckets, 1 << 20),
                           pad_items_to=1 << (items - 1).bit_length())
        vision = pad_audio_windows(vision, self.session.data["audio"]["window_buckets"])
        inputs = self.session.model.prepare_inputs(ids, mask, **vision, **buckets)
        next_position = (length + inputs.text.rope_deltas).astype(np.int32)
        inputs = inputs.replace(rope_deltas=None)
        slots = np.array([r.slot for r in batch] + [self.max_batch] * (rows - len(batch)), np.int32)
        sampled = any(r.params.temperature > 0 for r in batch)
        vision_blocks = self._vision_blocks(inputs)
        self._shapes.add((rows, length, buckets.get("pad_patches_to", 0), buckets.get("pad_items_to", 0),
                          0 if vision.get("input_features") is None else len(vision["input_features"]), vision_blocks))
        tokens, logp, logits, self._cache, gates, self._carried = _JIT_PREFILL(
            self._graph, self._leaves, self._cache, inputs, np.asarray(lengths + [1] * (rows - len(batch)),
                                                                         np.int32),
            slots, self._rows(batch, rows), any_sampled=sampled, vision_blocks=vision_blocks, carried=self._carried)
        for i, r in enumerate(batch):
            r.position0, r.length0 = int(next_position[i]), lengths[i]
        scored = any(r.params.score_token_ids for r in batch)
        # Read back after the next decode call is queued (``_accept_prefill``): the device goes on meanwhile.
        self._prefilled.append((batch, (tokens, logp, gates if self._has_gate() else None, logits if scored else None)))
        with self._lock:
            self._counts["prefills"] += 1
            self._counts["prompt_tokens"] += sum(lengths)

    def _accept_prefill(self, batch: list[_Request], outputs: tuple) -> None:
        """Reads back one prefill's first tokens, log-probs, gate weights and (when scored) logits, and accepts
        the first tokens."""
        tokens, logp, gates, logits = jax.device_get(outputs)  # one transfer of what the host needs
        gates = self._gate_rows(batch, np.asarray(gates)) if gates is not None else [None] * len(batch)
        for i, r in enumerate(batch):
            r.gate_weights = gates[i]
            if r.params.score_token_ids:
                row = np.asarray(logits[i], np.float64)[list(r.params.score_token_ids)]
                r.first_scores = (row - np.logaddexp.reduce(row)).astype(np.float32).tolist()
        for i, r in enumerate(batch):
            self._accept(r, int(tokens[i]), float(logp[i]))

    def _vision_blocks(self, inputs) -> tuple[int, int]:
        """The ViT's block sizes for this batch's layout (``layout.local_blocks``; (0, 0) without vision)."""
        vision = inputs.vision
        if vision is None or vision.pixel_values.shape[0] == 0:
            return (0, 0)
        return layout.local_blocks(vision.frame_segment, vision.window_segment,
                                   layout_spec(self.session.model.config))

    def _has_gate(self) -> bool:
        return getattr(self.session.model.compressor, "gate", None) is not None

    @staticmethod
    def _gate_rows(batch: Sequence[_Request], gates: np.ndarray) -> list[np.ndarray | None]:
        """The batch's gate weights float32[G, E] (all images of the batch in row order, then all videos) ->
        each request's float32[items, E] (its images, then its videos)."""
        n_img = [len(r.prompt.vision.get("image_grid_thw", ())) for r in batch]
        n_vid = [len(r.prompt.vision.get("video_grid_thw", ())) for r in batch]
        img_at, vid_at = np.cumsum([0] + n_img), sum(n_img) + np.cumsum([0] + n_vid)
        return [np.concatenate([gates[img_at[i]:img_at[i + 1]], gates[vid_at[i]:vid_at[i + 1]]]).astype(np.float32)
                if n_img[i] + n_vid[i] else None for i in range(len(batch))]

    def _decode(self) -> None:
        """Queues one decode call over the live slots, then reads back and accepts the previous one (one call in
        flight). The call runs ``decode_steps`` steps while some live row wants more than half that many tokens
        (by ``max_tokens``), else one. A row whose tokens in flight reach its ``max_tokens`` is not advanced
        again; tokens drawn after a row's end (a stop, EOS, ``max_tokens`` inside a call) are dropped: their
        columns are past the request's end."""
        b = self.max_batch
        inflight, self._inflight = self._inflight, None
        fed, fed_steps = (inflight[2], inflight[3]) if inflight is not None else ([None] * b, 0)
        first = {id(r) for batch, _ in self._prefilled for r in batch}  # first token on the device, not read yet
        live: list[_Request | None] = [None] * b
        ahead = [0] * b  # the row's tokens drawn by the call in flight, still on the device
        use_carried = np.zeros(b, bool)  # the live rows among those
        tokens, index, position = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
        wanted = 0  # the most tokens a live row still wants
        for i, r in enumerate(self._slots):
            if r is None:
                continue
            ahead[i] = 1 if id(r) in first else fed_steps if fed[i] is r else 0
            drawn = r.drawn + ahead[i]
            if drawn >= r.params.max_tokens:
                continue
            live[i], use_carried[i] = r, ahead[i] > 0  # the last drawn token goes to column n + drawn - 1
            tokens[i] = 0 if ahead[i] else r.tokens[-1]
            index[i] = r.length0 + drawn - 1
            position[i] = r.position0 + drawn - 1
            wanted = max(wanted, r.params.max_tokens - drawn)
        if any(live):
            sampled = any(r is not None and r.params.temperature > 0 for r in live)
            n = self.decode_steps if 2 * wanted > self.decode_steps else 1
            # attention reads the cache only up to the length bucket that holds the longest live row's last column
            visible = _fit(min(int(index.max()) + n, self.max_len), self.length_buckets, self.max_len)
            out, logp, self._carried, self._cache = _JIT_DECODE(
                self._graph, self._leaves, self._cache, tokens, index, position, self._rows(live, b, ahead),
                any_sampled=sampled, carried=self._carried, use_carried=use_carried, visible=visible, steps=n)
            self._inflight = (out, logp, live, n)
            with self._lock:
                self._counts["decode_steps"] += n
                self._counts["decode_calls"] += 1
        if inflight is not None:
            out, logp = jax.device_get(inflight[:2])
            for i, r in enumerate(inflight[2]):
                for j in range(inflight[3]):
                    if r is None or self._slots[i] is not r:  # finished (or cancelled) since the call was queued
                        break
                    self._accept(r, int(out[i, j]), float(logp[i, j]))

    def _accept(self, r: _Request, token: int, logp: float) -> None:
        """Records one drawn token of ``r`` and finishes it when it ends."""
        r.drawn += 1
        p = r.params
        with self._lock:
            self._counts["generated_tokens"] += 1
        if token in r.end_ids:
            r.end_token_id, r.end_logprob = token, logp
            self._emit(r, token, r.detok.flush())
            return self._finish(r, "stop")
        r.tokens.append(token)
        if p.logprobs:
            r.logprobs.append(logp)
        delta = r.detok.add(token, check_stop=r.drawn >= p.min_tokens)
        if r.detok.stopped:
            r.end_token_id, r.end_logprob = token, logp
            self._emit(r, token, delta)
            return self._finish(r, "stop")
        if r.drawn >= p.max_tokens:
            self._emit(r, token, delta + r.detok.flush())
            return self._finish(r, "length")
        self._emit(r, token, delta)

    def _emit(self, r: _Request, token: int, delta: str) -> None:
        if r.on_token is not None:
            try:
                r.on_token(token, delta)
            except Exception:  # a client's callback must not take the engine down
                log.exception("on_token callback of request %s failed; cancelling it", r.request_id)
                self._cancel(r.request_id)

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        if 0 <= r.slot < self.max_batch and self._slots[r.slot] is r:
            self._slots[r.slot] = None
        with self._lock:
            self._counts[f"finished_{reason}"] += 1
        r.handle._finish(Completion(
            request_id=r.request_id, token_ids=list(r.tokens), text=r.detok.text, finish_reason=reason,
            prompt_tokens=int(len(r.prompt.input_ids)), logprobs=list(r.logprobs) if r.params.logprobs else None,
            first_scores=r.first_scores, gate_weights=r.gate_weights, error=error,
            end_token_id=r.end_token_id, end_logprob=r.end_logprob))

    def _fail_all(self, error: str) -> None:
        with self._step_lock:
            self._inflight, self._prefilled = None, []
            with self._lock:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for r in [r for r in self._slots if r is not None] + waiting:
                self._finish(r, "error", error)
