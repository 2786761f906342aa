"""What the KV-cache store is configured and identified by: ``SessionId`` (a conversation, its owner,
its model), ``KvCacheOptions`` (the limits and the disk tier), and what it reports (``KvCacheStats``,
``SessionInfo``). No state: ``kv_store.py`` holds the sessions themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .kv_cache import KV_DTYPES, ModelShape
from .kv_disk import MODEL_SEPARATOR
from .options import options_from_dict, options_to_dict

MiB = 1 << 20
GiB = 1 << 30


APP_OWNER = "app"  # the owner of sessions nobody names one for: the app's tabs, a script's requests


@dataclass(frozen=True, slots=True)
class SessionId:
    """A conversation's identity in the store (one per tab), and who owns it.

    ``owner`` separates who may benefit from a session's K/V: the app's tabs (``APP_OWNER``), each API
    key, the keyless local API client. Sessions of different owners are different sessions even under
    the same ``value``, never share a prefix and never load each other's disk files, so what one owner
    sent cannot be read back through another's cache hits (``reused_tokens``, ``cached_tokens``).

    ``model`` is the identity (``Model.identity``) of the model whose K/V the session holds, when one
    store serves several models (``model_pool.py``): one conversation has a session per model, and
    sessions of different models never share a prefix or a disk file. None: the store's one model.
    """

    value: str
    owner: str = APP_OWNER
    model: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value.strip():
            raise ValueError(f"SessionId needs a non-empty string, got {self.value!r}")
        if not isinstance(self.owner, str) or not self.owner or _OWNER_SEPARATOR in self.owner:
            raise ValueError(f"SessionId.owner must be a non-empty string without \\x1f, got {self.owner!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"SessionId.model must be a model identity or None, got {self.model!r}")

    @classmethod
    def new_id(cls, owner: str = APP_OWNER, model: str | None = None) -> SessionId:
        return cls(uuid.uuid4().hex, owner, model)

    def for_model(self, model: str | None) -> SessionId:
        """This conversation's session with ``model``'s K/V."""
        return SessionId(self.value, self.owner, model)

    @property
    def key(self) -> str:
        """The name the disk tier files it under, unique per (owner, value, model): the app's is its
        value (as before owners existed), any other is ``owner`` + US + ``value`` (an owner holds no
        US); a session of a named model ends with RS + the model's identity."""
        if self.owner == APP_OWNER and _OWNER_SEPARATOR not in self.value:
            base = self.value
        else:
            base = f"{self.owner}{_OWNER_SEPARATOR}{self.value}"
        return base if self.model is None else f"{base}{MODEL_SEPARATOR}{self.model}"

    def __str__(self) -> str:
        return self.value


_OWNER_SEPARATOR = "\x1f"  # never in an owner: the first one in a key ends the owner


@dataclass(frozen=True, slots=True)
class KvCacheOptions:
    """The KV cache's settings (names follow the runtime spec, in snake_case)."""

    enabled: bool = True
    max_tokens_per_session: int = 4096
    max_sessions: int = 1000
    max_bytes_total: int = 1 * GiB
    max_bytes_per_session: int = 256 * MiB
    policy: str = "lru"
    persist_across_requests: bool = True
    share_prefixes: bool = True
    dtype: str = "float32"
    disk_enabled: bool = True  # the disk tier runs when this is on and disk_dir is set
    disk_dir: str | None = None  # None: no disk tier (the app sets a folder in its cache dir)
    max_disk_bytes: int = 2 * GiB

    def __post_init__(self) -> None:
        for name in ("enabled", "persist_across_requests", "share_prefixes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KvCacheOptions.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_tokens_per_session", "max_sessions", "max_bytes_total", "max_bytes_per_session"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KvCacheOptions.{name} must be a whole number ≥ 1, got {value!r}")
        if self.max_bytes_per_session > self.max_bytes_total:
            raise ValueError(
                f"KvCacheOptions.max_bytes_per_session ({self.max_bytes_per_session:,}) must not exceed "
                f"max_bytes_total ({self.max_bytes_total:,})"
            )
        if self.policy != "lru":
            raise ValueError(f"KvCacheOptions.policy must be 'lru', got {self.policy!r}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"KvCacheOptions.dtype must be one of {KV_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.disk_enabled, bool):
            raise ValueError(f"KvCacheOptions.disk_enabled must be true or false, got {self.disk_enabled!r}")
        if self.disk_dir is not None and (not isinstance(self.disk_dir, str) or not self.disk_dir.strip()):
            raise ValueError(f"KvCacheOptions.disk_dir must be a folder path or None, got {self.disk_dir!r}")
        value = self.max_disk_bytes
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"KvCacheOptions.max_disk_bytes must be a whole number ≥ 1, got {value!r}")

    @property
    def disk_tier_on(self) -> bool:
        return self.disk_enabled and self.disk_dir is not None

    def effective_max_tokens(self, shape: ModelShape, context_length: int | None = None) -> int:
        """A session's token limit: the smallest of the token limit, the byte limit and the context."""
        limit = min(self.max_tokens_per_session, self.max_bytes_per_session // shape.bytes_per_token)
        return min(limit, context_length) if context_length else limit

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KvCacheOptions:
        return options_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return options_to_dict(self)


@dataclass(frozen=True, slots=True)
class KvCacheStats:
    """A snapshot of the store's counters; every number is counted where the thing happens."""

    current_sessions: int
    current_bytes: int  # reserved by entries
    used_bytes: int  # holding cached tokens
    peak_bytes: int
    pooled_bytes: int  # released buffers waiting for reuse (within max_bytes_total)
    max_bytes_total: int
    hits: int  # prepare() calls that reused ≥ 1 token
    misses: int
    evictions: int
    reused_tokens: int
    prompt_tokens: int
    shared_prefix_tokens: int  # reused tokens copied from another session
    pinned_sessions: int
    disk_enabled: bool = False  # the disk tier (see kv_disk.py): sessions evicted to files
    disk_sessions: int = 0
    disk_bytes: int = 0
    max_disk_bytes: int = 0
    disk_hits: int = 0  # prepare() calls that loaded K/V from disk
    disk_reused_tokens: int = 0  # reused tokens that came from disk (also counted in reused_tokens)
    disk_load_ms: float = 0.0  # the last load from disk (read, check, copy into the entry)
    disk_writes: int = 0
    disk_write_failures: int = 0  # full disk, read-only folder...: those sessions will be recomputed
    disk_rejected_files: int = 0  # files ignored or deleted: another model, corrupt, a header out of range

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    @property
    def token_reuse_ratio(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One row of ``sessions()``: what the app's table shows."""

    session_id: SessionId
    n_tokens: int
    max_tokens: int
    reserved_bytes: int
    used_bytes: int
    pinned: bool
    last_used: float  # time.time()
