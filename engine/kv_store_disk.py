"""The store's side of the disk tier: which file a session has, writing evicted entries, loading a
longer prefix than memory holds, and the figures the dock shows (``kv_disk.py`` is the tier itself:
files, checks, the background writer).

Each session's file is named by its key with the model's identity (``SessionId.for_model``): loading
another model and coming back finds the first model's K/V as they were. A file named before files
were per model still loads when its header names this model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import CacheBudgetError
from .kv_cache import KvCacheEntry
from .kv_disk import DiskKvTier, common_prefix
from .kv_sessions import KvCacheOptions, SessionId

log = logging.getLogger(__name__)


class StoreDisk:
    """The disk tier as the store uses it (None inside when the tier is off). Not locked: the store
    calls it under its own lock."""

    def __init__(self, options: KvCacheOptions) -> None:
        self.tier: DiskKvTier | None = None
        self.model_identity: str | None = None  # the loaded model's (kv_disk.model_identity)
        self.hits = self.reused_tokens = 0
        self.load_ms = 0.0
        self.open(options)

    @property
    def on(self) -> bool:
        return self.tier is not None

    def open(self, options: KvCacheOptions) -> None:
        if options.disk_tier_on and options.disk_dir is not None:
            self.tier = DiskKvTier(options.disk_dir, options.max_disk_bytes)

    def update(self, old: KvCacheOptions, new: KvCacheOptions) -> None:
        if (old.disk_tier_on, old.disk_dir) != (new.disk_tier_on, new.disk_dir):
            if self.tier is not None:
                self.tier.close()
                self.tier = None
            self.open(new)
        elif self.tier is not None and old.max_disk_bytes != new.max_disk_bytes:
            self.tier.set_max_bytes(new.max_disk_bytes)

    def model_of(self, session_id: SessionId) -> str | None:
        """The identity of the model whose K/V the session holds: its own (a store serving several
        models) or the store's one loaded model; None: nothing goes to or comes from disk."""
        return session_id.model or self.model_identity

    def file_of(self, session_id: SessionId, model: str) -> str | None:
        """The session's file for ``model``, or the name a file had before files were per model;
        None when there is none."""
        assert self.tier is not None
        for key in (session_id.for_model(model).key, session_id.for_model(None).key):
            if self.tier.has(key):
                return key
        return None

    def spill(self, session_id: SessionId, entry: KvCacheEntry) -> bool:
        """Hand an evicted entry's buffer to the tier (written in the background); False when the tier
        is off or cannot take it now (then the caller releases the buffer as usual)."""
        tier, model = self.tier, self.model_of(session_id)
        if tier is None or model is None or entry.n_tokens == 0:
            return False
        if not tier.can_take(entry.n_tokens * (entry.shape.bytes_per_token + 4)):
            log.debug("KV session %s not written to disk: the writer is behind or it is too big", session_id)
            return False
        buffer, token_ids = entry.detach()
        tier.put(session_id.for_model(model).key, model, entry.shape, token_ids, buffer)
        return True

    def load(
        self, session_id: SessionId, entry: KvCacheEntry, prompt_ids: Sequence[int] | np.ndarray, n_own: int
    ) -> int:
        """Load the session's K/V from disk when they hold a longer prefix of the prompt than memory;
        returns the tokens the entry now holds of the prompt."""
        assert self.tier is not None
        model = self.model_of(session_id)
        name = None if model is None else self.file_of(session_id, model)
        if model is None or name is None:
            return n_own
        started = time.perf_counter()
        found = self.tier.find(name, model, entry.shape, prompt_ids, n_own)
        if found is None:
            return n_own
        token_ids, kv = found
        n = min(common_prefix(token_ids, prompt_ids), len(prompt_ids) - 1)
        if n <= n_own:
            return n_own
        try:
            entry.load_tokens(token_ids[:n], kv[:, :, :, :n])
        except CacheBudgetError:
            log.debug("no room to load %d tokens of %s from disk; computing them instead", n, session_id)
            return n_own
        self.hits += 1
        self.reused_tokens += n
        self.load_ms = (time.perf_counter() - started) * 1000.0
        log.debug("loaded %d tokens of KV session %s from disk in %.0f ms", n, session_id, self.load_ms)
        return n

    def prefetch(self, session_id: SessionId) -> bool:
        """Start reading the session's file (if any) into the OS's page cache."""
        tier, model = self.tier, self.model_of(session_id)
        if tier is None or model is None:
            return False
        name = self.file_of(session_id, model)
        return name is not None and tier.prefetch(name)

    def stats(self) -> dict[str, Any]:
        if self.tier is None:
            return {}
        disk = self.tier.stats()
        return {
            "disk_enabled": self.tier.usable, "disk_sessions": disk.sessions, "disk_bytes": disk.bytes,
            "max_disk_bytes": disk.max_bytes, "disk_hits": self.hits,
            "disk_reused_tokens": self.reused_tokens, "disk_load_ms": self.load_ms,
            "disk_writes": disk.writes, "disk_write_failures": disk.write_failures,
            "disk_rejected_files": disk.rejected_files,
        }  # fmt: skip
