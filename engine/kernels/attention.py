"""Attention over the KV cache in one pass: every query row of a step, every cached dtype, fused with
the softmax (numba).

One call per layer serves the whole step: decode rows of many sequences, several positions of one
sequence (drafts), prefill chunks. The work is cut into items, each one (sequence, KV head, block of
query rows, range of cached positions); items run on the calling thread when the layer's work is
small, else as one job of the engine's worker pool (``pool.py``), each item a chunk. An item streams
its positions in blocks of ``BLOCK``: the block's keys and values are read from the cache once
(float32 in place; float16 converted by F16C, or bit by bit where the CPU lacks it; q8_0 as int8
times its block's float16 scale) and used by all the item's query rows, the G heads sharing the KV
head and every new token of the item. An item of many rows scores the whole block at once (keys
transposed once, each row's scores BLOCK-wide vector FMAs); an item of few rows takes one dot
product per key. The softmax is online (flash-attention style): each row keeps its running maximum
``m``, sum ``l`` and unnormalised output ``acc``, rescaled when the maximum grows, so the scores
never leave a (rows, BLOCK) scratch.
(``Model`` sends a chunk of 16+ tokens after as many cached ones to BLAS instead; see its
``_attention_plan``.)

Long caches with few items (one sequence decoding) are also split by position ("split-K", as in
flash-decoding): each part keeps its own (m, l, acc), merged after the items, so a single
conversation's 6,144 cached tokens keep both cores busy although the model has 3 KV heads.

Each row sees the positions ``lo .. pos`` with ``pos = start + t`` (causal) and ``lo = pos - window +
1`` on sliding-window layers, else 0: visible ranges are contiguous, so nothing is masked with -inf;
blocks outside an item's rows' ranges are never read.

``exp`` is a polynomial (Cephes' expf, ~1 ulp on the range used) written so LLVM vectorizes it: the
libm call numba would emit is scalar, and there is one exp per (row, position). The cache is read
through raw addresses (``numba.carray``) so one call takes caches of different capacities.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic, overload

from .pool import CHUNK_SIGNATURE, J_CHUNKS, J_FUNC, J_USER, JOB_WORDS, address, dispatch, pool

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
serial_kernel = njit(fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)

BLOCK = 64  # cached positions per block: K and V of a block (float32, Hd <= 256) stay in L1/L2
TILED_ROWS = 16  # from this many query rows in an item, scores are computed a whole block at a time
F32_MIN_EXP = np.float32(-87.0)  # exp below this is < 2e-38 of the row's largest term: taken as that


@intrinsic
def _f32_from_bits(typingctx, bits):  # pragma: no cover - compiled
    """Reinterpret a uint32's bits as a float32 (LLVM bitcast; numba has no scalar view)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _pointer(typingctx, address, proto):  # pragma: no cover - compiled
    """An integer address as a typed pointer to ``proto``'s element type (for ``numba.carray``)."""
    pointer = types.CPointer(proto.dtype)
    sig = pointer(types.int64, proto)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return sig, codegen


@intrinsic
def _f16c_to_float(typingctx, bits):  # pragma: no cover - compiled
    """float16 bits -> float32 by LLVM's own conversion (``fpext half``): one ``vcvtph2ps`` per 8
    values on CPUs with F16C (every AVX2 CPU), exact, inf and NaN included."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def _host_has_f16c() -> bool:
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except RuntimeError:  # features unknown: the portable conversion
        return False


HAS_F16C = _host_has_f16c()


def half_bits_to_float(h):  # pragma: no cover - replaced by the overload below when compiled
    """float16 bits (uint16) -> float32."""
    raise NotImplementedError


@overload(half_bits_to_float)
def _half_bits_to_float(h):  # pragma: no cover - compiled
    """The F16C instruction where the CPU has it; elsewhere the bit-level conversion (LLVM would
    call a runtime helper numba does not link)."""
    if HAS_F16C:
        return lambda h: _f16c_to_float(h)  # type: ignore[call-arg]
    return lambda h: half_to_float(h)


@serial_kernel
def half_to_float(h):  # pragma: no cover - compiled
    """float16 bits -> float32, exact for every finite value (subnormals included), branch-free so
    it vectorizes: sign, exponent and mantissa shifted into float32's places, rescaled by 2**112."""
    bits = np.uint32(h)
    sign = (bits & np.uint32(0x8000)) << np.uint32(16)
    magnitude = (bits & np.uint32(0x7FFF)) << np.uint32(13)
    return _f32_from_bits(sign | magnitude) * np.float32(5.192296858534828e33)  # type: ignore[call-arg]


