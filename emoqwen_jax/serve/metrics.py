"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app.

  emoqwen_requests_total{endpoint, status}     answered requests by path and HTTP status
  emoqwen_queue_depth                          requests waiting for a decode slot (the engine's)
  emoqwen_live_slots                           decode slots in use (of emoqwen_max_slots)
  emoqwen_prompt_tokens_total                  prompt tokens of finished requests
  emoqwen_generated_tokens_total               generated tokens of finished requests
  emoqwen_time_to_first_token_seconds          submit -> first generated token
  emoqwen_time_per_output_token_seconds        mean gap between a request's generated tokens
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict]):
        """``engine_stats()``: the engine's ``stats()`` dict (an empty dict while the weights load)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("emoqwen_requests", "answered requests", ["endpoint", "status"], registry=r)
        Gauge("emoqwen_queue_depth", "requests waiting for a decode slot", registry=r).set_function(
            lambda: engine_stats().get("queue_depth", 0))
        Gauge("emoqwen_live_slots", "decode slots in use", registry=r).set_function(
            lambda: engine_stats().get("live_slots", 0))
        Gauge("emoqwen_max_slots", "decode slots (--max_batch)", registry=r).set_function(
            lambda: engine_stats().get("max_batch", 0))
        self.prompt_tokens = Counter("emoqwen_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("emoqwen_generated_tokens", "generated tokens of finished requests",
                                        registry=r)
        self.ttft = Histogram("emoqwen_time_to_first_token_seconds", "submit to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("emoqwen_time_per_output_token_seconds", "mean gap between generated tokens",
                              buckets=_TOKEN_BUCKETS, registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class TokenClock:
    """Times one request's tokens (called from the engine thread): first-token latency and mean gap."""

    def __init__(self):
        self.submitted = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1

    def record(self, metrics: Metrics, prompt_tokens: int, generated: int) -> None:
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.generated_tokens.inc(generated)
        if self.first is not None:
            metrics.ttft.observe(self.first - self.submitted)
            if self.count > 1:
                metrics.tpot.observe((self.last - self.first) / (self.count - 1))
