"""GET /metrics of `loralab serve` in Prometheus' text format, through prometheus_client (the library
vLLM and most Python servers expose theirs with), on a registry per server: no global state, so two
servers in one process (the tests) never share counters.

Both engines (the built-in one and the llama.cpp gateway) report the same series, so a dashboard
does not care which one serves."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RATE_WINDOW_S = 10.0  # loralab_generated_tokens_per_second averages over this many seconds
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("loralab_queue_depth", "requests waiting for a place in the running batch", registry=r).set_function(queue_depth)
        self.running = Gauge("loralab_running_rows", "requests being prefilled or decoded", registry=r)
        self.finished = Counter("loralab_requests", "requests finished, by finish reason", ["finish"], registry=r)
        self.prompt_tokens = Counter("loralab_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("loralab_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("loralab_time_to_first_token_seconds", "from submission to the first generated token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=r)
        Gauge("loralab_generated_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW_S:.0f} s",
              registry=r).set_function(self.tokens_per_s)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW_S
        self._lock = threading.Lock()  # written by the engine thread, read by the HTTP thread

    def generated(self, tokens: int) -> None:
        self.generated_tokens.inc(tokens)
        with self._lock:
            self._recent.append((time.monotonic(), tokens))

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
