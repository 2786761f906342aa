"""The memory scheduler: which requests wait, which run, and who gives way when KV memory runs out.

The engine (``batching.py``) asks it, each step, for the rows to compute; everything about a
request's place — the queue, admission, the KV room of its next chunk, preemption, the end of a
request and the release of its session — happens here. The policy is vLLM's:

- The running requests' next chunks get room first, oldest admitted first; one that cannot grow
  preempts the most recently admitted running request (requeued at the head of the queue, resumed
  later from its prompt + text so far, reusing what its session still caches).
- Then waiting requests are admitted in order (one per session at a time) while the batch has a slot,
  the step has prefill budget and their first chunk has room; the first that has none waits at the
  head, and nothing behind it overtakes it.
- A resumed request computes in the step it is admitted, so it makes progress before anyone can
  preempt it again, and the oldest running request is never preempted: every request that fits alone
  finishes. Only a request that could not fit even with nothing else running is refused.

``observers`` see each admission and each preemption (tests check the rules above through them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from .errors import CacheBudgetError, ContextOverflowError, EngineError
from .forks import copy_from_parent, may_start
from .generation import GenerationEvent, GenerationRequest
from .kv_cache import KvCacheEntry
from .kv_store import LruKvCacheStore, SessionId
from .metrics import InMemoryRuntimeMetrics
from .request_queue import RequestQueue
from .speculative import Draft

if TYPE_CHECKING:
    from .batching import BatchingOptions, RequestHandle
    from .model import Model

log = logging.getLogger(__name__)

Row = tuple["RunningRequest", np.ndarray]  # a request and the token ids it computes this step


def request_failure(doing: str, cause: BaseException, request_id: int | None = None) -> EngineError:
    """The error that ends a request failed by a fault of its own (a bug, a bad file): it names what
    was being done and the cause; the traceback is logged once, here (the request ends with it)."""
    failure = EngineError(f"{doing} failed: {type(cause).__name__}: {str(cause)[:300]}")
    log.error(
        "%s: %s", "the engine" if request_id is None else f"request {request_id}", failure, exc_info=cause
    )
    return failure


@dataclass(eq=False, slots=True)
class RunningRequest:
    """A request admitted to the batch (or parked, waiting for memory, with its session kept)."""

    seq: GenerationRequest
    handle: RequestHandle
    store_session: SessionId | None = None  # the store session whose entry this request uses
    anonymous: bool = False  # a store session made up for a request without session_id
    recompute: bool = False  # cache disabled: every step recomputes the whole sequence
    last_token_at: float | None = None
    draft: Draft | None = None  # tokens drafted after the newest one this step, verified by the forward
    first_logits: np.ndarray | None = None  # a fork child's first token comes from its parent's logits


class SchedulerObserver(Protocol):
    def admitted(self, run: RunningRequest, running: Sequence[RunningRequest]) -> None: ...

    def preempting(self, run: RunningRequest, running: Sequence[RunningRequest]) -> None: ...


class MemoryScheduler:
    """The queue and the running batch of one engine, under its KV budget; see the module docstring.

    ``first_token(run, logits, now)`` samples a fork child's first token from its parent's logits
    (the engine's sampling); ``forget(request_id)`` drops per-request state elsewhere (the drafter's).
    """

    def __init__(
        self,
        model: Model,
        store: LruKvCacheStore,
        metrics: InMemoryRuntimeMetrics,
        batching: Callable[[], BatchingOptions],
        first_token: Callable[[RunningRequest, np.ndarray, float], None],
        forget: Callable[[int], None],
        max_concurrent_sessions: int = 100,
    ) -> None:
        self.model = model
        self.store = store
        self.metrics = metrics
        self._batching = batching
        self._first_token = first_token
        self._forget = forget
        self.queue = RequestQueue(metrics, batching, max_concurrent_sessions)
        self.observers: list[SchedulerObserver] = []
        self._running: list[RunningRequest] = []  # in admission order: the last one is preempted first
        self._parked: dict[int, RunningRequest] = {}  # request id -> its state while it waits for memory
        self.memory_blocked = False  # the queue's head found no room; look again when room is freed
        self._logged: set[str] = set()  # faults logged with a traceback already

    # -- what is where ----------------------------------------------------------------------------
    @property
    def running(self) -> Sequence[RunningRequest]:
        """The running requests in admission order (the last one is preempted first)."""
        return tuple(self._running)

    def waiting(self) -> list[GenerationRequest]:
        """The queued requests in the order they will be considered (preempted ones first)."""
        return self.queue.requests()

    @property
    def n_waiting(self) -> int:
        return len(self.queue)

    @property
    def n_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._running or len(self.queue))

    def publish_queue_state(self) -> None:
        n_memory = self.queue.n_waiting_for_memory()
        self.metrics.set_queue_state(len(self.queue), len(self._running), n_memory)

    def enqueue(self, seq: GenerationRequest, handle: RequestHandle, stopped: Callable[[], bool]) -> None:
        """Queue a request (thread-safe); QueueFullError when the queue or the sessions are full.
        ``stopped`` is checked under the queue's lock (the engine drains the queue under it)."""
        running = list(self._running)
        self.queue.append((seq, handle), stopped, [r.seq.session_id for r in running], len(running))

    def seconds_until_ready(self) -> float | None:
        """0 when a step would run now, the time left to wait for company, or None when idle."""
        return self.queue.seconds_until_ready(len(self._running))

    def waiting_for_company(self, now: float) -> bool:
        """When idle, the first request waits up to max_batch_wait_ms for others to batch with."""
        return self.queue.waiting_for_company(now, len(self._running))

    def reap(self, now: float) -> None:
        """Finish cancelled and timed-out requests, waiting or running."""
        for seq, handle in self.queue.take_ended(now):
            reason = "cancelled" if handle.cancel_requested else "timeout"
            self.end_waiting(seq, handle, seq.finish(reason, now))  # type: ignore[arg-type]
        for run in list(self._running):
            if run.handle.cancel_requested:
                self.retire(run, run.seq.finish("cancelled", now))
            elif run.seq.timed_out(now):
                self.retire(run, run.seq.finish("timeout", now))

    # -- the rows of a step -----------------------------------------------------------------------
    def schedule(self, now: float) -> list[Row]:
        """This step's rows: room for the running requests' next chunks (preempting if needed), then
        the waiting requests admitted in order."""
        self.fit_budget(now)
        rows, budget = self.plan(list(self._running), self._batching().max_prefill_chunk_tokens)
        rows = self.reserve(rows, now)
        return rows + self.admit(now, budget)

    def plan(self, runs: list[RunningRequest], budget: int) -> tuple[list[Row], int]:
        """Each request's next chunk (prefill chunks share ``budget``); returns the rows and what is
        left of the budget."""
        rows: list[Row] = []
        for run in runs:
            seq = run.seq
            if run.recompute:  # no cache: the whole sequence, every step
                assert seq.cache is not None
                seq.cache.trim(0)
                seq.reset_computed(0)
                chunk = np.asarray(seq.all_ids, dtype=np.int64)
            elif seq.in_prefill:
                if budget <= 0:
                    continue
                chunk = seq.next_chunk(budget)
                budget -= len(chunk)
            else:
                chunk = seq.next_chunk(1)
            rows.append((run, chunk))
        return rows, budget

    def fit_budget(self, now: float) -> None:
        """After the budget shrank below what running requests hold: preempt the most recent ones."""
        while self._running and self.store.options.enabled and self.store.bytes_over_budget():
            self.preempt(self._running[-1], now)

    def reserve(self, rows: list[Row], now: float) -> list[Row]:
        """Room for each running request's next chunk, oldest admitted first; one that cannot grow
        preempts the most recently admitted running request (itself, if it is that one)."""
        ready = []
        for run, chunk in rows:
            while run in self._running:
                try:
                    _grow(run, len(chunk))
                    ready.append((run, chunk))
                    break
                except ContextOverflowError:
                    self.retire(run, run.seq.finish("length", now))
                except CacheBudgetError:
                    self.preempt(self._running[-1], now)
                except Exception as exc:  # this request fails; the others go on
                    failed = request_failure("reserving its KV cache", exc, run.seq.request_id)
                    self.retire(run, run.seq.finish("error", now, error=str(failed)))
        return [(run, chunk) for run, chunk in ready if run in self._running]

    def is_running(self, run: RunningRequest) -> bool:
        return run in self._running

    # -- preemption -------------------------------------------------------------------------------
    def preempt(self, run: RunningRequest, now: float) -> None:
        """Take a running request off the batch and requeue it at the head. Its session is unpinned,
        so its K/V stay cached until the store needs the room (LRU): it resumes from what is left."""
        for observer in self.observers:
            observer.preempting(run, self.running)
        self._running.remove(run)
        if run.store_session is not None:
            self.store.unpin(run.store_session)
        run.seq.preempt()
        self.metrics.record_preemption()
        log.debug("preempted request %d (%d tokens so far)", run.seq.request_id, len(run.seq.all_ids))
        self._park(run)
        self.memory_blocked = False  # its room may let the head of the queue in

    def _park(self, run: RunningRequest) -> None:
        """Requeue a request at the head of the queue, waiting for memory; tell its caller once."""
        self._parked[run.seq.request_id] = run
        self.queue.push_front((run.seq, run.handle))
        if not run.seq.waiting_for_memory:
            run.seq.waiting_for_memory = True
            run.handle._deliver(GenerationEvent(run.seq.request_id, "waiting"))

    # -- admission --------------------------------------------------------------------------------
    def admit(self, now: float, budget: int) -> list[Row]:
        """Admit waiting requests in order (one per session at a time) while the batch has a slot,
        the step has prefill budget and the first chunk has room; returns their rows."""
        batching = self._batching()
        limit = batching.max_batch_size if batching.enabled else 1
        busy = {r.seq.session_id for r in self._running if r.seq.session_id is not None}
        rows: list[Row] = []
        while len(self._running) < limit and budget > 0 and not self.memory_blocked:
            picked = self.queue.first(lambda s: s.session_id not in busy and may_start(s))
            if picked is None:
                break
            seq, handle = picked
            admitted = self._try_admit(seq, handle, now, budget)
            if admitted is None:
                continue  # it ended (an error, or its length); the next one may go
            if admitted is False:
                break  # it waits for memory at the head of the queue
            row, budget = admitted
            if row is not None:
                rows.append(row)
            if seq.session_id is not None:
                busy.add(seq.session_id)
        return rows

    def _try_admit(
        self, seq: GenerationRequest, handle: RequestHandle, now: float, budget: int
    ) -> tuple[Row | None, int] | Literal[False] | None:
        """Attach the request's cache and reserve its first chunk: (its row, the prefill budget left);
        None when it ended (an error or, resumed, its length); False when it waits for memory. A fork
        child given its parent's whole prompt K/V and last logits samples its first token at once and
        has no row this step."""
        previous = self._parked.get(seq.request_id)
        try:
            run = self._attach_cache(seq, handle, previous)
        except CacheBudgetError as exc:  # max_sessions, every session in use by a running request
            return self._no_room(seq, handle, None, now, exc)
        except (EngineError, ValueError) as exc:
            self._refuse(seq, handle, None, now, exc)
            return None
        except Exception as exc:  # a bug or a bad file met while preparing it: this request fails alone
            self._refuse(
                seq, handle, None, now, request_failure("preparing the request", exc, seq.request_id)
            )
            return None
        first_logits, run.first_logits = run.first_logits, None
        row: Row | None = None
        if first_logits is None:
            (row,), budget = self.plan([run], budget)
            try:
                _grow(run, len(row[1]))
            except CacheBudgetError as exc:
                return self._no_room(seq, handle, run, now, exc)
            except ContextOverflowError as exc:
                self._refuse(seq, handle, run, now, exc)
                return None
            except Exception as exc:
                failed = request_failure("reserving its KV cache", exc, seq.request_id)
                self._refuse(seq, handle, run, now, failed)
                return None
        self._unqueue(seq, handle)
        self._parked.pop(seq.request_id, None)
        seq.waiting_for_memory = False
        if seq.started_at is None:  # the first admission: the queue wait and the cache lookup count
            seq.started_at = now
            seq.n_reused = seq.n_computed
            self.metrics.record_queue_wait((now - seq.submitted_at) * 1000.0)
            if run.store_session is not None:
                self.store.record_lookup(seq.n_prompt, seq.n_computed)
        self._running.append(run)
        for observer in self.observers:
            observer.admitted(run, self.running)
        if first_logits is not None:  # sampled as its parent's next token would be: with its own options
            self._first_token(run, first_logits, now)
        return row, budget

    def _no_room(
        self,
        seq: GenerationRequest,
        handle: RequestHandle,
        run: RunningRequest | None,
        now: float,
        exc: CacheBudgetError,
    ) -> Literal[False] | None:
        """No room for a waiting request: it waits at the head, unless nothing runs (then it cannot
        fit even alone, and waiting would be forever). Nothing runs means in the whole store: with a
        store shared by several models' engines (model_pool.py), another engine's requests may hold
        the room, and finish."""
        if run is not None:
            self._parked[seq.request_id] = run  # keeps a made-up session for when it is admitted
            if run.store_session is not None:
                self.store.unpin(run.store_session)
            seq.cache, seq.n_computed = None, 0
        if not self._running and not self.store.get_stats().pinned_sessions:
            message = f"the request does not fit the KV cache budget even alone: {exc}"
            self._unqueue(seq, handle)
            self.end_waiting(seq, handle, seq.finish("error", now, error=message))
            return None
        self.memory_blocked = True
        if not seq.waiting_for_memory:
            seq.waiting_for_memory = True
            handle._deliver(GenerationEvent(seq.request_id, "waiting"))
        return False

    def _refuse(
        self,
        seq: GenerationRequest,
        handle: RequestHandle,
        run: RunningRequest | None,
        now: float,
        exc: Exception,
    ) -> None:
        """End a request that cannot be admitted: an error, or "length" for one that has generated
        text and whose prompt + text no longer fit a shrunk token limit."""
        if run is not None:
            self._parked[seq.request_id] = run
            if run.store_session is not None:
                self.store.unpin(run.store_session)
        self._unqueue(seq, handle)
        if isinstance(exc, ContextOverflowError) and seq.generated:
            event = seq.finish("length", now)
        else:
            event = seq.finish("error", now, error=str(exc))
        self.end_waiting(seq, handle, event)

    def _unqueue(self, seq: GenerationRequest, handle: RequestHandle) -> None:
        self.queue.remove((seq, handle))

    def _attach_cache(
        self, seq: GenerationRequest, handle: RequestHandle, previous: RunningRequest | None
    ) -> RunningRequest:
        """The request's KV entry, reusing what its session caches of prompt + text so far."""
        options = self.store.options
        context = self.model.config.context_length
        last_token_at = previous.last_token_at if previous is not None else None
        if not options.enabled:
            seq.cache = KvCacheEntry(self.model.kv_shape(), context)
            return RunningRequest(seq, handle, recompute=True, last_token_at=last_token_at)
        if previous is not None and previous.store_session is not None:
            session, anonymous = previous.store_session, previous.anonymous
        else:
            session = seq.session_id if isinstance(seq.session_id, SessionId) else SessionId.new_id()
            anonymous = seq.session_id is None
        shape = self.model.kv_shape(options.dtype)
        entry, n_reused = self.store.prepare(session, shape, seq.all_ids, context, pin=True, record=False)
        seq.cache = entry
        first_logits = None
        if seq.needs_every_position:  # it wants every position's logits or hidden state: compute them
            entry.trim(0)
            n_reused = 0
        elif seq.fork_parent is not None:
            n_reused, first_logits = copy_from_parent(seq, entry, n_reused)
        seq.reset_computed(n_reused)
        run = RunningRequest(
            seq, handle, store_session=session, anonymous=anonymous, last_token_at=last_token_at
        )
        run.first_logits = first_logits
        return run

    # -- the end of a request ---------------------------------------------------------------------
    def retire(self, run: RunningRequest, final: GenerationEvent) -> None:
        """A running request ended: release its session, count it, tell the caller."""
        self.memory_blocked = False  # its room may let the head of the queue in
        if run in self._running:
            self._running.remove(run)
        self._forget(run.seq.request_id)
        if run.store_session is not None:
            try:
                self.store.unpin(run.store_session)
                if run.anonymous:
                    self.store.remove(run.store_session)
            except Exception as exc:  # the request still ends, and its caller hears of it
                first = "release" not in self._logged
                self._logged.add("release")
                log.log(logging.WARNING if first else logging.DEBUG, "releasing a KV session failed (%s: %s)",
                        type(exc).__name__, exc, exc_info=exc if first else None)  # fmt: skip
        assert final.result is not None
        self.metrics.record_finished(final.result.finish_reason, final.result.prompt_tokens)
        run.handle._deliver(final)  # counted before the caller hears of it

    def end_waiting(self, seq: GenerationRequest, handle: RequestHandle, event: GenerationEvent) -> None:
        """A queued request ended (cancelled, timed out, failed, engine stopped)."""
        self.memory_blocked = False  # it may have been the head that found no room
        parked = self._parked.pop(seq.request_id, None)
        self._forget(seq.request_id)
        if parked is not None and parked.anonymous and parked.store_session is not None:
            self.store.remove(parked.store_session)  # a preempted request's made-up session
        assert event.result is not None
        self.metrics.record_finished(event.result.finish_reason, seq.n_prompt)  # before the caller hears
        handle._deliver(event)

    def fail_running(self, message: str, now: float) -> None:
        """End every running request with ``message`` (a fault no one request is to blame for)."""
        for run in list(self._running):
            run.draft = None
            self.retire(run, run.seq.finish("error", now, error=message))

    def end_all(self, message: str, now: float) -> None:
        """End every waiting and running request with ``message`` (the engine stops)."""
        for seq, handle in self.queue.drain():
            self.end_waiting(seq, handle, seq.finish("error", now, error=message))
        for run in list(self._running):
            self.retire(run, run.seq.finish("error", now, error=message))


def _grow(run: RunningRequest, n_tokens: int) -> None:
    entry = run.seq.cache
    assert entry is not None
    entry.ensure_capacity(entry.n_tokens + n_tokens)
