"""Which KV-cache session an API request uses, and the requests in flight.

OpenAI clients are stateless: every turn resends the whole conversation. ``SessionRouter`` gives
such a request the idle session whose last prompt is a prefix of the new one (the same conversation,
one turn later), so the store trims that entry to the common prefix and only the new turn is
computed. A request that continues nothing gets a fresh session (the store still copies a shared
prefix, such as a system prompt, from another session). Busy sessions are never handed out, so
concurrent requests are never serialized behind each other. A ``user`` field or ``X-Session-Id``
header pins a named session instead. Sessions the router forgets are removed from the store.

Every session belongs to the requester's owner (``SessionId.owner``: an API key, or the keyless
local client): a request continues, names or shares a prefix with its owner's sessions only, so the
same ``X-Session-Id`` from two keys is two sessions and no owner's cache hits reveal another's text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from engine import LruKvCacheStore, RequestHandle, SessionId

PINNED_PREFIX = "api-user:"
ANONYMOUS_PREFIX = "api-"
MAX_IDLE_SESSIONS = 64


class SessionRouter:
    """Maps stateless requests to idle sessions by prompt prefix (thread-safe)."""

    def __init__(
        self, store: LruKvCacheStore, max_idle_sessions: int = MAX_IDLE_SESSIONS, model: str | None = None
    ) -> None:
        self._store = store
        self.model = model  # the identity of the model whose K/V its sessions hold (a store shared by models)
        self._max_idle = max_idle_sessions
        self._idle: OrderedDict[SessionId, tuple[int, ...]] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def acquire(self, prompt_ids: Sequence[int], owner: str, pinned_name: str | None = None) -> SessionId:
        """The session of ``owner`` for a request with ``prompt_ids``; ``release`` it when it ends."""
        if pinned_name is not None:
            return SessionId(PINNED_PREFIX + pinned_name, owner, self.model)
        prompt = tuple(prompt_ids)
        with self._lock:
            best, best_len = None, 0
            for session, previous in self._idle.items():
                n = len(previous)
                if session.owner == owner and best_len < n <= len(prompt) and prompt[:n] == previous:
                    best, best_len = session, n
            if best is not None:
                del self._idle[best]
                return best
        return SessionId(ANONYMOUS_PREFIX + SessionId.new_id().value, owner, self.model)

    def release(self, session: SessionId, prompt_ids: Sequence[int], keep: bool = True) -> None:
        """A request ended: its session waits for the conversation's next turn (or is dropped)."""
        if session.value.startswith(PINNED_PREFIX):
            return
        if not keep:
            self._store.remove(session)
            return
        with self._lock:
            self._idle[session] = tuple(prompt_ids)
            self._idle.move_to_end(session)
            dropped = []
            while len(self._idle) > self._max_idle:
                dropped.append(self._idle.popitem(last=False)[0])
        for old in dropped:
            self._store.remove(old)


class InFlight:
    """The handles of the requests being served: counted for /metrics, cancelled at shutdown."""

    def __init__(self) -> None:
        self._handles: set[RequestHandle] = set()
        self._lock = threading.Lock()
        self._closing = False

    def add(self, handle: RequestHandle) -> None:
        with self._lock:
            self._handles.add(handle)
            closing = self._closing
        if closing:
            handle.cancel()

    def discard(self, handle: RequestHandle) -> None:
        with self._lock:
            self._handles.discard(handle)

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)

    @property
    def closing(self) -> bool:
        return self._closing

    def cancel_all(self) -> int:
        """Cancel every request in flight and every later one (shutdown); how many were running."""
        with self._lock:
            self._closing = True
            handles = list(self._handles)
        for handle in handles:
            handle.cancel()
        return len(handles)
