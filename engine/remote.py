"""RemoteEngine: the engine's submit/handle surface over an OpenAI-compatible endpoint.

A bigger model on a server (vLLM, llama.cpp's ``llama-server``, Ollama, another machine's
``smallmind serve``) is used exactly like the local ``BatchedInferenceEngine``:
``submit(messages, options, session_id, on_event) -> handle`` with ``handle.result(timeout)`` and
``handle.cancel()``, the same ``GenerationEvent``s ("token", then "done" carrying a
``GenerationResult``) and the same finish reasons. There is no step to drive: requests run as
asyncio tasks on the engine's own thread (one event loop, one ``httpx.AsyncClient``), streaming over
SSE; ``on_event`` is called on that thread. ``cancel`` cancels the task, which closes the stream, so
the server sees the client leave.

Failures are answers, never hangs: a refused connection, an unknown host, a TLS error, 401, 404, a
busy server (429/503: its Retry-After is honoured once), a stream cut mid-reply, a reply the server
gave up on (its finish reason "cancelled": it was shut down) end the request with
``finish_reason="error"``; a server silent for ``timeout_s``, or a reply past ``max_time_ms``, ends it
with ``"timeout"``. The message names the endpoint and the cause; the text received so far is kept.
A server is not trusted to behave: error bodies and SSE lines are read with caps, and a reply that
goes past ``max_new_tokens`` chunks (a server ignoring ``max_tokens``) is ended there as "length" and
its stream closed. Token counts come from the server's ``usage`` (``completion_tokens``); token ids
are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, cast

import httpx

from .errors import EngineStoppedError, RemoteEngineError
from .generation import FINISH_REASONS, FinishReason, GenerationEvent, GenerationResult, ResultHandle
from .metrics import InMemoryRuntimeMetrics
from .remote_http import (
    MAX_ERROR_BODY_BYTES,
    MAX_MODELS_BYTES,
    SERVER_ENDED,
    StreamState,
    TooLarge,
    api_url,
    capped_lines,
    parse_sse_line,
    read_capped,
    read_capped_sync,
    request_body,
    response_error,
    retry_after_s,
    transport_error,
)
from .sampling import InferenceOptions

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # the longest silence allowed: before the headers, or between two chunks
CONNECT_TIMEOUT_S = 10.0
MAX_RETRY_WAIT_S = 30.0  # a longer Retry-After is not waited for: the request fails and says so
STOP_TIMEOUT_S = 10.0

EventCallback = Callable[[GenerationEvent], object]
Prompt = str | Sequence[Mapping[str, str]]
_request_ids = itertools.count(1)


class _Failure(Exception):
    """Ends a request: its finish reason and the cause (without the endpoint)."""

    def __init__(self, reason: FinishReason, cause: str) -> None:
        super().__init__(cause)
        self.reason = reason


class RemoteRequestHandle(ResultHandle):
    """The caller's side of a remote request: cancel it, wait for its result (thread-safe)."""

    def __init__(self, session_id: object, on_event: EventCallback | None) -> None:
        super().__init__(next(_request_ids), session_id, on_event)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        """End the request as "cancelled": its stream is closed at once."""
        super().cancel()
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile: the request ended
                loop.call_soon_threadsafe(task.cancel)


