"""The replies being generated, from the engine's events to the worker's signals. No Qt.

Engine events arrive inside ``step()`` (or, for a remote engine, hopped to the worker's thread);
they are buffered here and come out of ``flush`` as the signals to send, one per conversation with
its text pieces joined, at most every ``TEXT_FLUSH_S`` seconds, and at once when a request ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from engine import GenerationEvent, GenerationResult

TEXT_FLUSH_S = 0.03  # text of several steps is joined into one signal per conversation

Signal = tuple[str, tuple[Any, ...]]  # the worker's signal name, its arguments


class Replies:
    """Conversation id -> its running request, and what its events said since the last flush."""

    def __init__(self) -> None:
        self.handles: dict[str, Any] = {}  # conversation id -> RequestHandle (local or remote)
        self._events: list[tuple[str, GenerationEvent]] = []  # filled inside step()
        self._text: dict[str, list[str]] = {}  # pending text pieces per conversation
        self._n_generated: dict[str, int] = {}  # tokens generated so far by each conversation's reply
        self._max_new_tokens: dict[str, int] = {}  # each running reply's own max_new_tokens
        self._last_text_flush = 0.0

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self.handles

    @property
    def text_pending(self) -> bool:
        return bool(self._text)

    def start(self, conversation_id: str, handle: Any, max_new_tokens: int) -> None:
        self.handles[conversation_id] = handle
        self._n_generated[conversation_id] = 0
        self._max_new_tokens[conversation_id] = max_new_tokens

    def add(self, conversation_id: str, event: GenerationEvent) -> None:
        """An event of the conversation's request, unless that request was given up (tab closed)."""
        handle = self.handles.get(conversation_id)
        if handle is not None and handle.request_id == event.request_id:
            self._events.append((conversation_id, event))

    def add_remote(self, conversation_id: str, event: GenerationEvent) -> None:
        """A remote engine's event (already checked as current): a "token" is a chunk of text, one
        token on most servers (the result has the count)."""
        if event.kind == "token":
            self._n_generated[conversation_id] = self._n_generated.get(conversation_id, 0) + 1
        self._events.append((conversation_id, event))

    def drop(self, conversation_id: str) -> Any:
        """Forget the conversation's request and its pending text; its handle (None if none)."""
        self._text.pop(conversation_id, None)
        return self.handles.pop(conversation_id, None)

    def clear(self) -> None:
        self.handles.clear()

    def pop_max_new_tokens(self, conversation_id: str) -> int:
        return self._max_new_tokens.pop(conversation_id, 0)

    def flush(self, finish: Callable[[str, GenerationResult], dict], force: bool = False) -> list[Signal]:
        """The signals for what the last steps produced: progress, joined text, then the results
        (``finish(conversation id, result)`` makes a result's dict)."""
        events, self._events = self._events, []
        progress: dict[str, tuple[int, int]] = {}
        finished: list[tuple[str, GenerationResult]] = []
        waiting = _waiting_after(events)
        out: list[Signal] = []
        for conversation_id, event in events:
            if event.kind == "prefill":
                progress[conversation_id] = (event.prompt_done, event.prompt_total)
            if event.text:
                self._text.setdefault(conversation_id, []).append(event.text)
            if event.kind != "prefill" and event.token_ids:
                self._n_generated[conversation_id] = self._n_generated.get(conversation_id, 0) + len(
                    event.token_ids
                )
            if event.result is not None:
                finished.append((conversation_id, event.result))
        for conversation_id, (done, total) in progress.items():
            if conversation_id not in waiting:
                out.append(("prompt_progressed", (conversation_id, done, total)))
        for conversation_id in waiting:  # its text so far first: text after "waiting" would hide it
            pieces = self._text.pop(conversation_id, None)
            if pieces:
                out.append(
                    ("text_generated", (conversation_id, "".join(pieces), self.n_tokens(conversation_id)))
                )
            out.append(("request_waiting", (conversation_id,)))
        now = time.perf_counter()
        if force or finished or now - self._last_text_flush >= TEXT_FLUSH_S:
            pending, self._text = self._text, {}
            for conversation_id, pieces in pending.items():
                out.append(
                    ("text_generated", (conversation_id, "".join(pieces), self.n_tokens(conversation_id)))
                )
            self._last_text_flush = now
        for conversation_id, result in finished:
            self.handles.pop(conversation_id, None)
            self._n_generated.pop(conversation_id, None)
            out.append(("request_finished", (conversation_id, finish(conversation_id, result))))
        return out

    def n_tokens(self, conversation_id: str) -> int:
        return self._n_generated.get(conversation_id, 0)


def _waiting_after(events: list[tuple[str, GenerationEvent]]) -> set[str]:
    """Conversations whose last event in this batch says they wait for KV memory."""
    last = {conversation_id: event.kind for conversation_id, event in events}
    return {conversation_id for conversation_id, kind in last.items() if kind == "waiting"}
