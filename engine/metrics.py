"""Runtime metrics of the batched engine, counted where things happen; ``snapshot()`` is thread-safe.

Names follow the runtime spec in snake_case: ``average_batch_size`` (rows per forward step),
``average_batch_wait_ms`` (a request's wait in the queue before its first step),
``average_queue_depth`` (requests waiting, sampled at every step).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

WINDOW_S = 5.0  # tokens_per_second looks at the last 5 seconds
_SAMPLES = 2000  # latency percentiles use the most recent samples


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    steps: int
    average_batch_size: float
    max_batch_size_seen: int
    average_batch_wait_ms: float
    average_queue_depth: float
    queue_depth: int
    running: int
    tokens_per_second: float  # generated tokens over the last WINDOW_S seconds
    prefill_tokens_per_second: float  # prompt tokens / time of the steps that prefilled
    decode_tokens_per_second: float  # decode tokens / time of the steps that decoded
    ttft_p50_ms: float
    ttft_p95_ms: float
    inter_token_p50_ms: float
    inter_token_p95_ms: float
    inter_token_max_ms: float
    submitted: int
    completed: int
    cancelled: int
    timed_out: int
    failed: int
    rejected: int
    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_second: float = 0.0  # prompt tokens computed over the last WINDOW_S seconds
    preemptions: int = 0  # running requests that gave up their K/V for an older one and were requeued
    waiting_for_memory: int = 0  # queued requests the KV budget has no room for now
    drafted_tokens: int = 0  # tokens guessed from the context and verified (speculative decoding)
    accepted_tokens: int = 0  # drafted tokens the model agreed with
    mean_accepted_length: float = 0.0  # tokens a request takes per sampling step (1.0 without drafts)

    @property
    def in_flight(self) -> int:
        return self.submitted - (
            self.completed + self.cancelled + self.timed_out + self.failed + self.rejected
        )


def _percentile(values: deque[float], q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q)) if values else 0.0


class InMemoryRuntimeMetrics:
    """Counters and recent samples kept in memory; the engine records, anyone reads snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._steps = 0
            self._rows_total = 0
            self._max_rows = 0
            self._queue_depth_total = 0
            self._queue_depth = 0
            self._running = 0
            self._waits_ms_total = 0.0
            self._n_waits = 0
            self._prefill_tokens = 0
            self._prefill_s = 0.0
            self._decode_tokens = 0
            self._decode_s = 0.0
            self._recent_tokens: deque[tuple[float, int]] = deque()
            self._recent_prompt_tokens: deque[tuple[float, int]] = deque()
            self._ttft_ms: deque[float] = deque(maxlen=_SAMPLES)
            self._itl_ms: deque[float] = deque(maxlen=_SAMPLES)
            self._itl_max_ms = 0.0
            self._counts = dict.fromkeys(
                ("submitted", "completed", "cancelled", "timed_out", "failed", "rejected"), 0
            )
            self._prompt_tokens = 0
            self._generated_tokens = 0
            self._preemptions = 0
            self._waiting_for_memory = 0
            self._sampling_steps = 0
            self._drafted_tokens = 0
            self._accepted_tokens = 0

    # -- recording (engine thread) -------------------------------------------------------------
    def record_submitted(self) -> None:
        with self._lock:
            self._counts["submitted"] += 1

    def record_rejected(self) -> None:
        with self._lock:
            self._counts["submitted"] += 1
            self._counts["rejected"] += 1

    def record_queue_wait(self, wait_ms: float) -> None:
        with self._lock:
            self._waits_ms_total += wait_ms
            self._n_waits += 1

    def record_step(
        self, n_rows: int, n_prefill_tokens: int, n_decode_tokens: int, elapsed_s: float, queue_depth: int,
        n_running: int,
    ) -> None:  # fmt: skip
        with self._lock:
            self._steps += 1
            self._rows_total += n_rows
            self._max_rows = max(self._max_rows, n_rows)
            self._queue_depth_total += queue_depth
            self._queue_depth, self._running = queue_depth, n_running
            if n_prefill_tokens:
                self._prefill_tokens += n_prefill_tokens
                self._prefill_s += elapsed_s
                self._recent_prompt_tokens.append((time.monotonic(), n_prefill_tokens))
            if n_decode_tokens:
                self._decode_tokens += n_decode_tokens
                self._decode_s += elapsed_s

    def record_tokens(self, n_tokens: int, now: float | None = None) -> None:
        """Generated tokens (every sampled token, the first included)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._generated_tokens += n_tokens
            self._recent_tokens.append((now, n_tokens))
            self._trim_window(now)

    def record_ttft(self, ttft_ms: float) -> None:
        with self._lock:
            self._ttft_ms.append(ttft_ms)

    def record_inter_token(self, gap_ms: float) -> None:
        with self._lock:
            self._itl_ms.append(gap_ms)
            self._itl_max_ms = max(self._itl_max_ms, gap_ms)

    def record_finished(self, finish_reason: str, prompt_tokens: int) -> None:
        key = {"stop": "completed", "length": "completed", "cancelled": "cancelled",
               "timeout": "timed_out"}.get(finish_reason, "failed")  # fmt: skip
        with self._lock:
            self._counts[key] += 1
            self._prompt_tokens += prompt_tokens

    def set_queue_state(
        self, queue_depth: int, n_running: int, waiting_for_memory: int | None = None
    ) -> None:
        with self._lock:
            self._queue_depth, self._running = queue_depth, n_running
            if waiting_for_memory is not None:
                self._waiting_for_memory = waiting_for_memory

    def record_sampled(self, n_drafted: int, n_accepted: int) -> None:
        """A request sampled in a step: ``n_drafted`` drafted tokens verified, ``n_accepted`` taken."""
        with self._lock:
            self._sampling_steps += 1
            self._drafted_tokens += n_drafted
            self._accepted_tokens += n_accepted

    def record_preemption(self) -> None:
        with self._lock:
            self._preemptions += 1

    def _trim_window(self, now: float) -> None:
        for recent in (self._recent_tokens, self._recent_prompt_tokens):
            while recent and recent[0][0] < now - WINDOW_S:
                recent.popleft()

    # -- reading (any thread) ----------------------------------------------------------------
    def snapshot(self) -> MetricsSnapshot:
        now = time.monotonic()
        with self._lock:
            self._trim_window(now)
            steps = self._steps
            return MetricsSnapshot(
                steps=steps,
                average_batch_size=self._rows_total / steps if steps else 0.0,
                max_batch_size_seen=self._max_rows,
                average_batch_wait_ms=self._waits_ms_total / self._n_waits if self._n_waits else 0.0,
                average_queue_depth=self._queue_depth_total / steps if steps else 0.0,
                queue_depth=self._queue_depth,
                running=self._running,
                tokens_per_second=sum(n for _, n in self._recent_tokens) / WINDOW_S,
                prefill_tokens_per_second=self._prefill_tokens / self._prefill_s if self._prefill_s else 0.0,
                decode_tokens_per_second=self._decode_tokens / self._decode_s if self._decode_s else 0.0,
                ttft_p50_ms=_percentile(self._ttft_ms, 50),
                ttft_p95_ms=_percentile(self._ttft_ms, 95),
                inter_token_p50_ms=_percentile(self._itl_ms, 50),
                inter_token_p95_ms=_percentile(self._itl_ms, 95),
                inter_token_max_ms=self._itl_max_ms,
                prompt_tokens=self._prompt_tokens,
                generated_tokens=self._generated_tokens,
                prompt_tokens_per_second=sum(n for _, n in self._recent_prompt_tokens) / WINDOW_S,
                preemptions=self._preemptions,
                waiting_for_memory=self._waiting_for_memory,
                drafted_tokens=self._drafted_tokens,
                accepted_tokens=self._accepted_tokens,
                mean_accepted_length=(
                    1.0 + self._accepted_tokens / self._sampling_steps if self._sampling_steps else 0.0
                ),
                **self._counts,
            )
