"""The batched inference engine: one scheduler serving every conversation in shared forward passes.

``step()`` is the only way work gets done (vLLM's shape: schedule -> run the model -> update from
the output). Each running request has "computed" and "total" token counts and every step closes
part of the gap: a prefill chunk (at most ``max_prefill_chunk_tokens`` per step across the batch, so
other tabs keep streaming while a long prompt is processed) or one decode token. All rows go through
ONE forward: the linear layers run on the stacked rows, attention per sequence against its own KV
entry; each row is sampled with its own options and RNG.

Modes (``BatchingOptions``): continuous batching (default); ``prefill_only`` (the seed's mode:
prompts batched, each decode step run per request); ``enabled=False`` (one request at a time).
Whoever drives the engine calls ``step()``: the Qt worker, the background thread of ``start()``, or a
benchmark. ``submit``/``cancel``/``update_options`` are thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import kernels
from .errors import CacheBudgetError, ContextOverflowError, EngineError, EngineStoppedError, QueueFullError
from .generation import GenerationEvent, GenerationResult, ResultHandle
from .generation import Sequence as Seq
from .kv_cache import KvCacheEntry
from .kv_store import KvCacheOptions, LruKvCacheStore, SessionId
from .metrics import InMemoryRuntimeMetrics
from .model import Model, Row
from .options import options_from_dict, options_to_dict
from .prompting import PromptBuilder
from .sampling import InferenceOptions
from .speculative import Draft, Drafter

log = logging.getLogger(__name__)

MAX_DRAFT_TOKENS = 16
MAX_DRAFT_NGRAM = 8
EventCallback = Callable[[GenerationEvent], object]
Prompt = str | Sequence[Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class BatchingOptions:
    """The batcher's settings (names follow the runtime spec, in snake_case)."""

    enabled: bool = True
    max_batch_size: int = 8
    max_batch_wait_ms: float = 10.0
    max_total_queued_requests: int = 100
    prefill_only: bool = False
    max_prefill_chunk_tokens: int = 256
    cpu_threads: int = 0  # threads the kernels compute on; 0 = auto (cores free of other work)
    speculative: bool = True  # draft tokens from each request's context and verify them (speculative.py)
    draft_tokens: int = 7  # most tokens drafted per request per step; 0 turns drafting off
    draft_ngram_max: int = 3  # the longest n-gram looked up in the context to find a draft

    def __post_init__(self) -> None:
        for name in ("enabled", "prefill_only", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BatchingOptions.{name} must be true or false, got {getattr(self, name)!r}")
        limits = {"max_batch_size": (1, 256), "max_total_queued_requests": (1, 100_000),
                  "max_prefill_chunk_tokens": (1, 65_536),
                  "cpu_threads": (0, kernels.MAX_THREADS), "draft_tokens": (0, MAX_DRAFT_TOKENS),
                  "draft_ngram_max": (1, MAX_DRAFT_NGRAM)}  # fmt: skip
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"BatchingOptions.{name} must be a whole number in [{low}, {high}], got {value!r}"
                )
        wait = self.max_batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 10_000:
            raise ValueError(f"BatchingOptions.max_batch_wait_ms must be in [0, 10000] ms, got {wait!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchingOptions:
        return options_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return options_to_dict(self)


class RequestHandle(ResultHandle):
    """The caller's side of a submitted request: cancel it, wait for its result."""

    def __init__(self, seq: Seq, engine: BatchedInferenceEngine, on_event: EventCallback | None) -> None:
        super().__init__(seq.request_id, seq.session_id, on_event)
        self._engine = engine

    def cancel(self) -> None:
        """Ask the engine to stop this request at the next step (thread-safe)."""
        super().cancel()
        self._engine._wake()


def _failure(doing: str, cause: BaseException, request_id: int | None = None) -> EngineError:
    """The error that ends a request failed by a fault of its own (a bug, a bad file): it names what
    was being done and the cause; the traceback is logged once, here (the request ends with it)."""
    failure = EngineError(f"{doing} failed: {type(cause).__name__}: {str(cause)[:300]}")
    log.error(
        "%s: %s", "the engine" if request_id is None else f"request {request_id}", failure, exc_info=cause
    )
    return failure


@dataclass(eq=False, slots=True)
class _Running:
    seq: Seq
    handle: RequestHandle
    store_session: SessionId | None = None  # the store session whose entry this request uses
    anonymous: bool = False  # a store session made up for a request without session_id
    recompute: bool = False  # cache disabled: every step recomputes the whole sequence
    last_token_at: float | None = None
    draft: Draft | None = None  # tokens drafted after the newest one this step, verified by the forward


class BatchedInferenceEngine:
    """Serves every request through one scheduling step; see the module docstring."""

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        batching_options: BatchingOptions | None = None,
        kv_cache_store: LruKvCacheStore | None = None,
        metrics: InMemoryRuntimeMetrics | None = None,
        max_concurrent_sessions: int = 100,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.store = kv_cache_store if kv_cache_store is not None else LruKvCacheStore()
        self.store.set_model_identity(getattr(model, "identity", None))  # the disk tier's files must match
        self.metrics = metrics if metrics is not None else InMemoryRuntimeMetrics()
        self.max_concurrent_sessions = max_concurrent_sessions
        self._batching = batching_options or BatchingOptions()
        kernels.set_threads(self._batching.cpu_threads)
        self._prompts = PromptBuilder(tokenizer)
        self._queue_lock = threading.Lock()  # guards _waiting
        self._step_lock = threading.RLock()  # held for a whole step; options change between steps
        self._waiting: deque[tuple[Seq, RequestHandle]] = deque()
        self._running: list[_Running] = []  # in admission order: the last one is preempted first
        self._parked: dict[int, _Running] = {}  # request id -> its state while it waits for memory
        self._memory_blocked = False  # the queue's head found no room; look again when room is freed
        self._wakeup = threading.Event()
        self._stop_requested = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._external_driver = False
        self._wakeup_listeners: list[Callable[[], None]] = []
        self.drafter = Drafter()  # prompt-lookup drafts: which requests draft how many tokens
        self._logged: set[str] = set()  # faults logged with a traceback already (_log_once)

    # -- options -----------------------------------------------------------------------------
    @property
    def batching_options(self) -> BatchingOptions:
        return self._batching

    @property
    def cache_options(self) -> KvCacheOptions:
        return self.store.options

    def update_options(
        self, batching: BatchingOptions | None = None, cache: KvCacheOptions | None = None
    ) -> None:
        """Apply new settings between steps (waits for a running step to end)."""
        with self._step_lock:
            if batching is not None:
                self._batching = batching
                kernels.set_threads(batching.cpu_threads)
            if cache is not None:
                self.store.update_options(cache)
            self._memory_blocked = False
        self._wake()

    def session_token_limit(self) -> int:
        """How many tokens one conversation may hold (prompt and reply) with the current settings."""
        context = self.model.config.context_length
        options = self.store.options
        if not options.enabled:
            return context
        return options.effective_max_tokens(self.model.kv_shape(options.dtype), context)

    # -- submitting ----------------------------------------------------------------------------
    def submit(
        self,
        prompt_or_messages: Prompt,
        options: InferenceOptions | None = None,
        session_id: SessionId | None = None,
        on_event: EventCallback | None = None,
    ) -> RequestHandle:
        """Queue a request (thread-safe). Raises QueueFullError, ContextOverflowError, ValueError."""
        options = options or InferenceOptions()
        if self._stopped:
            raise EngineStoppedError("the engine is stopped; no new requests are accepted")
        prompt_ids, trimmed = self._prompts.build(prompt_or_messages, self.session_token_limit(), options)
        self._check_fits_alone(len(prompt_ids), options)
        seq = Seq(
            prompt_ids,
            options,
            decoder=self.tokenizer.stream_decoder(skip_special=True),
            eos_ids=frozenset(self.tokenizer.eos_ids),
            session_id=session_id,
            context_trimmed=trimmed,
        )
        handle = RequestHandle(seq, self, on_event)
        with self._queue_lock:  # stop() drains the queue under this lock: check again here
            if self._stopped:
                raise EngineStoppedError("the engine is stopped; no new requests are accepted")
            self._check_room(session_id)
            self._waiting.append((seq, handle))
            self.metrics.record_submitted()
            self.metrics.set_queue_state(len(self._waiting), len(self._running))
        if session_id is not None:  # in use from now on: the least recently used session is another one
            self.store.touch(session_id)
        self._wake()
        return handle

    def _check_fits_alone(self, n_prompt: int, options: InferenceOptions) -> None:
        """Refuse a request whose K/V could not fit the budget even with nothing else cached; every
        other request waits or is preempted, never failed, for lack of KV memory."""
        cache = self.store.options
        if not cache.enabled:
            return
        n_tokens = min(n_prompt + options.max_new_tokens, self.session_token_limit())  # then "length"
        n_bytes = n_tokens * self.model.kv_shape(cache.dtype).bytes_per_token
        if n_bytes > cache.max_bytes_total:
            raise CacheBudgetError(
                f"the request needs {n_bytes:,} bytes of KV cache ({n_prompt} prompt tokens + "
                f"max_new_tokens={options.max_new_tokens}), "
                f"more than max_bytes_total={cache.max_bytes_total:,}"
            )

    def _check_room(self, session_id: SessionId | None) -> None:
        n_waiting = len(self._waiting)
        if n_waiting >= self._batching.max_total_queued_requests:
            self.metrics.record_rejected()
            raise QueueFullError(f"queue is full ({n_waiting} waiting); try again later")
        if session_id is not None:
            active = {s.session_id for s, _ in self._waiting} | {r.seq.session_id for r in self._running}
            if session_id not in active and len(active - {None}) >= self.max_concurrent_sessions:
                self.metrics.record_rejected()
                raise QueueFullError(
                    f"too many conversations generating at once ({self.max_concurrent_sessions}); "
                    f"try again later"
                )

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step. Returns False when there was nothing to run (idle, or waiting for
        company for ``max_batch_wait_ms``).

        Memory policy (vLLM's): the running requests' next chunks get room first, oldest admitted
        first; one that cannot grow preempts the most recently admitted running request (requeued at
        the head of the queue, resumed later from its prompt + text so far). Then waiting requests
        are admitted in order while their first chunk has room; the first that has none waits at the
        head (nothing behind it overtakes it). A resumed request computes in the step it is admitted,
        so it has made progress before anyone can preempt it again, and the oldest running request
        is never preempted: every request that fits alone finishes."""
        if self._thread is None or threading.current_thread() is not self._thread:
            self._external_driver = True
        with self._step_lock:
            now = time.perf_counter()
            try:
                self._reap(now)
                if not self._running and self._waiting_for_company(now):
                    return False
                self._fit_budget(now)
                rows, budget = self._plan(list(self._running), self._batching.max_prefill_chunk_tokens)
                rows = self._reserve_rows(rows, now)
                rows += self._admit(now, budget)
                rows = self._add_drafts(rows)
                if not rows:
                    return bool(self._running)
                for batch in self._batches(rows):
                    self._run(batch)
                return True
            except Exception as exc:  # no request to blame: the running ones fail, the engine goes on
                self._fail_running(_failure("the engine step", exc))
                return True
            finally:  # also after a step that only reaped or admitted: the dock shows these
                self._publish_queue_state()

    def _fail_running(self, failed: EngineError) -> None:
        now = time.perf_counter()
        for run in list(self._running):
            run.draft = None
            self._retire(run, run.seq.finish("error", now, error=str(failed)))

    def _log_once(self, key: str, message: str, *args: object, exc: BaseException) -> None:
        """A warning with its traceback the first time, a debug line after (a fault must not flood)."""
        if key in self._logged:
            log.debug(message, *args)
        else:
            self._logged.add(key)
            log.warning(message, *args, exc_info=exc)

    def _publish_queue_state(self) -> None:
        with self._queue_lock:  # submit() appends from other threads
            n_waiting = len(self._waiting)
            n_memory = sum(1 for seq, _ in self._waiting if seq.waiting_for_memory)
        self.metrics.set_queue_state(n_waiting, len(self._running), n_memory)

    def seconds_until_ready(self) -> float | None:
        """0 when a step would run now, the time left to wait for company, or None when idle."""
        if self._running:
            return 0.0
        with self._queue_lock:
            if not self._waiting:
                return None
            oldest = self._waiting[0][0].submitted_at
        if not self._company_rule_applies():
            return 0.0
        left = self._batching.max_batch_wait_ms / 1000.0 - (time.perf_counter() - oldest)
        return max(0.0, left)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def _company_rule_applies(self) -> bool:
        b = self._batching
        return b.enabled and b.max_batch_wait_ms > 0 and len(self._waiting) < b.max_batch_size

    def _waiting_for_company(self, now: float) -> bool:
        """When idle, the first request waits up to max_batch_wait_ms for others to batch with."""
        with self._queue_lock:
            if not self._waiting or not self._company_rule_applies():
                return False
            age_ms = (now - self._waiting[0][0].submitted_at) * 1000.0
        return age_ms < self._batching.max_batch_wait_ms

    def _reap(self, now: float) -> None:
        """Finish cancelled and timed-out requests, waiting or running."""
        with self._queue_lock:
            ended = [(s, h) for s, h in self._waiting if h.cancel_requested or s.timed_out(now)]
            for item in ended:
                self._waiting.remove(item)
        for seq, handle in ended:
            reason = "cancelled" if handle.cancel_requested else "timeout"
            self._end_waiting(seq, handle, seq.finish(reason, now))  # type: ignore[arg-type]
        for run in list(self._running):
            if run.handle.cancel_requested:
                self._retire(run, run.seq.finish("cancelled", now))
            elif run.seq.timed_out(now):
                self._retire(run, run.seq.finish("timeout", now))

    def _end_waiting(self, seq: Seq, handle: RequestHandle, event: GenerationEvent) -> None:
        """A queued request ended (cancelled, timed out, failed, engine stopped)."""
        self._memory_blocked = False  # it may have been the head that found no room
        parked = self._parked.pop(seq.request_id, None)
        self.drafter.forget(seq.request_id)
        if parked is not None and parked.anonymous and parked.store_session is not None:
            self.store.remove(parked.store_session)  # a preempted request's made-up session
        assert event.result is not None
        self.metrics.record_finished(event.result.finish_reason, seq.n_prompt)  # before the caller hears
        handle._deliver(event)

    # -- memory: room for every row, preemption --------------------------------------------------
    def _fit_budget(self, now: float) -> None:
        """After the budget shrank below what running requests hold: preempt the most recent ones."""
        while self._running and self.store.options.enabled and self.store.bytes_over_budget():
            self._preempt(self._running[-1], now)

    def _reserve_rows(
        self, rows: list[tuple[_Running, np.ndarray]], now: float
    ) -> list[tuple[_Running, np.ndarray]]:
        """Room for each running request's next chunk, oldest admitted first; one that cannot grow
        preempts the most recently admitted running request (itself, if it is that one)."""
        ready = []
        for run, chunk in rows:
            while run in self._running:
                try:
                    self._grow(run, len(chunk))
                    ready.append((run, chunk))
                    break
                except ContextOverflowError:
                    self._retire(run, run.seq.finish("length", now))
                except CacheBudgetError:
                    self._preempt(self._running[-1], now)
                except Exception as exc:  # this request fails; the others go on
                    failed = _failure("reserving its KV cache", exc, run.seq.request_id)
                    self._retire(run, run.seq.finish("error", now, error=str(failed)))
        return [(run, chunk) for run, chunk in ready if run in self._running]

    @staticmethod
    def _grow(run: _Running, n_tokens: int) -> None:
        entry = run.seq.cache
        assert entry is not None
        entry.ensure_capacity(entry.n_tokens + n_tokens)

    def _preempt(self, run: _Running, now: float) -> None:
        """Take a running request off the batch and requeue it at the head. Its session is unpinned,
        so its K/V stay cached until the store needs the room (LRU): it resumes from what is left."""
        self._running.remove(run)
        if run.store_session is not None:
            self.store.unpin(run.store_session)
        run.seq.preempt()
        self.metrics.record_preemption()
        log.debug("preempted request %d (%d tokens so far)", run.seq.request_id, len(run.seq.all_ids))
        self._park(run)
        self._memory_blocked = False  # its room may let the head of the queue in

    def _park(self, run: _Running) -> None:
        """Requeue a request at the head of the queue, waiting for memory; tell its caller once."""
        self._parked[run.seq.request_id] = run
        with self._queue_lock:
            if (run.seq, run.handle) not in self._waiting:
                self._waiting.appendleft((run.seq, run.handle))
        if not run.seq.waiting_for_memory:
            run.seq.waiting_for_memory = True
            run.handle._deliver(GenerationEvent(run.seq.request_id, "waiting"))

    # -- admission -------------------------------------------------------------------------------
    def _admit(self, now: float, budget: int) -> list[tuple[_Running, np.ndarray]]:
        """Admit waiting requests in order (one per session at a time) while the batch has a slot,
        the step has prefill budget and the first chunk has room; returns their rows."""
        limit = self._batching.max_batch_size if self._batching.enabled else 1
        busy = {r.seq.session_id for r in self._running if r.seq.session_id is not None}
        rows: list[tuple[_Running, np.ndarray]] = []
        while len(self._running) < limit and budget > 0 and not self._memory_blocked:
            with self._queue_lock:
                picked = next(((s, h) for s, h in self._waiting if s.session_id not in busy), None)
            if picked is None:
                break
            seq, handle = picked
            admitted = self._try_admit(seq, handle, now, budget)
            if admitted is None:
                continue  # it ended (an error, or its length); the next one may go
            if admitted is False:
                break  # it waits for memory at the head of the queue
            row, budget = admitted
            rows.append(row)
            if seq.session_id is not None:
                busy.add(seq.session_id)
        return rows

    def _try_admit(
        self, seq: Seq, handle: RequestHandle, now: float, budget: int
    ) -> tuple[tuple[_Running, np.ndarray], int] | Literal[False] | None:
        """Attach the request's cache and reserve its first chunk: (its row, the prefill budget left);
        None when it ended (an error or, resumed, its length); False when it waits for memory."""
        previous = self._parked.get(seq.request_id)
        try:
            run = self._attach_cache(seq, handle, previous)
        except CacheBudgetError as exc:  # max_sessions, every session in use by a running request
            return self._no_room(seq, handle, None, now, exc)
        except (EngineError, ValueError) as exc:
            self._refuse(seq, handle, None, now, exc)
            return None
        except Exception as exc:  # a bug or a bad file met while preparing it: this request fails alone
            self._refuse(seq, handle, None, now, _failure("preparing the request", exc, seq.request_id))
            return None
        (row,), budget = self._plan([run], budget)
        try:
            self._grow(run, len(row[1]))
        except CacheBudgetError as exc:
            return self._no_room(seq, handle, run, now, exc)
        except ContextOverflowError as exc:
            self._refuse(seq, handle, run, now, exc)
            return None
        except Exception as exc:
            self._refuse(seq, handle, run, now, _failure("reserving its KV cache", exc, seq.request_id))
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
        return row, budget

    def _no_room(
        self, seq: Seq, handle: RequestHandle, run: _Running | None, now: float, exc: CacheBudgetError
    ) -> Literal[False] | None:
        """No room for a waiting request: it waits at the head, unless nothing runs (then it cannot
        fit even alone, and waiting would be forever)."""
        if run is not None:
            self._parked[seq.request_id] = run  # keeps a made-up session for when it is admitted
            if run.store_session is not None:
                self.store.unpin(run.store_session)
            seq.cache, seq.n_computed = None, 0
        if not self._running:
            message = f"the request does not fit the KV cache budget even alone: {exc}"
            self._unqueue(seq, handle)
            self._end_waiting(seq, handle, seq.finish("error", now, error=message))
            return None
        self._memory_blocked = True
        if not seq.waiting_for_memory:
            seq.waiting_for_memory = True
            handle._deliver(GenerationEvent(seq.request_id, "waiting"))
        return False

    def _refuse(
        self, seq: Seq, handle: RequestHandle, run: _Running | None, now: float, exc: Exception
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
        self._end_waiting(seq, handle, event)

    def _unqueue(self, seq: Seq, handle: RequestHandle) -> None:
        with self._queue_lock:
            if (seq, handle) in self._waiting:
                self._waiting.remove((seq, handle))

    def _attach_cache(self, seq: Seq, handle: RequestHandle, previous: _Running | None) -> _Running:
        """The request's KV entry, reusing what its session caches of prompt + text so far."""
        options = self.store.options
        context = self.model.config.context_length
        last_token_at = previous.last_token_at if previous is not None else None
        if not options.enabled:
            seq.cache = KvCacheEntry(self.model.kv_shape(), context)
            return _Running(seq, handle, recompute=True, last_token_at=last_token_at)
        if previous is not None and previous.store_session is not None:
            session, anonymous = previous.store_session, previous.anonymous
        else:
            session = seq.session_id if isinstance(seq.session_id, SessionId) else SessionId.new_id()
            anonymous = seq.session_id is None
        shape = self.model.kv_shape(options.dtype)
        entry, n_reused = self.store.prepare(session, shape, seq.all_ids, context, pin=True, record=False)
        seq.cache = entry
        seq.reset_computed(n_reused)
        return _Running(seq, handle, store_session=session, anonymous=anonymous, last_token_at=last_token_at)

    def _plan(self, runs: list[_Running], budget: int) -> tuple[list[tuple[_Running, np.ndarray]], int]:
        """Each request's next chunk (prefill chunks share ``budget``); returns the rows and what is
        left of the budget."""
        rows: list[tuple[_Running, np.ndarray]] = []
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

    def _batches(self, rows: list[tuple[_Running, np.ndarray]]) -> list[list[tuple[_Running, np.ndarray]]]:
        """The rows grouped into forward passes by the batching mode."""
        prefill = [(run, chunk) for run, chunk in rows if run.seq.in_prefill]
        decode = [(run, chunk) for run, chunk in rows if not run.seq.in_prefill]
        if self._batching.prefill_only:
            return ([prefill] if prefill else []) + [[row] for row in decode]
        return [prefill + decode]

    def _run(self, batch: list[tuple[_Running, np.ndarray]]) -> None:
        started = time.perf_counter()
        ready = [(run, chunk) for run, chunk in batch if run in self._running]
        for run, _ in batch:
            if run not in self._running:  # ended earlier in this step: its draft is not verified
                run.draft = None
        if not ready:
            return
        try:
            logits = self._forward(ready)
        except Exception as exc:  # no one request to blame: this batch's requests fail, not the engine
            failed = _failure(f"the forward pass of {len(ready)} request(s)", exc)
            now = time.perf_counter()
            for run, _ in ready:
                run.draft = None
                self._retire(run, run.seq.finish("error", now, error=str(failed)))
            return
        now = time.perf_counter()
        n_prefill = sum(len(c) for r, c in ready if r.seq.in_prefill or r.recompute)
        n_decode = len(ready) - sum(1 for r, _ in ready if r.seq.in_prefill)
        self.metrics.record_step(len(ready), n_prefill, n_decode, now - started, len(self._waiting),
                                 len(self._running))  # fmt: skip
        for (run, chunk), row_logits in zip(ready, logits, strict=True):
            if run.draft is not None:
                self._after_verify(run, row_logits, now)
                continue
            run.seq.mark_computed(len(chunk))
            self._after_forward(run, row_logits, now)

    def _after_forward(self, run: _Running, logits: np.ndarray, now: float) -> None:
        seq = run.seq
        try:
            event = seq.on_logits(logits, now)
        except Exception as exc:
            log.exception("sampling failed for request %d", seq.request_id)
            event = seq.finish("error", now, error=f"sampling failed: {exc}")
        if event.kind != "prefill":
            self.metrics.record_sampled(0, 0)
        self._publish(run, event, now)

    def _publish(self, run: _Running, event: GenerationEvent, now: float) -> None:
        """Count a step's tokens for a request and tell its caller (or retire it when it ended)."""
        seq = run.seq
        if event.kind != "prefill" and (event.token_ids or event.kind == "token"):
            self.metrics.record_tokens(len(event.token_ids))
            if run.last_token_at is None:
                self.metrics.record_ttft((now - seq.submitted_at) * 1000.0)
            else:
                self.metrics.record_inter_token((now - run.last_token_at) * 1000.0)
            run.last_token_at = now
        if event.result is not None:
            self._retire(run, event)
        else:
            run.handle._deliver(event)

    # -- drafting (speculative.py) ------------------------------------------------------------------
    def _add_drafts(self, rows: list[tuple[_Running, np.ndarray]]) -> list[tuple[_Running, np.ndarray]]:
        """Append drafted tokens to the decode rows of the requests the drafter picks (those whose
        K/V have room for them; a draft never preempts anyone)."""
        options = self._batching
        if not options.speculative or options.draft_tokens == 0:
            return rows
        candidates = []
        for run, _ in rows:
            seq = run.seq
            if seq.in_prefill or run.recompute or seq.cache is None or not seq.options.allow_drafting:
                continue
            room = min(
                seq.options.max_new_tokens - len(seq.generated) - 1,  # the drafts and the token after them
                min(seq.cache.max_tokens, self.model.config.context_length) - len(seq.all_ids),
            )
            if room > 0:
                candidates.append((seq.request_id, seq.all_ids, room))
        if options.prefill_only:  # each decode row is a forward of its own
            groups = [([c], 1, 1) for c in candidates]
        else:
            n_decode = sum(1 for run, _ in rows if not run.seq.in_prefill)
            groups = [(candidates, sum(len(chunk) for _, chunk in rows), n_decode)] if candidates else []
        drafts: dict[int, Draft] = {}
        try:
            for group, n_rows, n_decode in groups:
                drafts.update(
                    self.drafter.propose(
                        group, n_rows, n_decode, options.draft_tokens, options.draft_ngram_max
                    )
                )
        except Exception as exc:  # drafting only saves time: this step runs without drafts
            self._log_once("drafting", "drafting failed (%s: %s); steps run without drafts until it works",
                           type(exc).__name__, exc, exc=exc)  # fmt: skip
            return rows
        return [self._with_draft(run, chunk, drafts.get(run.seq.request_id)) for run, chunk in rows]

    @staticmethod
    def _with_draft(run: _Running, chunk: np.ndarray, draft: Draft | None) -> tuple[_Running, np.ndarray]:
        entry = run.seq.cache
        if draft is None or entry is None:
            return run, chunk
        try:
            entry.ensure_capacity(entry.n_tokens + len(chunk) + len(draft.token_ids))
        except Exception:  # no room (or a fault): this row runs without its draft; its own chunk decides
            return run, chunk
        run.draft = draft
        return run, np.concatenate([chunk, np.asarray(draft.token_ids, dtype=np.int64)])

    def _forward(self, ready: list[tuple[_Running, np.ndarray]]) -> np.ndarray | list[np.ndarray]:
        """The logits of each row's last token, and of every drafted position of a drafting row."""
        rows = [Row(chunk, run.seq.cache) for run, chunk in ready]  # type: ignore[arg-type]
        if all(run.draft is None for run, _ in ready):
            return self.model.forward_last(rows)
        tails = [1 if run.draft is None else 1 + len(run.draft.token_ids) for run, _ in ready]
        logits = self.model.forward_tails(rows, tails)  # [(n_i, V)]
        return [row if run.draft is not None else row[0] for (run, _), row in zip(ready, logits, strict=True)]

    def _after_verify(self, run: _Running, logits: np.ndarray, now: float) -> None:
        """Take the drafts the request's sampling agrees with; forget the K/V of the others."""
        seq, draft = run.seq, run.draft
        assert draft is not None and seq.cache is not None
        run.draft = None
        try:
            event, n_taken = seq.on_draft_logits(logits, draft.token_ids, now)
        except Exception as exc:
            log.exception("sampling failed for request %d", seq.request_id)
            event, n_taken = seq.finish("error", now, error=f"sampling failed: {exc}"), 0
        seq.mark_computed(1 + n_taken)  # the newest token and the drafts taken; the rest is undone
        seq.cache.trim(seq.n_computed)
        self.drafter.record(seq.request_id, draft, n_taken)
        self.metrics.record_sampled(len(draft.token_ids), n_taken)
        self._publish(run, event, now)

    def _retire(self, run: _Running, final: GenerationEvent) -> None:
        """A running request ended: release its session, count it, tell the caller."""
        self._memory_blocked = False  # its room may let the head of the queue in
        if run in self._running:
            self._running.remove(run)
        self.drafter.forget(run.seq.request_id)
        if run.store_session is not None:
            try:
                self.store.unpin(run.store_session)
                if run.anonymous:
                    self.store.remove(run.store_session)
            except Exception as exc:  # the request still ends, and its caller hears of it
                self._log_once("release", "releasing a KV session failed (%s: %s)", type(exc).__name__, exc,
                               exc=exc)  # fmt: skip
        assert final.result is not None
        self.metrics.record_finished(final.result.finish_reason, final.result.prompt_tokens)
        run.handle._deliver(final)  # counted before the caller hears of it

    # -- drivers -------------------------------------------------------------------------------
    def add_wakeup_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the submitting thread) whenever new work arrives: for a driver that
        steps the engine from its own event loop while others submit (the app's API server)."""
        self._wakeup_listeners.append(listener)

    def _wake(self) -> None:
        self._wakeup.set()
        for listener in self._wakeup_listeners:
            listener()

    def start(self) -> None:
        """Drive the engine from a background thread (headless and asyncio use)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_requested.clear()
        self._thread = threading.Thread(target=self._drive, name="smallmind-engine", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        n_failed = 0  # steps in a row that raised
        while not self._stop_requested.is_set():
            try:
                worked = self.step()
                n_failed = 0
            except Exception as exc:  # step() fails requests itself; this is a bug: log it, back off
                n_failed += 1
                self._log_once("drive", "engine step failed (%s: %s)", type(exc).__name__, exc, exc=exc)
                self._wakeup.wait(min(1.0, 0.01 * 2**n_failed))
                self._wakeup.clear()
                continue
            if not worked:
                wait = self.seconds_until_ready()
                self._wakeup.wait(0.5 if wait is None else max(wait, 0.0005))
                self._wakeup.clear()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the driver thread and fail every waiting or running request with a clear message."""
        with self._queue_lock:
            self._stopped = True
        self._stop_requested.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None
        with self._step_lock:
            now = time.perf_counter()
            message = "the engine was stopped before this request finished"
            with self._queue_lock:
                waiting, self._waiting = list(self._waiting), deque()
            for seq, handle in waiting:
                self._end_waiting(seq, handle, seq.finish("error", now, error=message))
            for run in list(self._running):
                self._retire(run, run.seq.finish("error", now, error=message))

    def _ensure_driver(self) -> None:
        if not self._external_driver:
            self.start()

    # -- asyncio API ---------------------------------------------------------------------------
    async def generate(
        self,
        prompt_or_messages: Prompt,
        options: InferenceOptions | None = None,
        session_id: SessionId | None = None,
    ) -> GenerationResult:
        """Run one request to the end and return its result."""
        final: GenerationResult | None = None
        async for event in self.generate_streaming(prompt_or_messages, options, session_id):
            final = event.result or final
        assert final is not None
        return final

    async def generate_streaming(
        self,
        prompt_or_messages: Prompt,
        options: InferenceOptions | None = None,
        session_id: SessionId | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Yield the request's events as the engine produces them; the last one carries the result."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        handle = self.submit(
            prompt_or_messages, options, session_id,
            on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        )  # fmt: skip
        self._ensure_driver()
        try:
            while True:
                event = await events.get()
                yield event
                if event.kind == "done":
                    return
        finally:
            if not handle.done():
                handle.cancel()
