"""LRU KV-cache store: one cache entry per session (conversation), bounded in sessions and bytes.

The store keeps every session's K/V between requests so a follow-up turn only computes its new
tokens (``prepare`` trims an entry to the longest common prefix with the new prompt), and copies a
shared prefix (the same system prompt in another tab) from another session instead of recomputing it. Only
sessions of the same owner (``SessionId.owner``: the app, an API key...) share with each other.

Memory: ``current_bytes`` is the sum of every entry's reserved bytes and never passes
``max_bytes_total``; buffers of removed or evicted entries wait in a pool (also within the budget)
for later entries of the same size, so steady-state chatting allocates nothing per token.
Sessions used by a running request are pinned and never evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .errors import CacheBudgetError, ContextOverflowError
from .kv_cache import KvCacheEntry, ModelShape
from .kv_sessions import APP_OWNER, GiB, KvCacheOptions, KvCacheStats, MiB, SessionId, SessionInfo
from .kv_store_disk import StoreDisk

__all__ = [
    "APP_OWNER", "GiB", "KvCacheOptions", "KvCacheStats", "LruKvCacheStore", "MiB", "SessionId",
    "SessionInfo",
]  # fmt: skip

log = logging.getLogger(__name__)


class _Slot:
    __slots__ = ("entry", "last_used", "pins")

    def __init__(self, entry: KvCacheEntry) -> None:
        self.entry = entry
        self.pins = 0
        self.last_used = time.time()

    @property
    def pinned(self) -> bool:
        return self.pins > 0


class LruKvCacheStore:
    """Sessions' KV entries in LRU order, within ``max_sessions`` and ``max_bytes_total``.

    Thread-safe: the engine thread mutates; other threads read ``get_stats()`` / ``sessions()``.
    The store is the allocator of its entries, so every byte an entry reserves is counted here.
    """

    def __init__(self, options: KvCacheOptions | None = None) -> None:
        self._options = options or KvCacheOptions()
        self._lock = threading.RLock()
        self._slots: OrderedDict[SessionId, _Slot] = OrderedDict()  # least recently used first
        self._accounted: dict[int, int] = {}  # id(entry) -> bytes counted in current_bytes
        self._context: dict[SessionId, int | None] = {}  # each session's context-length cap
        self._doomed: set[SessionId] = set()  # removed while pinned: dropped at unpin
        self._pool: list[np.ndarray] = []  # released buffers, any capacity (few: within max_bytes_total / 4)
        self._pooled_bytes = 0
        self._current_bytes = 0
        self._peak_bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._reused_tokens = self._prompt_tokens = self._shared_prefix_tokens = 0
        self._disk = StoreDisk(self._options)  # the disk tier (kv_store_disk.py)
        self._to_disk_at_unpin: set[SessionId] = set()  # closed while pinned: written at unpin

    @property
    def options(self) -> KvCacheOptions:
        return self._options

    # -- sessions ----------------------------------------------------------------------------
    def get_or_create(
        self, session_id: SessionId, shape: ModelShape, max_tokens: int | None = None
    ) -> KvCacheEntry:
        """The session's entry (touched), or a new empty one; ``max_tokens`` caps its token limit."""
        with self._lock:
            slot = self._slots.get(session_id)
            if slot is not None and slot.entry.shape != shape:
                if slot.pinned:
                    raise ValueError(f"session {session_id} is in use with another model shape")
                self._drop(session_id)
                slot = None
            if slot is None:
                slot = self._create(session_id, shape, max_tokens)
            self._doomed.discard(session_id)
            self.touch(session_id)
            return slot.entry

    def _create(self, session_id: SessionId, shape: ModelShape, max_tokens: int | None) -> _Slot:
        # Every check before the first eviction: a request that fails disturbs no other session.
        limit = self._options.effective_max_tokens(shape, max_tokens)
        if limit < 1:
            raise CacheBudgetError(
                f"max_bytes_per_session={self._options.max_bytes_per_session:,} is smaller than one token "
                f"of K/V ({shape.bytes_per_token:,} bytes)"
            )
        n_over = len(self._slots) + 1 - self._options.max_sessions
        if n_over > len(self._slots) - self._n_pinned():
            raise CacheBudgetError(
                f"cannot open a new KV cache session: max_sessions={self._options.max_sessions} "
                f"sessions exist and {self._n_pinned()} are in use by running requests"
            )
        for _ in range(n_over):
            self._evict_one(keep=None)
        self._context[session_id] = max_tokens
        slot = _Slot(KvCacheEntry(shape, limit, allocator=self, session_id=session_id))
        self._slots[session_id] = slot
        self._accounted[id(slot.entry)] = 0
        return slot

    def try_get(self, session_id: SessionId) -> KvCacheEntry | None:
        with self._lock:
            slot = self._slots.get(session_id)
            return None if slot is None else slot.entry

    def touch(self, session_id: SessionId) -> None:
        with self._lock:
            slot = self._slots.get(session_id)
            if slot is not None:
                self._slots.move_to_end(session_id)
                slot.last_used = time.time()

    def remove(self, session_id: SessionId, to_disk: bool = False) -> bool:
        """Forget a session (a closed tab). A pinned session goes when its request ends. ``to_disk``:
        its K/V go to the disk tier (if on), so the conversation comes back warm, even after a restart."""
        with self._lock:
            slot = self._slots.get(session_id)
            if slot is None:
                return False
            if slot.pinned:
                self._doomed.add(session_id)
                if to_disk:
                    self._to_disk_at_unpin.add(session_id)
            else:
                self._drop(session_id, to_disk=to_disk)
            return True

    def clear(self) -> None:
        with self._lock:
            for session_id in list(self._slots):
                self.remove(session_id)
            self._drop_pool()

    def pin(self, session_id: SessionId) -> None:
        """Mark a session as used by a running request: it will not be evicted."""
        with self._lock:
            self._slots[session_id].pins += 1

    def unpin(self, session_id: SessionId) -> None:
        """End of a request: the session may be evicted again (or released, without persistence)."""
        with self._lock:
            slot = self._slots.get(session_id)
            if slot is None:
                return
            slot.pins = max(0, slot.pins - 1)
            if slot.pinned:
                return
            if session_id in self._doomed or not self._options.persist_across_requests:
                self._drop(session_id, to_disk=session_id in self._to_disk_at_unpin)
                return
            limit = self._options.effective_max_tokens(slot.entry.shape, self._context.get(session_id))
            if slot.entry.capacity > limit:  # a limit shrank while the request ran: to disk, as evicted
                self._drop(session_id, to_disk=True)
                self._evictions += 1
            self._enforce_limits()

    # -- the reuse rule --------------------------------------------------------------------
    def prepare(
        self,
        session_id: SessionId,
        shape: ModelShape,
        prompt_ids: Sequence[int] | np.ndarray,
        context_length: int | None = None,
        *,
        pin: bool = False,
        record: bool = True,
    ) -> tuple[KvCacheEntry, int]:
        """Get the session's entry ready for ``prompt_ids``; returns (entry, n_reused).

        The entry is trimmed to its longest common prefix with the prompt; with ``share_prefixes``, a
        longer matching prefix cached by another session is copied in. The caller prefills
        ``prompt_ids[n_reused:]`` (at least the last prompt token is always left to compute, since
        its logits are needed). ``pin=True`` pins the session for a request in the same breath.
        ``record=False`` leaves the lookup counters alone (the caller records it with ``record_lookup``
        once the request is admitted, so a request that waits for memory is counted once).
        """
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise ValueError("prepare needs a non-empty prompt")
        with self._lock:
            limit = self._options.effective_max_tokens(shape, context_length)
            if n_prompt > limit:
                raise ContextOverflowError(n_prompt, limit)
            entry = self.get_or_create(session_id, shape, context_length)
            n_reused = min(entry.common_prefix_length(prompt_ids), n_prompt - 1)
            entry.trim(n_reused)
            if self._disk.on and n_reused < n_prompt - 1:
                n_reused = self._disk.load(session_id, entry, prompt_ids, n_reused)
            if self._options.share_prefixes and n_reused < n_prompt - 1:
                n_reused = self._copy_shared_prefix(session_id, entry, prompt_ids, n_reused)
            entry.shrink_to_fit(n_prompt)
            if pin:
                self._slots[session_id].pins += 1
            if record:
                self.record_lookup(n_prompt, n_reused)
            return entry, n_reused

    def record_lookup(self, n_prompt: int, n_reused: int) -> None:
        """Count one prompt lookup: a hit when it reused at least one token."""
        with self._lock:
            self._prompt_tokens += n_prompt
            self._reused_tokens += n_reused
            if n_reused:
                self._hits += 1
            else:
                self._misses += 1

    def bytes_over_budget(self) -> int:
        """How far the entries are over ``max_bytes_total`` (only pinned ones can be, after a shrink)."""
        with self._lock:
            return max(0, self._current_bytes - self._options.max_bytes_total)

    def _copy_shared_prefix(
        self, session_id: SessionId, entry: KvCacheEntry, prompt_ids: Sequence[int] | np.ndarray, n_own: int
    ) -> int:
        """Copy the longest prefix of the prompt cached by another session of the same owner, if longer
        than ours."""
        best_id, best_n = None, n_own
        cap = len(prompt_ids) - 1
        for other_id, slot in self._slots.items():
            if other_id.owner != session_id.owner:  # never another owner's: the hit would reveal its text
                continue
            if other_id.model != session_id.model:  # another model's K/V mean nothing to this one
                continue
            if other_id == session_id or slot.entry.shape != entry.shape:
                continue
            n = min(slot.entry.common_prefix_length(prompt_ids), cap)
            if n > best_n:
                best_id, best_n = other_id, n
        if best_id is None:
            return n_own
        source = self._slots[best_id]
        source.pins += 1  # the copy may need room: never evict the source meanwhile
        try:
            entry.copy_prefix_from(source.entry, best_n)
        except CacheBudgetError:
            log.debug("no room to copy %d shared tokens from %s; computing them instead", best_n, best_id)
            return n_own  # sharing only saves work: without room for a copy, compute the prefix
        finally:
            source.pins -= 1
        self._shared_prefix_tokens += best_n
        return best_n

    # -- allocator protocol (called by entries) ----------------------------------------------
    def allocate(
        self, entry: KvCacheEntry, shape: ModelShape, capacity: int, min_capacity: int | None = None
    ) -> np.ndarray:
        """A buffer of ``capacity`` tokens if the budget allows, else as many as fit but at least
        ``min_capacity`` (the growth step is a convenience, the tokens are a need); a pooled buffer in
        between is taken first."""
        with self._lock:
            low = capacity if min_capacity is None else min(min_capacity, capacity)
            accounted = self._accounted.get(id(entry))
            if accounted is None:  # an entry this store no longer tracks
                return np.empty(shape.buffer_shape(capacity), dtype=shape.storage_dtype)
            if capacity > low:  # as much of the step as fits (so a full budget is not a copy per token)
                room = self._room_bytes(entry) + accounted
                capacity = max(low, min(capacity, room // shape.bytes_per_token))
            self._check_room(
                capacity * shape.bytes_per_token - accounted, keep=entry.session_id, needed_for=entry
            )
            buffer = self._take_pooled(shape, low, capacity)
            if buffer is not None:
                capacity = int(buffer.shape[3])
            nbytes = capacity * shape.bytes_per_token
            self._make_room(nbytes - accounted, keep=entry.session_id, needed_for=entry)
            if buffer is None:
                buffer = np.empty(shape.buffer_shape(capacity), dtype=shape.storage_dtype)
            self._current_bytes += nbytes - accounted
            self._accounted[id(entry)] = nbytes
            self._peak_bytes = max(self._peak_bytes, self._current_bytes)
            return buffer

    def _take_pooled(self, shape: ModelShape, low: int, high: int) -> np.ndarray | None:
        """The largest pooled buffer of this shape holding between ``low`` and ``high`` tokens."""
        fits = [
            i
            for i, b in enumerate(self._pool)
            if b.dtype == shape.storage_dtype
            and b.shape[:3] + b.shape[4:] == shape.buffer_shape(0)[:3] + shape.buffer_shape(0)[4:]
            and low <= b.shape[3] <= high
        ]
        if not fits:
            return None
        buffer = self._pool.pop(max(fits, key=lambda i: self._pool[i].shape[3]))
        self._pooled_bytes -= int(buffer.nbytes)
        return buffer

    def release(self, entry: KvCacheEntry, buffer: np.ndarray) -> None:
        with self._lock:
            accounted = self._accounted.get(id(entry))
            if accounted is not None and entry.reserved_bytes != accounted:
                self._current_bytes += entry.reserved_bytes - accounted
                self._accounted[id(entry)] = entry.reserved_bytes
            self._to_pool(buffer)

    # -- budget ------------------------------------------------------------------------------
    def _evictable_bytes(self, keep: object) -> int:
        return sum(
            self._accounted.get(id(slot.entry), 0)
            for session_id, slot in self._slots.items()
            if not slot.pinned and session_id != keep
        )

    def _room_bytes(self, needed_for: KvCacheEntry) -> int:
        """Bytes free for ``needed_for`` once every session that may go is evicted."""
        held = self._current_bytes - self._evictable_bytes(needed_for.session_id)
        return self._options.max_bytes_total - held

    def _check_room(self, n_bytes: int, keep: object, needed_for: KvCacheEntry) -> None:
        """Raise CacheBudgetError, before anything is evicted, if evicting all that may go is not enough."""
        limit = self._options.max_bytes_total
        evictable = self._evictable_bytes(keep)
        if self._current_bytes - evictable + n_bytes > limit:
            others = sum(slot.pinned and sid != needed_for.session_id for sid, slot in self._slots.items())
            raise CacheBudgetError(
                f"KV cache budget exhausted: session {needed_for.session_id} needs {n_bytes:,} more "
                f"bytes, {self._current_bytes - evictable:,} of max_bytes_total={limit:,} are held by "
                f"{others} other session(s) in use by running requests and by the session itself"
            )

    def _make_room(self, n_bytes: int, keep: object, needed_for: KvCacheEntry) -> None:
        limit = self._options.max_bytes_total
        while self._current_bytes + self._pooled_bytes + n_bytes > limit:
            if self._pooled_bytes:
                self._drop_pool()
            elif not self._evict_one(keep=keep):
                self._check_room(n_bytes, keep, needed_for)  # raises: nothing left to evict

    def _evict_one(self, keep: object) -> bool:
        """Evict the least recently used unpinned session other than ``keep`` (to disk, if on)."""
        for session_id, slot in self._slots.items():
            if not slot.pinned and session_id != keep:
                log.debug("evicting KV session %s (%d tokens)", session_id, slot.entry.n_tokens)
                self._drop(session_id, to_disk=True)
                self._evictions += 1
                return True
        return False

    def _drop(self, session_id: SessionId, to_disk: bool = False) -> None:
        slot = self._slots.pop(session_id)
        self._doomed.discard(session_id)
        self._to_disk_at_unpin.discard(session_id)
        self._context.pop(session_id, None)
        if to_disk and self._disk.spill(session_id, slot.entry):
            self._current_bytes -= self._accounted.pop(id(slot.entry), 0)  # the buffer left with the writer
            return
        slot.entry.release()  # the buffer goes to the pool via release()
        self._accounted.pop(id(slot.entry), None)

    def _to_pool(self, buffer: np.ndarray) -> None:
        nbytes = int(buffer.nbytes)
        room = min(self._options.max_bytes_total // 4, self._options.max_bytes_total - self._current_bytes)
        if self._pooled_bytes + nbytes <= room:
            self._pool.append(buffer)
            self._pooled_bytes += nbytes

    def _drop_pool(self) -> None:
        self._pool.clear()
        self._pooled_bytes = 0

    def _n_pinned(self) -> int:
        return sum(1 for slot in self._slots.values() if slot.pinned)

    def _enforce_limits(self) -> None:
        while len(self._slots) > self._options.max_sessions and self._evict_one(keep=None):
            pass
        if self._current_bytes + self._pooled_bytes > self._options.max_bytes_total:
            self._drop_pool()
        while self._current_bytes > self._options.max_bytes_total and self._evict_one(keep=None):
            pass

    # -- the disk tier (kv_store_disk.py) -----------------------------------------------------------
    def set_model_identity(self, identity: str | None) -> None:
        """The loaded model's identity (``Model.identity``): disk files of any other model are ignored.
        Without one (and without ``SessionId.model``), nothing goes to or comes from disk."""
        with self._lock:
            self._disk.model_identity = identity

    def prefetch(self, session_id: SessionId) -> bool:
        """A conversation was opened: start reading its file (if any) so its next request loads fast."""
        return session_id not in self and self._disk.prefetch(session_id)

    def forget(self, session_id: SessionId) -> None:
        """A deleted conversation: its session goes from memory and from disk."""
        with self._lock:
            self.remove(session_id)
            self._to_disk_at_unpin.discard(session_id)
            if self._disk.tier is not None:
                self._disk.tier.forget(session_id.key)

    def clear_disk(self) -> None:
        """Delete every session file of the disk tier (memory is untouched)."""
        with self._lock:
            if self._disk.tier is not None:
                self._disk.tier.clear()

    def save_to_disk(self) -> int:
        """Move every idle session to disk (the app is closing or loading another model); how many went."""
        with self._lock:
            idle = [sid for sid, slot in self._slots.items() if not slot.pinned]
            n_before = len(self._slots)
            for session_id in idle:
                if self._disk.tier is not None:  # nothing waits for a step now: let the writer catch up
                    self._disk.tier.wait_for_room(self._slots[session_id].entry.used_bytes)
                self._drop(session_id, to_disk=True)
            return n_before - len(self._slots)

    def flush_disk(self, timeout_s: float = 30.0) -> bool:
        """Wait for the disk tier's queued writes; False on timeout."""
        tier = self._disk.tier
        return True if tier is None else tier.flush(timeout_s)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Save idle sessions to disk, finish the writes (up to ``timeout_s``), stop the writer."""
        self.save_to_disk()
        with self._lock:
            tier, self._disk.tier = self._disk.tier, None
        return True if tier is None else tier.close(timeout_s)

    # -- live options ------------------------------------------------------------------------
    def update_options(self, options: KvCacheOptions) -> None:
        """Apply new settings now: shrinking a limit evicts at once (pinned sessions go at unpin)."""
        with self._lock:
            old, self._options = self._options, options
            self._disk.update(old, options)
            if options.dtype != old.dtype or not options.enabled or not options.persist_across_requests:
                self.clear()
                return
            for session_id, slot in list(self._slots.items()):
                limit = options.effective_max_tokens(slot.entry.shape, self._context.get(session_id))
                if slot.entry.capacity > limit and not slot.pinned:  # evicted: to disk, if the tier is on
                    self._drop(session_id, to_disk=True)
                    self._evictions += 1
                else:
                    slot.entry.max_tokens = max(limit, slot.entry.capacity)
            self._drop_pool()
            self._enforce_limits()

    # -- snapshots ---------------------------------------------------------------------------
    def get_stats(self) -> KvCacheStats:
        with self._lock:
            return KvCacheStats(
                current_sessions=len(self._slots),
                current_bytes=self._current_bytes,
                used_bytes=sum(s.entry.used_bytes for s in self._slots.values()),
                peak_bytes=self._peak_bytes,
                pooled_bytes=self._pooled_bytes,
                max_bytes_total=self._options.max_bytes_total,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                reused_tokens=self._reused_tokens,
                prompt_tokens=self._prompt_tokens,
                shared_prefix_tokens=self._shared_prefix_tokens,
                pinned_sessions=self._n_pinned(),
                **self._disk.stats(),
            )

    def sessions(self) -> list[SessionInfo]:
        """Every session, least recently used (next to be evicted) first."""
        with self._lock:
            return [
                SessionInfo(
                    session_id=sid,
                    n_tokens=s.entry.n_tokens,
                    max_tokens=s.entry.max_tokens,
                    reserved_bytes=s.entry.reserved_bytes,
                    used_bytes=s.entry.used_bytes,
                    pinned=s.pinned,
                    last_used=s.last_used,
                )
                for sid, s in self._slots.items()
            ]

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._slots
