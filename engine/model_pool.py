"""Several local models at once: loaded on demand, kept under a memory budget, stepped in turn.

LM Studio and Ollama's model handling. ``ModelPool`` knows models by id (the file name without
``.gguf``) and gives each loaded one its own ``BatchedInferenceEngine`` (which batches that model's
requests); every engine shares one ``LruKvCacheStore`` (one KV budget), with sessions per (model,
conversation) (``SessionId.model``).

- Requests: ``submit(model_id, ...)`` answers at once with a handle. A model not loaded is loaded on
  the loader thread (the request hears a "loading" event first) and the request goes to its engine
  when it is ready: it never fails for the model not being loaded.
- Memory (``model_residency.py``): the loaded models' weights stay within ``max_loaded_bytes``; the
  least recently used idle models are unloaded first, never one with a request; an idle
  time-to-live.
- Steps: ``step()`` runs one step of one model: of those ready now, the one that has used the least
  compute time (fair by time, so a small and a large model each get about half the CPU); a model
  that becomes ready starts level with the others. One driver calls it (``start()``'s thread, or the
  app's worker): the kernels' threads are shared, never doubled. Loads run on their own thread, so
  the other models keep streaming meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import kernels
from .batching import BatchedInferenceEngine, BatchingOptions, EventCallback, Prompt
from .errors import EngineStoppedError
from .generation import GenerationEvent, GenerationResult, ResultHandle, new_request_id
from .kv_store import KvCacheOptions, LruKvCacheStore, SessionId
from .metrics import InMemoryRuntimeMetrics
from .model import Model
from .model_residency import (
    Loader,
    ModelPoolOptions,
    ModelSlot,
    Residency,
    default_max_loaded_bytes,
    installed_models,
    load_files,
)
from .sampling import InferenceOptions
from .tokenizer import Tokenizer

__all__ = [
    "ModelPool",
    "ModelPoolOptions",
    "PoolHandle",
    "PoolModel",
    "default_max_loaded_bytes",
    "installed_models",
    "load_files",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolModel:
    """One row of ``ModelPool.models()``: what the app's picker and ``/v1/models`` show."""

    model_id: str
    path: str
    state: str  # "loaded", "loading", "unloaded" or "failed"
    weights_bytes: int  # in memory now, else what the last load took (or the file's size)
    n_requests: int  # submitted through the pool and not finished, including those waiting for the load
    load_s: float | None  # how long its last load took
    error: str | None  # why its last load failed
    compute_s: float = 0.0  # time its steps took (the turns go to the ready model with the least)


class PoolHandle(ResultHandle):
    """The caller's side of a pool request: its events (re-stamped with this handle's id), cancel."""

    def __init__(self, pool: ModelPool, model_id: str, session_id: object, on_event: EventCallback | None):
        super().__init__(new_request_id(), session_id, on_event)
        self.model_id = model_id
        self._pool = pool
        self.inner: ResultHandle | None = None  # the engine's handle, once submitted to it
        self.scoped_session: SessionId | None = None  # the store session it uses (per model)
        self.anonymous = False  # a session made up for a request without one: removed at the end

    def cancel(self) -> None:
        super().cancel()
        self._pool._cancel(self)


@dataclass(eq=False, slots=True)
class _Pending:
    """A request waiting for its model's load."""

    handle: PoolHandle
    prompt: Prompt
    options: InferenceOptions | None
    session_id: SessionId | None
    engine_kwargs: dict[str, Any]


