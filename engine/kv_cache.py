"""KV cache: one sequence's keys and values for every layer, and the token ids they encode.

``KvCacheEntry`` is the ``cache`` object ``Model.forward(ids, cache)`` takes. The model writes the new
tokens' K/V into ``keys(layer)`` / ``values(layer)`` at rows ``[n_tokens, n_tokens + T)`` and then calls
``append(ids)``; a forward that fails half-way commits nothing.

Memory layout: one buffer per entry, shape (n_layers, 2, KVH, capacity, width), so each layer's K and V
are contiguous (KVH, capacity, width) blocks and attention reads ``[:, :S]`` views without copying.
Dtypes (``KV_DTYPES``): float32 (width = Hd, exact), float16 (Hd, half the bytes) and q8_0 (llama.cpp's
8-bit cache: each row is Hd int8 values then a float16 scale per 32 values, stored as two int8 bytes
each: width = Hd + Hd / 16, 0.53x float16's bytes). The model writes through ``write`` (which rounds
or quantizes) and the NumPy path reads through ``read`` (float32 or float16 views; q8_0 expanded).
Growth: in steps of at least 64 tokens and at least 1/16 of the capacity, so an entry reserves at
most one step more than it uses (~6% or 64 tokens) while copying stays amortised O(1) per token
(geometric growth); decoding allocates once per step, never per token. When the store has no room
for a whole step, the entry takes exactly what it needs (``allocate``'s ``min_capacity``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import ContextOverflowError

GROWTH_STEP_TOKENS = 64  # capacities are multiples of 64 tokens (or exactly what is needed / max_tokens)
GROWTH_DIVISOR = 16  # each growth adds at least capacity / 16: geometric, so copying stays O(1) a token
KV_DTYPES = ("float32", "float16", "q8_0")
Q8_BLOCK = 32  # values per q8_0 scale (llama.cpp's block)
_STORAGE: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "q8_0": np.dtype(np.int8),
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What a KV entry must hold per token: K and V for every layer and KV head."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelShape.{name} must be a positive integer, got {value!r}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"ModelShape.dtype must be one of {KV_DTYPES}, got {self.dtype!r}")
        if self.dtype == "q8_0" and self.head_dim % Q8_BLOCK:
            raise ValueError(f"a q8_0 KV cache needs head_dim a multiple of {Q8_BLOCK}, got {self.head_dim}")

    @property
    def storage_dtype(self) -> np.dtype[Any]:
        """The buffer's NumPy dtype (int8 for q8_0)."""
        return _STORAGE[self.dtype]

    @property
    def itemsize(self) -> int:
        return int(self.storage_dtype.itemsize)

    @property
    def row_width(self) -> int:
        """Stored values per cached row of one head: Hd, or for q8_0 Hd int8 + 2 bytes per 32."""
        return self.head_dim + 2 * (self.head_dim // Q8_BLOCK) if self.dtype == "q8_0" else self.head_dim

    @property
    def bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: 2 * L * KVH * row_width * itemsize."""
        return 2 * self.n_layers * self.n_kv_heads * self.row_width * self.itemsize

    def buffer_shape(self, capacity: int) -> tuple[int, int, int, int, int]:
        return (self.n_layers, 2, self.n_kv_heads, capacity, self.row_width)


class BufferAllocator(Protocol):
    """Where entries get and return their buffers (the store pools them and enforces its budget)."""

    def allocate(
        self, entry: KvCacheEntry, shape: ModelShape, capacity: int, min_capacity: int | None = None
    ) -> np.ndarray:
        """A buffer of ``capacity`` tokens, or of fewer (at least ``min_capacity``) when that is what
        fits or what the pool holds; its ``shape[3]`` is the capacity given."""
        ...

    def release(self, entry: KvCacheEntry, buffer: np.ndarray) -> None: ...


class _PlainAllocator:
    """For entries that live outside a store (``Model.new_cache``): plain NumPy allocations."""

    def allocate(
        self, entry: KvCacheEntry, shape: ModelShape, capacity: int, min_capacity: int | None = None
    ) -> np.ndarray:
        return np.empty(shape.buffer_shape(capacity), dtype=shape.storage_dtype)

    def release(self, entry: KvCacheEntry, buffer: np.ndarray) -> None:
        return None


PLAIN_ALLOCATOR = _PlainAllocator()


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 rows (..., Hd) -> q8_0 rows (..., Hd + Hd / 16) int8: per 32 values d = max|x| / 127
    rounded to float16, q = round(x / d) (llama.cpp's ``quantize_row_q8_0``, dividing by the stored
    scale: every value within half a step, d / 2, of what it comes back as)."""
    *lead, Hd = x.shape
    blocks = x.reshape(*lead, Hd // Q8_BLOCK, Q8_BLOCK)  # (..., nb, 32)
    d = (np.abs(blocks).max(axis=-1) / np.float32(127.0)).astype(np.float16)  # (..., nb)
    d32 = d.astype(np.float32)
    inv = np.divide(np.float32(1.0), d32, out=np.zeros_like(d32), where=d32 > 0)
    out = np.empty((*lead, Hd + 2 * (Hd // Q8_BLOCK)), dtype=np.int8)
    q = np.rint(blocks * inv[..., None])  # |q| <= 127 * (1 + 2**-11) < 127.5: rounds into int8
    out[..., :Hd] = q.reshape(*lead, Hd)
    out[..., Hd:] = d.view(np.int8).reshape(*lead, 2 * (Hd // Q8_BLOCK))
    return out


def dequantize_q8_0(rows: np.ndarray) -> np.ndarray:
    """q8_0 rows (..., Hd + Hd / 16) int8 -> float32 (..., Hd)."""
    *lead, width = rows.shape
    Hd = width * Q8_BLOCK // (Q8_BLOCK + 2)
    d = np.ascontiguousarray(rows[..., Hd:]).view(np.float16).astype(np.float32)  # (..., nb)
    q = rows[..., :Hd].reshape(*lead, Hd // Q8_BLOCK, Q8_BLOCK).astype(np.float32)
    return (q * d[..., None]).reshape(*lead, Hd)


def grown_capacity(current: int, needed: int, max_tokens: int) -> int:
    """Next capacity: at least ``needed`` and ``current`` plus one step (64 tokens or current / 16,
    whichever is more), rounded up to a multiple of 64, capped at ``max_tokens``."""
    step = max(GROWTH_STEP_TOKENS, current // GROWTH_DIVISOR)
    target = max(needed, current + step)
    return min(-(-target // GROWTH_STEP_TOKENS) * GROWTH_STEP_TOKENS, max_tokens)


class KvCacheEntry:
    """One sequence's K/V for all layers plus its token ids; grows lazily up to ``max_tokens``."""

    def __init__(
        self,
        shape: ModelShape,
        max_tokens: int,
        *,
        allocator: BufferAllocator = PLAIN_ALLOCATOR,
        session_id: object = None,
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.shape = shape
        self.max_tokens = int(max_tokens)
        self.session_id = session_id
        self._allocator = allocator
        self._buffer: np.ndarray | None = None
        self._token_ids = np.zeros(0, dtype=np.int32)
        self._n_tokens = 0

    # -- sizes -------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens whose K/V are stored (the next token's position)."""
        return self._n_tokens

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.shape[3])

    @property
    def reserved_bytes(self) -> int:
        return self.capacity * self.shape.bytes_per_token

    @property
    def used_bytes(self) -> int:
        return self._n_tokens * self.shape.bytes_per_token

    @property
    def token_ids(self) -> np.ndarray:
        """The cached tokens' ids, a read-only view of length ``n_tokens``."""
        view = self._token_ids[: self._n_tokens]
        view.flags.writeable = False
        return view

    # -- what the model uses -----------------------------------------------------------------
    def ensure_capacity(self, n_total: int) -> None:
        """Make room for ``n_total`` tokens in all (may allocate, and so may raise CacheBudgetError)."""
        if n_total > self.max_tokens:
            raise ContextOverflowError(n_total, self.max_tokens, what="sequence")
        if n_total <= self.capacity:
            return
        capacity = grown_capacity(self.capacity, n_total, self.max_tokens)
        new_buffer = self._allocator.allocate(self, self.shape, capacity, min_capacity=n_total)
        new_capacity = int(new_buffer.shape[3])
        old, n = self._buffer, self._n_tokens
        ids = np.zeros(new_capacity, dtype=np.int32)
        ids[:n] = self._token_ids[:n]
        if old is not None:
            new_buffer[:, :, :, :n] = old[:, :, :, :n]  # (L, 2, KVH, n, Hd)
        self._buffer, self._token_ids = new_buffer, ids
        if old is not None:
            self._allocator.release(self, old)  # after the swap: the allocator sees the new size

    def shrink_to_fit(self, n_total: int) -> None:
        """Give back room beyond ``n_total`` tokens plus one growth step (a conversation whose older
        turns were dropped reuses a shorter prefix): keep reserved bytes close to used ones."""
        target = grown_capacity(0, max(n_total, self._n_tokens), self.max_tokens)
        if self._buffer is None or self.capacity <= grown_capacity(target, target + 1, self.max_tokens):
            return
        new_buffer = self._allocator.allocate(self, self.shape, target)  # smaller: never over budget
        old, n = self._buffer, self._n_tokens
        new_buffer[:, :, :, :n] = old[:, :, :, :n]  # (L, 2, KVH, n, Hd)
        ids = np.zeros(int(new_buffer.shape[3]), dtype=np.int32)
        ids[:n] = self._token_ids[:n]
        self._buffer, self._token_ids = new_buffer, ids
        self._allocator.release(self, old)

    def keys(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s key buffer as stored, (KVH, capacity, width); rows past n_tokens are
        scratch."""
        assert self._buffer is not None, "ensure_capacity() first"
        return self._buffer[layer, 0]

    def values(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s value buffer as stored, (KVH, capacity, width)."""
        assert self._buffer is not None, "ensure_capacity() first"
        return self._buffer[layer, 1]

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store T new tokens' keys and values, k and v (T, KVH, Hd) float32, at rows start ..
        start + T - 1 of ``layer`` (rounded to float16 or quantized to q8_0 as the dtype says)."""
        assert self._buffer is not None, "ensure_capacity() first"
        end = start + k.shape[0]
        kt, vt = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (KVH, T, Hd)
        if self.shape.dtype == "q8_0":
            kt, vt = quantize_q8_0(kt), quantize_q8_0(vt)
        self._buffer[layer, 0, :, start:end] = kt
        self._buffer[layer, 1, :, start:end] = vt

    def read(self, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first n cached rows of ``layer`` as floats: (keys, values), (KVH, n, Hd) each; views
        of a float32 or float16 buffer, expanded float32 copies of a q8_0 one."""
        keys, values = self.keys(layer)[:, :n], self.values(layer)[:, :n]
        if self.shape.dtype == "q8_0":
            return dequantize_q8_0(keys), dequantize_q8_0(values)
        return keys, values

    @property
    def layer_bytes(self) -> int:
        """Bytes from one layer's K/V to the next's in the buffer (the attention kernel reads every
        layer through layer 0's address)."""
        assert self._buffer is not None, "ensure_capacity() first"
        return int(self._buffer.strides[0])

    def append(self, token_ids: Sequence[int] | np.ndarray) -> None:
        """Commit the tokens whose K/V the model has just written after the cached ones."""
        n_new = len(token_ids)
        end = self._n_tokens + n_new
        if end > self.capacity:
            raise ValueError(f"append of {n_new} tokens past capacity {self.capacity}")
        self._token_ids[self._n_tokens : end] = token_ids
        self._n_tokens = end

    # -- what the store uses -----------------------------------------------------------------
    def trim(self, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` tokens (no copy; the rows are overwritten later)."""
        if n_tokens < 0:
            raise ValueError(f"cannot trim to {n_tokens} tokens")
        self._n_tokens = min(self._n_tokens, n_tokens)

    def common_prefix_length(self, token_ids: Sequence[int] | np.ndarray) -> int:
        """How many leading tokens of ``token_ids`` equal the cached ones."""
        n = min(self._n_tokens, len(token_ids))
        if n == 0:
            return 0
        cached = self._token_ids[:n]
        mismatch = np.flatnonzero(cached != np.asarray(token_ids[:n], dtype=np.int32))
        return int(mismatch[0]) if mismatch.size else n

    def copy_prefix_from(self, other: KvCacheEntry, n_tokens: int) -> None:
        """Replace this entry's contents with the first ``n_tokens`` of ``other`` (same shape)."""
        if other.shape != self.shape:
            raise ValueError("cannot copy K/V between entries of different shapes")
        n = min(n_tokens, other.n_tokens)
        if n == 0:
            self._n_tokens = 0
            return
        self.ensure_capacity(n)  # first: if it raises, this entry still holds its own tokens
        self._n_tokens = 0
        assert self._buffer is not None and other._buffer is not None
        self._buffer[:, :, :, :n] = other._buffer[:, :, :, :n]  # (L, 2, KVH, n, Hd)
        self._token_ids[:n] = other._token_ids[:n]
        self._n_tokens = n

    def load_tokens(self, token_ids: np.ndarray, kv: np.ndarray) -> None:
        """Replace the contents with ``n = len(token_ids)`` tokens and their K/V, (L, 2, KVH, n, Hd)
        (from the disk tier). Room is made first: if that raises, the entry still holds its tokens."""
        n = len(token_ids)
        if kv.shape != self.shape.buffer_shape(n):
            raise ValueError(f"K/V of shape {kv.shape} do not fit an entry of {self.shape}")
        self.ensure_capacity(n)
        assert self._buffer is not None
        self._buffer[:, :, :, :n] = kv  # (L, 2, KVH, n, Hd)
        self._token_ids[:n] = token_ids
        self._n_tokens = n

    def detach(self) -> tuple[np.ndarray, np.ndarray]:
        """Take the buffer and the cached token ids out (the entry is empty afterwards) without giving
        the buffer back to the allocator: whoever takes it owns it (the disk tier's writer)."""
        assert self._buffer is not None, "nothing to detach"
        buffer, token_ids = self._buffer, self._token_ids[: self._n_tokens].copy()
        self._buffer, self._token_ids, self._n_tokens = None, np.zeros(0, dtype=np.int32), 0
        return buffer, token_ids

    def release(self) -> None:
        """Give the buffer back to the allocator; the entry is empty afterwards."""
        buffer, self._buffer = self._buffer, None
        self._token_ids = np.zeros(0, dtype=np.int32)
        self._n_tokens = 0
        if buffer is not None:
            self._allocator.release(self, buffer)  # after the reset: the allocator sees 0 bytes

    def __repr__(self) -> str:
        return (
            f"KvCacheEntry(session={self.session_id!r}, tokens={self._n_tokens}, "
            f"capacity={self.capacity}, max_tokens={self.max_tokens})"
        )
