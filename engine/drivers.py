"""Who calls ``step()``: a background thread, or asyncio's event loop through that thread.

The engine does work only when stepped. The Qt worker and benchmarks step it themselves; headless
and asyncio users call ``engine.start()`` (a ``ThreadDriver``) or ``await engine.generate(...)``,
which starts one when nobody else drives the engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from .generation import GenerationEvent, GenerationResult

if TYPE_CHECKING:
    from .batching import BatchedInferenceEngine, Prompt
    from .kv_store import SessionId
    from .sampling import InferenceOptions

log = logging.getLogger(__name__)

THREAD_NAME = "smallmind-engine"


class ThreadDriver:
    """Steps an engine from a daemon thread until stopped; sleeps while there is nothing to do and
    wakes when work arrives (``wake()``)."""

    def __init__(
        self,
        step: Callable[[], bool],
        seconds_until_ready: Callable[[], float | None],
        log_once: Callable[..., None],
    ) -> None:
        self._step = step
        self._seconds_until_ready = seconds_until_ready
        self._log_once = log_once
        self._wakeup = threading.Event()
        self._stop_requested = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        if self.running:
            return
        self._stop_requested.clear()
        self.thread = threading.Thread(target=self._drive, name=THREAD_NAME, daemon=True)
        self.thread.start()

    def stop(self, timeout: float) -> None:
        """Ask the thread to end and wait for it (at most ``timeout`` seconds)."""
        self._stop_requested.set()
        self._wakeup.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        self.thread = None

    def _drive(self) -> None:
        n_failed = 0  # steps in a row that raised
        while not self._stop_requested.is_set():
            try:
                worked = self._step()
                n_failed = 0
            except Exception as exc:  # step() fails requests itself; this is a bug: log it, back off
                n_failed += 1
                self._log_once("drive", "engine step failed (%s: %s)", type(exc).__name__, exc, exc=exc)
                self._wakeup.wait(min(1.0, 0.01 * 2**n_failed))
                self._wakeup.clear()
                continue
            if not worked:
                wait = self._seconds_until_ready()
                self._wakeup.wait(0.5 if wait is None else max(wait, 0.0005))
                self._wakeup.clear()


async def generate(
    engine: BatchedInferenceEngine,
    prompt_or_messages: Prompt,
    options: InferenceOptions | None = None,
    session_id: SessionId | None = None,
) -> GenerationResult:
    """Run one request to the end and return its result."""
    final: GenerationResult | None = None
    async for event in generate_streaming(engine, prompt_or_messages, options, session_id):
        final = event.result or final
    assert final is not None
    return final


async def generate_streaming(
    engine: BatchedInferenceEngine,
    prompt_or_messages: Prompt,
    options: InferenceOptions | None = None,
    session_id: SessionId | None = None,
) -> AsyncIterator[GenerationEvent]:
    """Yield the request's events as the engine produces them; the last one carries the result. A
    request abandoned by its consumer (the generator closed early) is cancelled."""
    import asyncio  # here: a local model driven by a thread or the Qt worker never loads it (~7 MiB)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
    handle = engine.submit(
        prompt_or_messages, options, session_id,
        on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
    )  # fmt: skip
    engine.ensure_driver()
    try:
        while True:
            event = await events.get()
            yield event
            if event.kind == "done":
                return
    finally:
        if not handle.done():
            handle.cancel()