class ModelPool:
    """See the module docstring. Thread-safe: submit, cancel, lease and the options from any
    thread; ``step()`` from one driver."""

    def __init__(
        self,
        models: Mapping[str, str | os.PathLike[str]] | None = None,
        options: ModelPoolOptions | None = None,
        batching_options: BatchingOptions | None = None,
        kv_cache_store: LruKvCacheStore | None = None,
        loader: Loader = load_files,
    ) -> None:
        self.batching_options = batching_options or BatchingOptions()
        self.store = kv_cache_store if kv_cache_store is not None else LruKvCacheStore()
        self._step_lock = threading.RLock()  # one step (of one model) at a time
        self._models = Residency(options or ModelPoolOptions(), self._make_engine, loader, self._on_loaded,
                                 self._on_load_failed)  # fmt: skip
        self._lock = self._models.lock
        self._memory_freed = False  # a request ended: engines waiting for KV room may look again
        self._wakeup = threading.Event()
        self._wakeup_listeners: list[Callable[[], None]] = []
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        for model_id, path in (models or {}).items():
            self.add_model(path, model_id)

    @property
    def options(self) -> ModelPoolOptions:
        return self._models.options

    # -- the catalog ---------------------------------------------------------------------------
    def add_model(self, path: str | os.PathLike[str], model_id: str | None = None) -> str:
        """Make a GGUF file available under ``model_id`` (default: its name without .gguf; a name
        taken by another file gets -2, -3...). The same file again returns its id."""
        return self._models.add(Path(path).expanduser(), model_id)

    def model_ids(self) -> list[str]:
        with self._lock:
            return list(self._models.slots)

    def path_of(self, model_id: str) -> Path:
        return self._models.slot(model_id).path

    def is_loaded(self, model_id: str) -> bool:
        return self._models.slot(model_id).engine is not None

    def loaded_engine(self, model_id: str) -> BatchedInferenceEngine | None:
        """The model's engine if it is loaded now (no load started, nothing kept)."""
        return self._models.slot(model_id).engine

    def metrics(self, model_id: str) -> InMemoryRuntimeMetrics:
        """The model's batching metrics, counted across its loads."""
        return self._models.slot(model_id).metrics

    def identity_of(self, model_id: str) -> str | None:
        """The model's identity (``Model.identity``) once it has been loaded, else None."""
        return self._models.slot(model_id).identity

    @property
    def loaded_bytes(self) -> int:
        return self._models.loaded_bytes

    def models(self) -> list[PoolModel]:
        with self._lock:
            return [self._row(slot) for slot in self._models.slots.values()]

    @staticmethod
    def _row(slot: ModelSlot) -> PoolModel:
        state = ("loaded" if slot.engine is not None else "loading" if slot.loading
                 else "failed" if slot.error else "unloaded")  # fmt: skip
        weights = slot.nbytes if slot.engine is not None else slot.estimate_bytes
        return PoolModel(slot.model_id, str(slot.path), state, weights, slot.n_requests, slot.load_s,
                         slot.error, slot.used_s)  # fmt: skip

    # -- loading -------------------------------------------------------------------------------
    def load(self, model_id: str) -> None:
        """Start loading a model now (a tab picked it): its first request will not wait as long."""
        slot = self._models.slot(model_id)
        with self._lock:
            slot.last_used = time.monotonic()
            self._models.request_load(slot)

    def lease(self, model_id: str, timeout_s: float | None = None) -> BatchedInferenceEngine:
        """The model's engine, loaded first if needed (blocks: never call it on the driver's thread);
        the model stays loaded until ``release(model_id)``. For callers that submit to the engine
        themselves (the API server), with sessions ``SessionId.for_model(engine.model.identity)``: once
        a request is submitted, its work keeps the model loaded. Raises the load's error."""
        return self._models.lease(model_id, timeout_s)

    def release(self, model_id: str) -> None:
        """End a ``lease``."""
        self._models.release(model_id)

    def unload(self, model_id: str) -> bool:
        """Unload a model now if it is idle (True), else leave it (False)."""
        return self._models.unload(self._models.slot(model_id), "asked to")

    def _make_engine(self, slot: ModelSlot, model: Model, tokenizer: Tokenizer) -> BatchedInferenceEngine:
        engine = BatchedInferenceEngine(model, tokenizer, self.batching_options, self.store, slot.metrics)
        self.store.set_model_identity(None)  # sessions name their model (SessionId.model); none is "the" one
        engine.add_wakeup_listener(self._wake)
        return engine

    def _on_loaded(self, slot: ModelSlot, pending: list[_Pending]) -> None:
        engine = slot.engine
        assert engine is not None
        for p in pending:
            if p.handle.cancel_requested:
                self._end_pending(slot, p.handle, "cancelled")
                continue
            try:
                self._submit_to(slot, engine, p.handle, p.prompt, p.options, p.session_id, p.engine_kwargs)
            except Exception as exc:  # refused by the engine (too long, queue full...): that request ends
                self._end_pending(slot, p.handle, "error", str(exc))
        self._wake()

    def _on_load_failed(self, slot: ModelSlot, pending: list[_Pending], message: str) -> None:
        for p in pending:
            self._end_pending(slot, p.handle, "error", message)
        self._wake()

    # -- requests ------------------------------------------------------------------------------
    def submit(
        self,
        model_id: str,
        prompt_or_messages: Prompt,
        options: InferenceOptions | None = None,
        session_id: SessionId | None = None,
        on_event: EventCallback | None = None,
        **engine_kwargs: Any,
    ) -> PoolHandle:
        """Queue a request for ``model_id`` (thread-safe); loads the model first when it is not
        loaded. Raises UnknownModelError, and what ``BatchedInferenceEngine.submit`` raises when the
        model is loaded (after a load, those end the request with an error instead)."""
        slot = self._models.slot(model_id)
        if self._models.stopped:
            raise EngineStoppedError("the model pool is stopped; no new requests are accepted")
        handle = PoolHandle(self, model_id, session_id, on_event)
        with self._lock:
            slot.n_requests += 1
            slot.last_used = time.monotonic()
            engine = slot.engine
            if engine is None:  # "loading" first: the load hands pending requests over under this lock
                slot.pending.append(_Pending(handle, prompt_or_messages, options, session_id, engine_kwargs))
                self._models.request_load(slot)
                handle._deliver(GenerationEvent(handle.request_id, "loading"))
                return handle
        try:
            self._submit_to(slot, engine, handle, prompt_or_messages, options, session_id, engine_kwargs)
        except BaseException:
            self._request_ended(slot, None)
            raise
        return handle

    def _submit_to(
        self,
        slot: ModelSlot,
        engine: BatchedInferenceEngine,
        handle: PoolHandle,
        prompt: Prompt,
        options: InferenceOptions | None,
        session_id: SessionId | None,
        engine_kwargs: dict[str, Any],
    ) -> None:
        if session_id is None:  # a session of this model's own, dropped when the request ends
            scoped, handle.anonymous = SessionId.new_id(model=slot.identity), True
        else:
            scoped = session_id.for_model(slot.identity)
        handle.scoped_session = scoped
        kwargs: dict[str, Any] = {
            k: v.inner if isinstance(v, PoolHandle) else v for k, v in engine_kwargs.items()
        }
        inner = engine.submit(prompt, options, scoped, on_event=lambda e: self._relay(slot, handle, e),
                              **kwargs)  # fmt: skip
        handle.inner = inner
        if handle.cancel_requested:  # cancelled while it was being submitted
            inner.cancel()

    def _relay(self, slot: ModelSlot, handle: PoolHandle, event: GenerationEvent) -> None:
        """An engine event for a pool request: the pool's books first, then the caller hears of it."""
        if event.result is not None:
            self._request_ended(slot, handle, event.result)
        handle._deliver(dataclasses.replace(event, request_id=handle.request_id))

    def _request_ended(
        self, slot: ModelSlot, handle: PoolHandle | None, result: GenerationResult | None = None
    ) -> None:
        if handle is not None and handle.anonymous and handle.scoped_session is not None:
            self.store.remove(handle.scoped_session)
        with self._lock:
            slot.n_requests = max(0, slot.n_requests - 1)
            slot.last_used = time.monotonic()
            if result is not None:
                slot.n_finished += 1
                slot.prompt_tokens += result.prompt_tokens
                slot.reused_tokens += result.reused_tokens
            self._memory_freed = True
            self._models.changed.notify_all()
        self._wake()

    def _cancel(self, handle: PoolHandle) -> None:
        slot = self._models.slot(handle.model_id)
        with self._lock:
            pending = next((p for p in slot.pending if p.handle is handle), None)
            if pending is not None:
                slot.pending.remove(pending)
        if pending is not None:
            self._end_pending(slot, handle, "cancelled")
        elif handle.inner is not None:
            handle.inner.cancel()

    def _end_pending(
        self, slot: ModelSlot, handle: PoolHandle, reason: str, error: str | None = None
    ) -> None:
        """A request that never reached an engine ends (cancelled, or its model failed to load)."""
        result = GenerationResult("", (), reason, 0, error=error)  # type: ignore[arg-type]
        self._request_ended(slot, None, result)
        handle._deliver(GenerationEvent(handle.request_id, "done", result=result))

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """One step of one model's engine (see the module docstring). False when no model had
        anything to run now."""
        with self._step_lock:
            self._models.expire_idle()
            slot = self._next_slot()
            if slot is None:
                return False
            engine = slot.engine
            assert engine is not None
            started = time.perf_counter()
            try:
                return engine.step()
            finally:
                slot.used_s += time.perf_counter() - started
                slot.was_ready = slot.was_ready and engine.has_work  # done: next time it starts level

    def _next_slot(self) -> ModelSlot | None:
        """The ready model that used the least compute time; one that just became ready starts
        level with the others (its idle time is no credit)."""
        with self._lock:
            freed, self._memory_freed = self._memory_freed, False
        loaded = self._models.loaded()
        if freed:  # a request ended: KV room may have freed for another model's waiting requests
            for s in loaded:
                if s.engine is not None and s.engine.has_work:
                    s.engine.update_options()
        ready = [s for s in loaded if s.engine is not None and s.engine.seconds_until_ready() == 0.0]
        running = [s for s in ready if s.was_ready]
        # level with the least served of those running; when none ran, with each other
        floor = min((s.used_s for s in running), default=max((s.used_s for s in ready), default=0.0))
        for s in loaded:
            if s in ready and not s.was_ready:
                s.used_s = max(s.used_s, floor)
            s.was_ready = s in ready
        return min(ready, key=lambda s: s.used_s, default=None)

    def seconds_until_ready(self) -> float | None:
        """0 when a step would run now, else how long until one might (a batch wait), or None when no
        model has work (see ``seconds_until_expiry`` for the idle models' time-to-live)."""
        waits = [
            w for s in self._models.loaded() if s.engine and (w := s.engine.seconds_until_ready()) is not None
        ]
        return min(waits, default=None)

    def seconds_until_expiry(self) -> float | None:
        """How long until an idle model's time-to-live ends (None: none will): a driver calls
        ``expire_idle`` (or ``step``) then."""
        return self._models.next_expiry_s()

    def expire_idle(self) -> None:
        """Unload the models idle for longer than their time-to-live (``step`` does it too)."""
        with self._step_lock:
            self._models.expire_idle()

    @property
    def has_work(self) -> bool:
        """A loaded model has requests (those waiting for a load are not work yet: the load's end
        wakes the driver)."""
        return any(s.engine is not None and s.engine.has_work for s in self._models.loaded())

    # -- options -------------------------------------------------------------------------------
    def update_options(
        self,
        pool: ModelPoolOptions | None = None,
        batching: BatchingOptions | None = None,
        cache: KvCacheOptions | None = None,
    ) -> None:
        """Apply new settings between steps: a smaller budget or TTL unloads idle models at once."""
        with self._step_lock:
            if batching is not None:
                self.batching_options = batching
                kernels.set_threads(batching.cpu_threads)
            if cache is not None:
                self.store.update_options(cache)
            if pool is not None:
                self._models.options = pool
            for slot in self._models.loaded():
                if slot.engine is not None:
                    slot.engine.update_options(batching=batching)
            self._models.expire_idle()
        self._models.fit_budget()
        self._wake()

    # -- KV sessions of a conversation, every model's ----------------------------------------------
    def sessions_of(self, session_id: SessionId) -> list[SessionId]:
        """The conversation's session with each model the pool has loaded (and the unscoped one)."""
        with self._lock:
            identities = {s.identity for s in self._models.slots.values() if s.identity is not None}
        return [session_id.for_model(None), *(session_id.for_model(i) for i in sorted(identities))]

    def kv_by_model(self) -> dict[str, dict[str, int]]:
        """The KV store's sessions and bytes, and each model's prompt reuse, by model id."""
        with self._lock:
            slots = list(self._models.slots.values())
            names: dict[str | None, str] = {s.identity: s.model_id for s in slots if s.identity}
            out = {s.model_id: {"sessions": 0, "reserved_bytes": 0, "used_bytes": 0, "pinned": 0,
                                "prompt_tokens": s.prompt_tokens, "reused_tokens": s.reused_tokens,
                                "requests": s.n_finished} for s in slots}  # fmt: skip
        for info in self.store.sessions():
            model_id = names.get(info.session_id.model)
            if model_id is None:
                continue
            row = out[model_id]
            row["sessions"] += 1
            row["reserved_bytes"] += info.reserved_bytes
            row["used_bytes"] += info.used_bytes
            row["pinned"] += int(info.pinned)
        return out

    # -- drivers -------------------------------------------------------------------------------
    def add_wakeup_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever work arrives (a submit, a finished load) for a driver that steps
        the pool from its own event loop (the app's worker)."""
        self._wakeup_listeners.append(listener)

    def _wake(self) -> None:
        self._wakeup.set()
        for listener in self._wakeup_listeners:
            listener()

    def start(self) -> None:
        """Drive the pool from a background thread (headless use, ``smallmind serve``)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_requested.clear()
        self._thread = threading.Thread(target=self._drive, name="smallmind-pool", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        while not self._stop_requested.is_set():
            try:
                worked = self.step()
            except Exception:  # engines fail their requests themselves; this is a bug: log, back off
                log.exception("model pool step failed")
                worked = False
            if not worked:
                waits = [
                    w for w in (self.seconds_until_ready(), self.seconds_until_expiry()) if w is not None
                ]
                self._wakeup.wait(min(0.5, max(min(waits, default=0.5), 0.0005)))
                self._wakeup.clear()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the driver and the loader, unload every model (their requests end with an error)."""
        self._stop_requested.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for slot, pending in self._models.stop(timeout):
            self._end_pending(
                slot, pending.handle, "error", "the engine was stopped before this request finished"
            )