class RemoteEngine:
    """An OpenAI-compatible endpoint as an engine; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        name: str | None = None,
        max_retry_wait_s: float = MAX_RETRY_WAIT_S,
    ) -> None:
        self.api_url = api_url(base_url)  # ValueError for what is not an http(s) URL
        for label, value in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 3600:
                raise ValueError(f"RemoteEngine.{label} must be in (0, 3600] seconds, got {value!r}")
        self.model = model or None
        self.name = name or self.api_url
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.max_retry_wait_s = float(max_retry_wait_s)
        self.metrics = InMemoryRuntimeMetrics()
        self._api_key = api_key or None  # never logged, never in a message
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._handles: set[RemoteRequestHandle] = set()
        self._stopped = False

    @property
    def label(self) -> str:
        """How messages name the endpoint: its name and its address."""
        return self.api_url if self.name == self.api_url else f"{self.name} ({self.api_url})"

    def __repr__(self) -> str:
        return f"RemoteEngine({self.api_url!r}, model={self.model!r})"  # no key

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._handles)

    def _headers(self, session_id: object = None) -> dict[str, str]:
        headers = {"Accept": "text/event-stream, application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if session_id is not None:  # a SmallMind server keeps the conversation's KV cache by it
            headers["X-Session-Id"] = str(session_id)
        return headers

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine's thread (its event loop and HTTP client); submit starts it when needed."""
        with self._lock:
            if self._stopped:
                raise EngineStoppedError(f"{self.label}: the engine is stopped")
            if self._thread is not None and self._thread.is_alive():
                return
            ready = threading.Event()
            self._thread = threading.Thread(
                target=self._run_loop, args=(ready,), name="smallmind-remote", daemon=True
            )
            self._thread.start()
        ready.wait(STOP_TIMEOUT_S)

    def _run_loop(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._client = httpx.AsyncClient(timeout=self._timeout(), follow_redirects=True)
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._client.aclose())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """End every request in flight (finish_reason "error", "the engine was stopped"), stop the thread."""
        with self._lock:
            self._stopped = True
            handles = list(self._handles)
        for handle in handles:
            handle.cancel()
        deadline = time.monotonic() + timeout
        for handle in handles:
            handle._done.wait(max(0.0, deadline - time.monotonic()))
        loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.1, deadline - time.monotonic()))

    # -- requests -------------------------------------------------------------------------------
    def submit(
        self,
        prompt_or_messages: Prompt,
        options: InferenceOptions | None = None,
        session_id: object = None,
        on_event: EventCallback | None = None,
    ) -> RemoteRequestHandle:
        """Send a request (thread-safe); returns at once. Raises ValueError, EngineStoppedError."""
        options = options or InferenceOptions()
        path, body = request_body(prompt_or_messages, options, self.model)
        self.start()
        handle = RemoteRequestHandle(session_id, on_event)
        loop = self._loop
        if loop is None:
            raise EngineStoppedError(f"{self.label}: the engine's thread did not start")
        with self._lock:
            if self._stopped:
                raise EngineStoppedError(f"{self.label}: the engine is stopped")
            self._handles.add(handle)
        self.metrics.record_submitted()
        handle._loop = loop
        asyncio.run_coroutine_threadsafe(self._start_task(handle, path, body, options), loop)
        return handle

    async def _start_task(
        self, handle: RemoteRequestHandle, path: str, body: dict[str, Any], options: InferenceOptions
    ) -> None:
        handle._task = asyncio.current_task()
        if handle.cancel_requested:  # cancelled before the task existed
            handle._task.cancel()  # type: ignore[union-attr]
        await self._serve(handle, path, body, options)

    async def _serve(
        self, handle: RemoteRequestHandle, path: str, body: dict[str, Any], options: InferenceOptions
    ) -> None:
        """Run one request to its end and deliver its events; never raises."""
        state = StreamState()
        clock = _Clock()
        reason: FinishReason = "stop"
        error: str | None = None
        try:
            limit_s = options.max_time_ms / 1000.0 if options.max_time_ms is not None else None
            async with asyncio.timeout(limit_s):
                await self._exchange(handle, path, body, state, clock, options.max_new_tokens)
            reason = _finish_reason(state.finish_reason)
            if state.finish_reason in SERVER_ENDED:  # not our Stop: the server gave the reply up
                reason = "error"
                error = (
                    f"{self.label}: the server ended the reply before it finished (it said "
                    f"{state.finish_reason!r}: it may have been stopped or restarted)"
                )
        except asyncio.CancelledError:  # handle.cancel() or stop()
            reason = "cancelled"
            if self._stopped:
                reason, error = "error", f"{self.label}: the engine was stopped before this request finished"
        except TimeoutError:
            reason, error = (
                "timeout",
                f"{self.label}: no complete reply within max_time_ms={options.max_time_ms}",
            )
        except _Failure as exc:
            reason, error = exc.reason, f"{self.label}: {exc}"
        except httpx.TimeoutException as exc:
            reason = "timeout"
            error = f"{self.label}: {transport_error(exc, self.timeout_s, self.connect_timeout_s)}"
        except httpx.HTTPError as exc:
            n_chars = sum(map(len, state.pieces)) if state.started else -1
            reason = "error"
            error = f"{self.label}: {transport_error(exc, self.timeout_s, self.connect_timeout_s, n_chars)}"
        except Exception as exc:  # a bug here must still end the request with its cause
            log.exception("remote request %d failed", handle.request_id)
            reason, error = "error", f"{self.label}: {type(exc).__name__}: {exc}"
        if error is not None:
            log.warning("remote request %d ended (%s): %s", handle.request_id, reason, error)
        self._finish(handle, state, clock, reason, error)

    async def _exchange(
        self,
        handle: RemoteRequestHandle,
        path: str,
        body: dict[str, Any],
        state: StreamState,
        clock: _Clock,
        max_new_tokens: int,
    ) -> None:
        """POST and read the stream; a 429/503 with Retry-After is tried again once after the wait."""
        assert self._client is not None
        waited_s: float | None = None
        for _attempt in (1, 2):
            async with self._client.stream(
                "POST", self.api_url + path, json=body, headers=self._headers(handle.session_id)
            ) as response:
                if response.status_code < 400:
                    await self._read_stream(handle, response, state, clock, max_new_tokens)
                    return
                content, _ = await read_capped(response, MAX_ERROR_BODY_BYTES)
                message = response_error(
                    response.status_code, response.reason_phrase, content, self.model, bool(self._api_key)
                )
                wait_s = retry_after_s(response.headers.get("retry-after"))
            if waited_s is not None:
                raise _Failure("error", f"{message} (still, after waiting {waited_s:g} s as it asked)")
            if response.status_code not in (429, 503) or wait_s is None:
                raise _Failure("error", message)
            if wait_s > self.max_retry_wait_s:
                raise _Failure("error", f"{message}; it asks to retry after {wait_s:g} s")
            log.info("%s is busy (%d); retrying in %.1f s", self.label, response.status_code, wait_s)
            await asyncio.sleep(wait_s)
            waited_s = wait_s

    async def _read_stream(
        self,
        handle: RemoteRequestHandle,
        response: httpx.Response,
        state: StreamState,
        clock: _Clock,
        max_new_tokens: int,
    ) -> None:
        """Deliver the reply's text as it comes; at most ``max_new_tokens`` chunks of it (a chunk is a
        token or more): past that the server ignores ``max_tokens``, and the reply ends as "length"
        (leaving ``async with`` closes the stream, so the server sees the client go)."""
        state.started = True
        lines = cast(AsyncGenerator[str, None], capped_lines(response))  # an async generator
        try:
            async for line in lines:
                n_before = state.n_chunks
                try:
                    text = parse_sse_line(line, state)
                except RuntimeError as exc:
                    raise _Failure("error", str(exc)) from exc
                if text and n_before >= max_new_tokens:
                    state.pieces.pop()
                    state.n_chunks, state.finish_reason = n_before, "length"
                    log.info("%s sent more than max_tokens=%d; the reply is cut there", self.label,
                             max_new_tokens)  # fmt: skip
                    return
                if text:
                    clock.tick(self.metrics)
                    handle._deliver(GenerationEvent(handle.request_id, "token", text=text))
                if state.done:
                    return
        except TooLarge as exc:
            raise _Failure("error", str(exc)) from exc
        finally:
            await lines.aclose()  # now, not when collected: the loop may be gone by then
        if state.finish_reason is None:
            got = f"after {sum(map(len, state.pieces))} characters" if state.pieces else "before any text"
            raise _Failure("error", f"the stream ended before the reply finished ({got})")

    def _finish(
        self,
        handle: RemoteRequestHandle,
        state: StreamState,
        clock: _Clock,
        reason: FinishReason,
        error: str | None,
    ) -> None:
        usage = state.usage or {}
        completion = _int(usage.get("completion_tokens"), state.n_chunks)
        prompt = _int(usage.get("prompt_tokens"), 0)
        cached = _int((usage.get("prompt_tokens_details") or {}).get("cached_tokens"), 0)
        if completion > state.n_chunks:  # the server sent several tokens per chunk
            self.metrics.record_tokens(completion - state.n_chunks)
        result = GenerationResult(
            text="".join(state.pieces),
            token_ids=(),
            finish_reason=reason,
            prompt_tokens=prompt,
            reused_tokens=cached,
            ttft_ms=clock.ttft_ms,
            decode_tokens_per_s=clock.decode_rate(completion),
            total_ms=(time.perf_counter() - clock.submitted_at) * 1000.0,
            error=error,
            completion_tokens=completion,
        )
        self.metrics.record_finished(reason, prompt)
        with self._lock:
            self._handles.discard(handle)
        handle._deliver(GenerationEvent(handle.request_id, "done", result=result))

    # -- models ---------------------------------------------------------------------------------
    def list_models(self, timeout_s: float | None = None) -> list[str]:
        """The model ids the server offers (``GET /models``), blocking; RemoteEngineError says why not."""
        timeout = httpx.Timeout(timeout_s or self.timeout_s, connect=self.connect_timeout_s)
        try:
            with httpx.stream(
                "GET", self.api_url + "/models", headers=self._headers(), timeout=timeout
            ) as response:
                content, more = read_capped_sync(response, MAX_MODELS_BYTES)
        except httpx.HTTPError as exc:
            cause = transport_error(exc, timeout_s or self.timeout_s, self.connect_timeout_s)
            raise RemoteEngineError(f"{self.label}: {cause}") from exc
        if response.status_code >= 400:
            cause = response_error(response.status_code, response.reason_phrase, content, None,
                                   bool(self._api_key))  # fmt: skip
            raise RemoteEngineError(f"{self.label}: {cause}")
        if more:
            raise RemoteEngineError(
                f"{self.label}: /models answered with more than {MAX_MODELS_BYTES:,} bytes"
            )
        try:
            data = json.loads(content)["data"]
            return [str(item["id"]) for item in data]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            shown = content[:120].decode("utf-8", "replace")
            raise RemoteEngineError(
                f"{self.label}: /models did not answer with an OpenAI model list ({shown!r})"
            ) from exc


class _Clock:
    """A reply's timing: submit, first text, last text (for TTFT and the decode rate)."""

    def __init__(self) -> None:
        self.submitted_at = time.perf_counter()
        self.first_at: float | None = None
        self.last_at: float | None = None

    def tick(self, metrics: InMemoryRuntimeMetrics) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
            metrics.record_ttft(self.ttft_ms or 0.0)
        elif self.last_at is not None:
            metrics.record_inter_token((now - self.last_at) * 1000.0)
        self.last_at = now
        metrics.record_tokens(1)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_at is None else (self.first_at - self.submitted_at) * 1000.0

    def decode_rate(self, n_tokens: int) -> float:
        """Tokens per second after the first one, as the local engine reports it."""
        if self.first_at is None or self.last_at is None or n_tokens < 2 or self.last_at <= self.first_at:
            return 0.0
        return (n_tokens - 1) / (self.last_at - self.first_at)


def _finish_reason(reason: str | None) -> FinishReason:
    """A server's finish reason as one of ours ("content_filter", "tool_calls" ... count as "stop")."""
    return reason if reason in FINISH_REASONS else "stop"  # type: ignore[return-value]


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