@serial_kernel
def exp_nonpositive(x):  # pragma: no cover - compiled
    """exp(x) for x <= 0 (scores minus their maximum), vectorizable: 2**n * p(r) with x = n ln2 + r,
    |r| <= ln2 / 2 and p Cephes' degree-7 polynomial."""
    x = max(x, F32_MIN_EXP)
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _f32_from_bits(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))  # type: ignore[call-arg]


def load_block(cache, h, s0, n, out):  # pragma: no cover - replaced by the overload below when compiled
    """Rows s0 .. s0 + n of head h as (n, Hd) float32: a view of a float32 cache, else converted
    into ``out`` (BLOCK, Hd) and a view of it."""
    raise NotImplementedError


@overload(load_block)
def _load_block(cache, h, s0, n, out):  # pragma: no cover - compiled
    """float32 rows read in place; float16 (viewed as uint16) converted; q8_0 rows (int8: Hd values,
    then a float16 scale per 32 values as two bytes each) expanded."""
    if cache.dtype == types.uint16:

        def from_half(cache, h, s0, n, out):
            Hd = out.shape[1]
            for j in range(n):
                row = cache[h, s0 + j]
                for i in range(Hd):
                    out[j, i] = half_bits_to_float(row[i])
            return out[:n]

        return from_half

    if cache.dtype == types.int8:

        def from_q8(cache, h, s0, n, out):
            Hd = out.shape[1]
            for j in range(n):
                row = cache[h, s0 + j]
                for c in range(Hd // 32):
                    lo = np.uint32(np.uint8(row[Hd + 2 * c]))
                    hi = np.uint32(np.uint8(row[Hd + 2 * c + 1]))
                    d = half_bits_to_float(np.uint16(lo | (hi << np.uint32(8))))
                    for i in range(32):
                        out[j, 32 * c + i] = np.float32(row[32 * c + i]) * d
            return out[:n]

        return from_q8

    def in_place(cache, h, s0, n, out):
        return cache[h, s0 : s0 + n]

    return in_place


@serial_kernel
def _scores(q, k, s):  # pragma: no cover - compiled
    """s[j] = q . k[j] for one query row, q (Hd,), against n keys k (n, Hd); returns max(s).

    Every loop here and in ``_fold`` counts from 0 over views: with a start that may be negative,
    numba's wrap-around indexing keeps LLVM from vectorizing (the exp loop stayed scalar)."""
    n, Hd = k.shape
    top = np.float32(-np.inf)
    n4 = n - n % 4
    for j in range(0, n4, 4):  # four keys per pass over q: four independent sums in flight
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(Hd):
            a0 += q[i] * k[j, i]
            a1 += q[i] * k[j + 1, i]
            a2 += q[i] * k[j + 2, i]
            a3 += q[i] * k[j + 3, i]
        s[j], s[j + 1], s[j + 2], s[j + 3] = a0, a1, a2, a3
        top = max(top, max(max(a0, a1), max(a2, a3)))
    for j in range(n4, n):
        a = np.float32(0.0)
        for i in range(Hd):
            a += q[i] * k[j, i]
        s[j] = a
        top = max(top, a)
    return top


@serial_kernel
def _scores_tiled(qs, k, kt, s):  # pragma: no cover - compiled
    """s[r, j] = qs[r] . k[j] for many rows at once, qs (R, Hd), k (n, Hd): the block is transposed
    once into kt (Hd, BLOCK) so each row's scores are BLOCK-wide vector FMAs (one broadcast query
    value times a row of kt), with no horizontal sums; positions n.. of s are left undefined."""
    n, Hd = k.shape
    for j in range(n):
        for i in range(Hd):
            kt[i, j] = k[j, i]
    for r in range(qs.shape[0]):
        row = s[r]
        for j in range(BLOCK):
            row[j] = 0.0
        for i in range(Hd):
            qi = qs[r, i]
            kti = kt[i]
            for j in range(BLOCK):
                row[j] += qi * kti[j]


@serial_kernel
def _fold(s, v, m, l, acc, r, top):  # pragma: no cover - compiled
    """Fold n scored positions into row r's running softmax (m[r], l[r], acc (Hd,)): s (n,) the
    scores (overwritten by their exp), v (n, Hd) the values, top = max(s)."""
    n, Hd = v.shape
    if top > m[r]:  # a new maximum: what was summed so far is rescaled to it
        scale = exp_nonpositive(m[r] - top)
        l[r] *= scale
        for i in range(Hd):
            acc[i] *= scale
        m[r] = top
    mr = m[r]
    for j in range(n):  # a loop of its own: with the sum in it, LLVM left it scalar
        s[j] = exp_nonpositive(s[j] - mr)
    total = np.float32(0.0)
    for j in range(n):
        total += s[j]
    l[r] += total
    n4 = n - n % 4
    for j in range(0, n4, 4):  # four positions per pass over acc: a quarter of its loads and stores
        p0, p1, p2, p3 = s[j], s[j + 1], s[j + 2], s[j + 3]
        for i in range(Hd):
            acc[i] += p0 * v[j, i] + p1 * v[j + 1, i] + p2 * v[j + 2, i] + p3 * v[j + 3, i]
    for j in range(n4, n):
        p = s[j]
        for i in range(Hd):
            acc[i] += p * v[j, i]


@serial_kernel
def attend_item(  # pragma: no cover - compiled
    q, out, part_m, part_l, part_acc, seqs, items, n_splits, proto, layer, n_kv_heads, width, window, it
):
    """Item ``it`` of a layer's attention (``attend_serial`` says what the arguments hold): its rows'
    outputs into ``out``, or, for a sequence split by position, its part into part_m/part_l/part_acc."""
    H, Hd = q.shape[1], q.shape[2]
    G = H // n_kv_heads
    b, h, t0, t1 = items[it, 0], items[it, 1], items[it, 2], items[it, 3]
    p0, p1, part = items[it, 4], items[it, 5], items[it, 6]
    base = seqs[b, 0] + layer * seqs[b, 1]
    shape = (n_kv_heads, seqs[b, 3], width)
    keys = carray(_pointer(base, proto), shape)  # type: ignore[call-arg]
    values = carray(_pointer(base + seqs[b, 2], proto), shape)
    start, row0 = seqs[b, 4], seqs[b, 6]
    R = (t1 - t0) * G
    qs = np.empty((R, Hd), dtype=np.float32)
    lo = np.empty(R, dtype=np.int64)
    hi = np.empty(R, dtype=np.int64)
    for t in range(t0, t1):
        pos = start + t
        for g in range(G):
            r = (t - t0) * G + g
            for i in range(Hd):
                qs[r, i] = q[row0 + t, h * G + g, i]
            lo[r] = max(p0, pos - window + 1 if window > 0 else 0)
            hi[r] = min(p1, pos + 1)
    m = np.full(R, -np.inf, dtype=np.float32)
    l = np.zeros(R, dtype=np.float32)
    acc = np.zeros((R, Hd), dtype=np.float32)
    kb = np.empty((BLOCK, Hd), dtype=np.float32)
    vb = np.empty((BLOCK, Hd), dtype=np.float32)
    tiled = R >= TILED_ROWS
    sc = np.empty((R if tiled else 1, BLOCK), dtype=np.float32)  # scores: every row's, or one's
    kt = np.empty((Hd if tiled else 1, BLOCK), dtype=np.float32)
    first, last = lo[0], hi[R - 1]  # rows are in position order: the union of their ranges
    for s0 in range(first, last, BLOCK):
        n = min(BLOCK, last - s0)
        kblock = load_block(keys, h, s0, n, kb)  # (n, Hd) float32
        vblock = load_block(values, h, s0, n, vb)
        if tiled:
            _scores_tiled(qs, kblock, kt, sc)
        for r in range(R):
            j0, j1 = max(lo[r], s0) - s0, min(hi[r], s0 + n) - s0
            if j1 <= j0:
                continue
            if tiled:
                s = sc[r, j0:j1]
                top = np.float32(-np.inf)
                for j in range(j1 - j0):
                    top = max(top, s[j])
            else:
                s = sc[0, : j1 - j0]
                top = _scores(qs[r], kblock[j0:j1], s)
            _fold(s, vblock[j0:j1], m, l, acc[r], r, top)
    for t in range(t0, t1):
        for g in range(G):
            r, hq = (t - t0) * G + g, h * G + g
            if n_splits[b] == 1:
                inv = np.float32(1.0) / l[r]
                for i in range(Hd):
                    out[row0 + t, hq, i] = acc[r, i] * inv
            else:
                part_m[part, row0 + t, hq] = m[r]
                part_l[part, row0 + t, hq] = l[r]
                for i in range(Hd):
                    part_acc[part, row0 + t, hq, i] = acc[r, i]


@serial_kernel
def merge_parts(out, part_m, part_l, part_acc, seqs, n_splits):  # pragma: no cover - compiled
    """The parts of sequences split by position merged into ``out`` (few rows: serial)."""
    H, Hd = out.shape[1], out.shape[2]
    for b in range(seqs.shape[0]):
        if n_splits[b] > 1:
            for t in range(seqs[b, 5]):
                for hq in range(H):
                    row = seqs[b, 6] + t
                    top = np.float32(-np.inf)
                    for p in range(n_splits[b]):
                        top = max(top, part_m[p, row, hq])
                    total = np.float32(0.0)
                    for i in range(Hd):
                        out[row, hq, i] = 0.0
                    for p in range(n_splits[b]):
                        if part_l[p, row, hq] > 0:
                            w = exp_nonpositive(part_m[p, row, hq] - top)
                            total += w * part_l[p, row, hq]
                            for i in range(Hd):
                                out[row, hq, i] += w * part_acc[p, row, hq, i]
                    inv = np.float32(1.0) / total
                    for i in range(Hd):
                        out[row, hq, i] *= inv


@serial_kernel
def attend_serial(  # pragma: no cover - compiled
    q, out, part_m, part_l, part_acc, seqs, items, n_splits, proto, layer, n_kv_heads, width, window
):
    """Attention of every query row of a step against its sequence's cache, one layer, on the
    calling thread.

    q, out: (N, H, Hd) float32 (q pre-scaled); seqs: (B, 7) int64 per sequence: cache address,
    bytes per layer, bytes from K to V, capacity, start, new tokens T, first row in q; items: (I, 7)
    int64: sequence, KV head, first and last token (of its T), first and last position, part index;
    n_splits: (B,) parts per sequence (1: the item writes ``out``; more: it writes its part of
    part_m/part_l (P, N, H) and part_acc (P, N, H, Hd), merged here afterwards); proto: an empty
    array of the cache's storage type (float32, uint16 for float16, int8 for q8_0); width: values
    per cached row (Hd, or Hd + 2 * Hd / 32 for q8_0); window: 0, or the sliding window."""
    for it in range(items.shape[0]):
        attend_item(q, out, part_m, part_l, part_acc, seqs, items, n_splits, proto, layer, n_kv_heads, width,
                    window, it)  # fmt: skip
    merge_parts(out, part_m, part_l, part_acc, seqs, n_splits)


# ---------------------------------------------------------------------------------------------
# The same items as a job of the engine's worker pool (``pool.py``): one item a chunk
# ---------------------------------------------------------------------------------------------
A_Q, A_OUT, A_PART_M, A_PART_L, A_PART_ACC, A_SEQS, A_ITEMS, A_SPLITS = range(J_USER, J_USER + 8)
A_N, A_H, A_HD, A_P, A_B, A_LAYER, A_KVH, A_WIDTH, A_WINDOW = range(J_USER + 8, J_USER + 17)


@serial_kernel
def _attend_chunk(words, c, proto):  # pragma: no cover - compiled
    job = carray(words, (JOB_WORDS,))
    N, H, Hd, P, B = job[A_N], job[A_H], job[A_HD], job[A_P], job[A_B]
    q = carray(address(job[A_Q]), (N, H, Hd), np.float32)
    out = carray(address(job[A_OUT]), (N, H, Hd), np.float32)
    part_m = carray(address(job[A_PART_M]), (P, N, H), np.float32)
    part_l = carray(address(job[A_PART_L]), (P, N, H), np.float32)
    part_acc = carray(address(job[A_PART_ACC]), (P, N, H, Hd), np.float32)
    seqs = carray(address(job[A_SEQS]), (B, 7), np.int64)
    items = carray(address(job[A_ITEMS]), (job[J_CHUNKS], 7), np.int64)
    n_splits = carray(address(job[A_SPLITS]), (B,), np.int64)
    attend_item(q, out, part_m, part_l, part_acc, seqs, items, n_splits, proto, job[A_LAYER], job[A_KVH],
                job[A_WIDTH], job[A_WINDOW], c)  # fmt: skip


def _chunk_float32(words, c):  # pragma: no cover - compiled
    _attend_chunk(words, c, np.empty(0, dtype=np.float32))


def _chunk_float16(words, c):  # pragma: no cover - compiled
    _attend_chunk(words, c, np.empty(0, dtype=np.uint16))


def _chunk_q8_0(words, c):  # pragma: no cover - compiled
    _attend_chunk(words, c, np.empty(0, dtype=np.int8))


_CHUNKS = {"float32": _chunk_float32, "float16": _chunk_float16, "q8_0": _chunk_q8_0}


@functools.cache
def attend_chunk(dtype: str) -> int:
    """The address of the pool's chunk function for caches of ``dtype``, compiled (or loaded from the
    disk cache) at its first use."""
    compiled: Any = cfunc(CHUNK_SIGNATURE, cache=True)(_CHUNKS[dtype])
    return int(compiled.address)


@serial_kernel
def attend_on_pool(  # pragma: no cover - compiled
    ctrl, job, chunk_fn, q, out, part_m, part_l, part_acc, seqs, items, n_splits, layer, n_kv_heads, width,
    window,
):  # fmt: skip
    """``attend_serial``'s items as one pool job (``chunk_fn``: ``attend_chunk(dtype)``) on this
    thread and the pool's workers; the split sequences merged after."""
    job[J_FUNC], job[J_CHUNKS] = chunk_fn, items.shape[0]
    job[A_Q], job[A_OUT], job[A_SEQS] = q.ctypes.data, out.ctypes.data, seqs.ctypes.data
    job[A_ITEMS], job[A_PART_M], job[A_PART_L] = items.ctypes.data, part_m.ctypes.data, part_l.ctypes.data
    job[A_PART_ACC] = part_acc.ctypes.data
    job[A_SPLITS], job[A_N], job[A_H], job[A_HD] = n_splits.ctypes.data, q.shape[0], q.shape[1], q.shape[2]
    job[A_P], job[A_B], job[A_LAYER], job[A_KVH] = part_m.shape[0], seqs.shape[0], layer, n_kv_heads
    job[A_WIDTH], job[A_WINDOW] = width, window
    dispatch(ctrl, job)
    merge_parts(out, part_m, part_l, part_acc, seqs, n_splits)


# ---------------------------------------------------------------------------------------------
# The Python side: a step's sequences laid out for ``attend`` once per forward
# ---------------------------------------------------------------------------------------------
ROW_BLOCK = 48  # query rows (tokens x the G heads of a KV head) per item: their scores stay in L1
MIN_SPLIT_POSITIONS = 512  # a part of a split sequence covers at least this many cached positions
# Below this much work (positions read x query rows, per KV head) a layer's attention runs on the
# calling thread alone (a pool job costs more than it saves); above it its items are a job of the
# engine's worker pool.
PARALLEL_WORK = 4_096
ITEMS_PER_THREAD = 4  # split long caches until a step has this many items per thread
STORAGE = {"float32": np.float32, "float16": np.uint16, "q8_0": np.int8}  # as the kernel reads them


class StepPlan:
    """The sequences of one step: for each, layer 0's K and V (KVH, capacity, width) of its cache,
    the bytes from one layer to the next, where its new tokens start and how many there are.
    ``items(window)`` cuts the work for ``attend``; ``run`` attends one layer."""

    def __init__(
        self,
        keys: list[np.ndarray],
        values: list[np.ndarray],
        layer_bytes: list[int],
        starts: list[int],
        lengths: list[int],
        dtype: str,
        threads: int,
        first_rows: list[int] | None = None,
    ) -> None:
        B = len(keys)
        self.sequences: list[int] = list(range(B))  # which of the step's sequences these are
        self.n_kv_heads, self.width = int(keys[0].shape[0]), int(keys[0].shape[2])
        self.dtype, self.proto = dtype, np.empty(0, dtype=STORAGE[dtype])
        seqs = np.empty((B, 7), dtype=np.int64)
        if first_rows is None:  # the sequences' rows one after another from row 0
            first_rows = [int(x) for x in np.cumsum([0, *lengths[:-1]])]
        for b, (k, v) in enumerate(zip(keys, values, strict=True)):
            if not (k.flags.c_contiguous and v.flags.c_contiguous) or k.dtype != v.dtype:
                raise ValueError("attention reads contiguous K/V buffers of one dtype")
            address = k.__array_interface__["data"][0]
            seqs[b] = (address, layer_bytes[b], v.__array_interface__["data"][0] - address, k.shape[1],
                       starts[b], lengths[b], first_rows[b])  # fmt: skip
        self.seqs, self.threads = seqs, threads
        self._items: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._work: dict[int, int] = {}
        self._buffers = (keys, values)  # kept alive while the plan is

    def items(self, window: int, G: int) -> tuple[np.ndarray, np.ndarray]:
        """(items (I, 7), parts per sequence (B,)) for layers with this window (0: none)."""
        if window not in self._items:
            self._items[window] = self._cut(window, G)
        return self._items[window]

    def _cut(self, window: int, G: int) -> tuple[np.ndarray, np.ndarray]:
        tokens_per_item = max(1, ROW_BLOCK // G)
        spans, row_blocks = [], []
        for _, _, _, _, start, T, _ in self.seqs:
            lo = max(0, start - window + 1) if window else 0
            spans.append((int(lo), int(start + T)))
            row_blocks.append(range(0, int(T), tokens_per_item))
        base = self.n_kv_heads * sum(len(r) for r in row_blocks)
        want = ITEMS_PER_THREAD * self.threads
        n_splits = np.ones(len(spans), dtype=np.int64)
        if base < want:  # too few items for the threads: long caches are cut by position too
            for b, (lo, hi) in enumerate(spans):
                n_splits[b] = max(1, min(-(-want // base), (hi - lo) // MIN_SPLIT_POSITIONS))
        items = []
        for b, ((lo, hi), blocks) in enumerate(zip(spans, row_blocks, strict=True)):
            T = int(self.seqs[b, 5])
            cuts = [lo + ((hi - lo) * k // n_splits[b]) // BLOCK * BLOCK for k in range(n_splits[b])] + [hi]
            for h in range(self.n_kv_heads):
                for t0 in blocks:
                    t1 = min(T, t0 + tokens_per_item)
                    items += [(b, h, t0, t1, cuts[p], cuts[p + 1], p) for p in range(n_splits[b])]
        return np.array(items, dtype=np.int64).reshape(-1, 7), n_splits

    def run(self, q: np.ndarray, layer: int, window: int) -> np.ndarray:
        """Attention of every row of ``q`` (N, H, Hd), pre-scaled, against layer ``layer`` of its
        sequence's cache (its new tokens' K/V already written). Returns (N, H * Hd); rows of
        sequences outside the plan are left undefined (the caller fills them)."""
        N, H, Hd = q.shape
        items, n_splits = self.items(window, H // self.n_kv_heads)
        P = int(n_splits.max())
        shape = (P, N, H) if P > 1 else (1, 1, 1)
        part_m = np.empty(shape, dtype=np.float32)
        part_l = np.empty(shape, dtype=np.float32)
        part_acc = np.empty((*shape, Hd if P > 1 else 1), dtype=np.float32)
        out = np.empty((N, H, Hd), dtype=np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)
        arrays = (q, out, part_m, part_l, part_acc, self.seqs, items, n_splits)
        if self.serial(window):
            attend_serial(*arrays, self.proto, layer, self.n_kv_heads, self.width, window)
        else:  # the chunk function knows the cache's storage type
            pool().run(
                attend_on_pool, attend_chunk(self.dtype), *arrays, layer, self.n_kv_heads, self.width, window
            )
        return out.reshape(N, H * Hd)

    def serial(self, window: int) -> bool:
        """Whether layers with this window attend on the calling thread (small work, or one thread)."""
        return self.threads <= 1 or self.work(window) < PARALLEL_WORK

    def work(self, window: int) -> int:
        """Positions read times query rows, over the step's sequences (per KV head); computed once per
        window, as ``items`` is (every layer of a step asks)."""
        if window not in self._work:
            starts, counts = self.seqs[:, 4], self.seqs[:, 5]
            lows = np.maximum(0, starts - window + 1) if window else 0
            self._work[window] = int(((starts + counts - lows) * counts).sum())
        return self._work[window]


def attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, window: int = 0, dtype: str = "float32",
    threads: int = 1,
) -> np.ndarray:  # fmt: skip
    """One sequence's attention, for tests and callers outside a step: q (T, H, Hd) pre-scaled;
    keys, values (KVH, capacity, width) as the cache stores them (``dtype``), with the T new tokens'
    K/V at start .. start + T - 1. Returns (T, H * Hd)."""
    plan = StepPlan([keys], [values], [0], [start], [q.shape[0]], dtype, threads)
    return plan.run(q, 0, window)


def warm_up(dtypes: tuple[str, ...] = ("float32",)) -> None:
    """Compile (or load from numba's disk cache) the kernel, alone and as a pool job, for these cache
    dtypes. Each dtype is its own compilation (~5 s of CPU the first time, measured on a loaded
    Xeon): the default one is compiled at start, float16 and q8_0 on their first use (then from
    disk)."""
    rng = np.random.default_rng(0)
    q = np.ones((2, 2, 32), dtype=np.float32)
    for dtype in dtypes:
        storage = STORAGE[dtype]
        width = 32 + 4 if dtype == "q8_0" else 32
        kv = rng.integers(0, 60, (1, 4, width)).astype(storage)  # any finite values
        plan = StepPlan([kv], [kv], [0], [2], [2], dtype, 1)
        items, n_splits = plan.items(0, 2)
        out, part = np.empty((2, 2, 32), dtype=np.float32), np.empty((1, 1, 1), dtype=np.float32)
        args = (q, out, part, part, part.reshape(1, 1, 1, 1), plan.seqs, items, n_splits)
        attend_serial(*args, plan.proto, 0, 1, width, 0)
        pool().run(attend_on_pool, attend_chunk(dtype), *args, 0, 1, width, 0)
