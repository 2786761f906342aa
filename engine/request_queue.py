"""The engine's queue of waiting requests: who may enter it, in which order they are considered, and
how long an idle engine waits for company before its first step.

Thread-safe: ``submit()`` appends from any thread while the engine's step reads and removes under
the same lock. Requests preempted for memory go back to the head (``push_front``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING

from .errors import EngineStoppedError, QueueFullError
from .generation import GenerationRequest
from .kv_store import SessionId
from .metrics import InMemoryRuntimeMetrics

if TYPE_CHECKING:
    from .batching import BatchingOptions, RequestHandle

Waiting = tuple[GenerationRequest, "RequestHandle"]


class RequestQueue:
    """Waiting requests in order, with the queue's limits (``max_total_queued_requests``, the
    conversations generating at once) and the batching wait (``max_batch_wait_ms``)."""

    def __init__(
        self,
        metrics: InMemoryRuntimeMetrics,
        batching: Callable[[], BatchingOptions],
        max_concurrent_sessions: int = 100,
    ) -> None:
        self.metrics = metrics
        self._batching = batching
        self.max_concurrent_sessions = max_concurrent_sessions
        self.lock = threading.Lock()
        self._items: deque[Waiting] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def requests(self) -> list[GenerationRequest]:
        with self.lock:
            return [seq for seq, _ in self._items]

    def n_waiting_for_memory(self) -> int:
        with self.lock:
            return sum(1 for seq, _ in self._items if seq.waiting_for_memory)

    def append(
        self,
        item: Waiting,
        stopped: Callable[[], bool],
        running_sessions: Collection[object],
        n_running: int,
    ) -> None:
        """Queue a request; EngineStoppedError once ``stopped()``, QueueFullError when the queue or
        the conversations generating at once are at their limit."""
        seq = item[0]
        session_id = seq.session_id if isinstance(seq.session_id, SessionId) else None
        with self.lock:
            if stopped():
                raise EngineStoppedError("the engine is stopped; no new requests are accepted")
            n_waiting = len(self._items)
            if n_waiting >= self._batching().max_total_queued_requests:
                self.metrics.record_rejected()
                raise QueueFullError(f"queue is full ({n_waiting} waiting); try again later")
            if session_id is not None:
                active = {s.session_id for s, _ in self._items} | set(running_sessions)
                if session_id not in active and len(active - {None}) >= self.max_concurrent_sessions:
                    self.metrics.record_rejected()
                    raise QueueFullError(
                        f"too many conversations generating at once ({self.max_concurrent_sessions}); "
                        f"try again later"
                    )
            self._items.append(item)
            self.metrics.record_submitted()
            self.metrics.set_queue_state(len(self._items), n_running)

    def push_front(self, item: Waiting) -> None:
        """Put a preempted request back at the head (unless it is still queued)."""
        with self.lock:
            if item not in self._items:
                self._items.appendleft(item)

    def remove(self, item: Waiting) -> None:
        with self.lock:
            if item in self._items:
                self._items.remove(item)

    def first(self, eligible: Callable[[GenerationRequest], bool]) -> Waiting | None:
        """The first queued request ``eligible`` accepts."""
        with self.lock:
            return next((item for item in self._items if eligible(item[0])), None)

    def take_ended(self, now: float) -> list[Waiting]:
        """Remove and return the requests cancelled or timed out while they waited."""
        with self.lock:
            ended = [(s, h) for s, h in self._items if h.cancel_requested or s.timed_out(now)]
            for item in ended:
                self._items.remove(item)
        return ended

    def drain(self) -> Iterator[Waiting]:
        """Remove and return every queued request."""
        with self.lock:
            items, self._items = list(self._items), deque()
        return iter(items)

    # -- waiting for company ----------------------------------------------------------------------
    def seconds_until_ready(self, n_running: int) -> float | None:
        """0 when a step would run now, the time left to wait for company, or None when idle."""
        if n_running:
            return 0.0
        with self.lock:
            if not self._items:
                return None
            oldest = self._items[0][0].submitted_at
        if not self._company_rule_applies():
            return 0.0
        left = self._batching().max_batch_wait_ms / 1000.0 - (time.perf_counter() - oldest)
        return max(0.0, left)

    def waiting_for_company(self, now: float, n_running: int) -> bool:
        """When idle, the first request waits up to max_batch_wait_ms for others to batch with."""
        if n_running:
            return False
        with self.lock:
            if not self._items or not self._company_rule_applies():
                return False
            age_ms = (now - self._items[0][0].submitted_at) * 1000.0
        return age_ms < self._batching().max_batch_wait_ms

    def _company_rule_applies(self) -> bool:
        b = self._batching()
        return b.enabled and b.max_batch_wait_ms > 0 and len(self._items) < b.max_batch_size
