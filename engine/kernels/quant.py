"""numba kernels over weights packed in panels (``weights.PackedWeight``): the file's quantized bits,
16 output rows side by side.

A panel holds 16 consecutive output rows. For each block of L input positions (L = 32, or 16 for
Q6_K) it stores, lane by lane (lane = output row):

- ``qs``: the values' low four bits, two to a byte as the file packs them (byte j holds position j
  and j + L/2), or one int8 per value for 8-bit types: (panels, blocks, L/2 or L, 16);
- ``qh``: the fifth (Q5) or fifth and sixth (Q6_K) bits of the block's L values in one uint32, as
  the file's ``qh`` holds them: (panels, blocks, 16), or empty;
- ``d``, ``m``: the block's scale and minimum, float16 bits (uint16) as in the file or float32 where
  float16 cannot hold them exactly (K-quants' sub-block scales): (panels, blocks, 16); ``m`` may be
  empty. A weight is ``W[o, c] = d * (q + offset) + m`` with ``offset`` -8, -16 or -32 for the
  signed types, as ggml dequantizes it.

``gemv`` loads each 16-byte row of a block once, widens it to 16 float32 lanes in registers and
multiplies it into every activation row of the step (up to 16) with one broadcast FMA per row: the
block's sum ``Σ x·q`` runs over raw values and the scale is applied once per block and row,
``d * Σ x·q + (m + offset·d) * Σ x`` (ggml's ``vec_dot_q4_1_q8_1`` factoring, float32 activations,
with the per-block sums ``Σ x`` computed once per call). Nothing is gathered or reduced across lanes.
A panel's weights stream from memory once, linearly. Work is split by panels (``pool.py`` hands
ranges of panels to threads).

``dequantize`` expands panels to float32 in (in, out) order for BLAS (prefill-sized steps).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import overload

from .pool import CHUNK_SIGNATURE, J_CHUNKS, J_FUNC, J_USER, JOB_WORDS, address, dispatch
from .simd import (
    fma,
    int_zeros,
    item,
    keep_alive,
    load,
    load_ints,
    load_scales,
    pointer,
    prefetch,
    store,
    to_float,
    zeros,
)

LANES = 16
DENSE_ROWS = 64  # from this many rows (AVX-512) whole panel pairs are dequantized first (measured: +0-10%)
PREFETCH_BLOCKS = 4  # blocks ahead that a one-row pass asks for (measured: 1-2 KB ahead, ~15% faster)
# Reassociation lets LLVM reorder the sums; results differ from a sequential float32 sum only in
# summation order (held to the float32 reference by the tests).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
kernel = njit(fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)
# Helpers run once per block: inlined by numba, and handed data pointers (``simd.pointer``), never
# arrays: an array argument is reference-counted at each call, atomics that cost more than a block.
inlined = njit(fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True, inline="always")


def values_per_byte(qs):  # pragma: no cover - replaced by the overload below when compiled
    """2 for nibbles (uint8 ``qs``), 1 for int8 values: a constant of the compiled code."""
    raise NotImplementedError


@overload(values_per_byte)
def _values_per_byte(qs):  # pragma: no cover - compiled
    n = 1 if qs.dtype == types.int8 else 2
    return lambda qs: n


@inlined
def high_word(qh, base, high_bits):  # pragma: no cover - compiled
    """Block ``base``'s high bits (16 lanes), or zeros for a type without them."""
    if high_bits == 0:
        return int_zeros()
    return load_ints(qh, base * LANES)


@inlined
def nibbles_at(qs, row, j, half, h, high_bits):  # pragma: no cover - compiled
    """Values j and j + half of a block (16 lanes each, as float32) from byte row j: the low and high
    nibble, and for Q5/Q6_K each one's high bits from ``h``."""
    v = load_ints(qs, row + j * LANES)
    low, high = v & 15, v >> 4
    if high_bits != 0:
        mask = (1 << high_bits) - 1
        low = low | (((h >> (high_bits * j)) & mask) << 4)
        high = high | (((h >> (high_bits * (j + half))) & mask) << 4)
    return to_float(low), to_float(high)


@inlined
def prefetch_block(qs, base, L):  # pragma: no cover - compiled
    """Ask for block ``base``'s value bytes (4 or 8 cache lines) ahead of their use: the hardware
    prefetcher alone left the one-row pass at ~6 GB/s from memory where it runs at ~15 in cache."""
    start = base * L * LANES // values_per_byte(qs)
    for line in range(0, L * LANES // values_per_byte(qs), 64):
        prefetch(qs, start + line)


@inlined
def unpack_block(qs, qh, base, L, high_bits, qf, at=0):  # pragma: no cover - compiled
    """The block ``base`` (= panel * blocks + block) as float32 raw values (no scale, no offset):
    ``qf[at + j * 16 + lane]`` for j < L. ``high_bits``: bits per value in ``qh`` (0: none)."""
    if values_per_byte(qs) == 1:
        row = base * L * LANES
        for j in range(L):
            store(qf, at + j * LANES, to_float(load_ints(qs, row + j * LANES)))
        return
    half = L // 2
    row = base * half * LANES
    h = high_word(qh, base, high_bits)
    for j in range(half):
        low, high = nibbles_at(qs, row, j, half, h, high_bits)
        store(qf, at + j * LANES, low)
        store(qf, at + (j + half) * LANES, high)


@inlined
def block_scales(d, m, has_m, offset, base):  # pragma: no cover - compiled
    """(scale, minimum + offset * scale) of block ``base``, 16 lanes each."""
    dv = load_scales(d, base * LANES)
    mv = dv * np.float32(offset)
    if has_m:
        mv = mv + load_scales(m, base * LANES)
    return dv, mv


@inlined
def _finish(tot, r, a, dv, mv, xsum):  # pragma: no cover - compiled
    """tot[r] += d * Σ x·q + (m + offset·d) * Σ x"""
    t = load(tot, r * LANES)
    store(tot, r * LANES, fma(mv, xsum, fma(dv, a, t)))


@inlined
def _finish2(tot, r, rows, a, b, dv, mv, ev, nv, xsum):  # pragma: no cover - compiled
    """``_finish`` for row r of two panels (the second's rows stored after the first's)."""
    _finish(tot, r, a, dv, mv, xsum)
    _finish(tot, rows + r, b, ev, nv, xsum)


@inlined
def rows_8(x, K, xs, nb, qf, L, k, r, dv, mv, tot):  # pragma: no cover - compiled
    """Activation rows r .. r+7 against one block: one weight vector load feeds eight FMAs."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    c = r * K + k * L
    for j in range(L):
        w = load(qf, j * LANES)
        a0 = fma(item(x, c), w, a0)
        a1 = fma(item(x, c + K), w, a1)
        a2 = fma(item(x, c + 2 * K), w, a2)
        a3 = fma(item(x, c + 3 * K), w, a3)
        a4 = fma(item(x, c + 4 * K), w, a4)
        a5 = fma(item(x, c + 5 * K), w, a5)
        a6 = fma(item(x, c + 6 * K), w, a6)
        a7 = fma(item(x, c + 7 * K), w, a7)
        c += 1
    s = r * nb + k
    _finish(tot, r, a0, dv, mv, item(xs, s))
    _finish(tot, r + 1, a1, dv, mv, item(xs, s + nb))
    _finish(tot, r + 2, a2, dv, mv, item(xs, s + 2 * nb))
    _finish(tot, r + 3, a3, dv, mv, item(xs, s + 3 * nb))
    _finish(tot, r + 4, a4, dv, mv, item(xs, s + 4 * nb))
    _finish(tot, r + 5, a5, dv, mv, item(xs, s + 5 * nb))
    _finish(tot, r + 6, a6, dv, mv, item(xs, s + 6 * nb))
    _finish(tot, r + 7, a7, dv, mv, item(xs, s + 7 * nb))


@inlined
def rows_8x2(x, K, xs, nb, qf, L, k, r, dv, mv, ev, nv, tot, rows):  # pragma: no cover - compiled
    """Rows r .. r+7 against one block of two panels (scratch ``qf``: the first panel's L vectors,
    then the second's): sixteen accumulators, each broadcast activation feeding two FMAs. ``tot``
    holds the first panel's rows, then (from ``rows``) the second's."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    b0, b1, b2, b3 = zeros(), zeros(), zeros(), zeros()
    b4, b5, b6, b7 = zeros(), zeros(), zeros(), zeros()
    c = r * K + k * L
    second = L * LANES
    for j in range(L):
        w = load(qf, j * LANES)
        v = load(qf, second + j * LANES)
        x0, x1, x2, x3 = item(x, c), item(x, c + K), item(x, c + 2 * K), item(x, c + 3 * K)
        a0, b0 = fma(x0, w, a0), fma(x0, v, b0)
        a1, b1 = fma(x1, w, a1), fma(x1, v, b1)
        a2, b2 = fma(x2, w, a2), fma(x2, v, b2)
        a3, b3 = fma(x3, w, a3), fma(x3, v, b3)
        x4, x5, x6, x7 = item(x, c + 4 * K), item(x, c + 5 * K), item(x, c + 6 * K), item(x, c + 7 * K)
        a4, b4 = fma(x4, w, a4), fma(x4, v, b4)
        a5, b5 = fma(x5, w, a5), fma(x5, v, b5)
        a6, b6 = fma(x6, w, a6), fma(x6, v, b6)
        a7, b7 = fma(x7, w, a7), fma(x7, v, b7)
        c += 1
    s = r * nb + k
    _finish2(tot, r, rows, a0, b0, dv, mv, ev, nv, item(xs, s))
    _finish2(tot, r + 1, rows, a1, b1, dv, mv, ev, nv, item(xs, s + nb))
    _finish2(tot, r + 2, rows, a2, b2, dv, mv, ev, nv, item(xs, s + 2 * nb))
    _finish2(tot, r + 3, rows, a3, b3, dv, mv, ev, nv, item(xs, s + 3 * nb))
    _finish2(tot, r + 4, rows, a4, b4, dv, mv, ev, nv, item(xs, s + 4 * nb))
    _finish2(tot, r + 5, rows, a5, b5, dv, mv, ev, nv, item(xs, s + 5 * nb))
    _finish2(tot, r + 6, rows, a6, b6, dv, mv, ev, nv, item(xs, s + 6 * nb))
    _finish2(tot, r + 7, rows, a7, b7, dv, mv, ev, nv, item(xs, s + 7 * nb))


@inlined
def rows_4(x, K, xs, nb, qf, L, k, r, dv, mv, tot):  # pragma: no cover - compiled
    """Activation rows r .. r+3 (two accumulators each: FMA latency is 4 cycles)."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    b0, b1, b2, b3 = zeros(), zeros(), zeros(), zeros()
    c = r * K + k * L
    for j in range(0, L, 2):
        w = load(qf, j * LANES)
        v = load(qf, (j + 1) * LANES)
        a0 = fma(item(x, c), w, a0)
        a1 = fma(item(x, c + K), w, a1)
        a2 = fma(item(x, c + 2 * K), w, a2)
        a3 = fma(item(x, c + 3 * K), w, a3)
        b0 = fma(item(x, c + 1), v, b0)
        b1 = fma(item(x, c + 1 + K), v, b1)
        b2 = fma(item(x, c + 1 + 2 * K), v, b2)
        b3 = fma(item(x, c + 1 + 3 * K), v, b3)
        c += 2
    s = r * nb + k
    _finish(tot, r, a0 + b0, dv, mv, item(xs, s))
    _finish(tot, r + 1, a1 + b1, dv, mv, item(xs, s + nb))
    _finish(tot, r + 2, a2 + b2, dv, mv, item(xs, s + 2 * nb))
    _finish(tot, r + 3, a3 + b3, dv, mv, item(xs, s + 3 * nb))


@inlined
def dot_1(qs, qh, base, L, high_bits, x, c):  # pragma: no cover - compiled
    """Σ_j x[c + j] q_j over block ``base`` for one activation row, the values widened in registers
    and used at once. Four accumulators: FMA latency is 4 cycles."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    if values_per_byte(qs) == 1:
        row = base * L * LANES
        for j in range(0, L, 2):
            a0 = fma(item(x, c + j), to_float(load_ints(qs, row + j * LANES)), a0)
            a1 = fma(item(x, c + j + 1), to_float(load_ints(qs, row + (j + 1) * LANES)), a1)
        return a0 + a1
    half = L // 2
    row = base * half * LANES
    h = high_word(qh, base, high_bits)
    for j in range(0, half, 2):
        low, high = nibbles_at(qs, row, j, half, h, high_bits)
        a0 = fma(item(x, c + j), low, a0)
        a1 = fma(item(x, c + j + half), high, a1)
        low, high = nibbles_at(qs, row, j + 1, half, h, high_bits)
        a2 = fma(item(x, c + j + 1), low, a2)
        a3 = fma(item(x, c + j + 1 + half), high, a3)
    return (a0 + a1) + (a2 + a3)


@inlined
def dot_2(qs, qh, base, L, high_bits, x, c, K):  # pragma: no cover - compiled
    """``dot_1`` for the activation rows at x[c] and x[c + K]: each widened value feeds both."""
    a0, a1, b0, b1 = zeros(), zeros(), zeros(), zeros()
    if values_per_byte(qs) == 1:
        row = base * L * LANES
        for j in range(0, L, 2):
            w = to_float(load_ints(qs, row + j * LANES))
            v = to_float(load_ints(qs, row + (j + 1) * LANES))
            a0 = fma(item(x, c + j), w, a0)
            b0 = fma(item(x, c + K + j), w, b0)
            a1 = fma(item(x, c + j + 1), v, a1)
            b1 = fma(item(x, c + K + j + 1), v, b1)
        return a0 + a1, b0 + b1
    half = L // 2
    row = base * half * LANES
    h = high_word(qh, base, high_bits)
    for j in range(half):
        low, high = nibbles_at(qs, row, j, half, h, high_bits)
        a0 = fma(item(x, c + j), low, a0)
        b0 = fma(item(x, c + K + j), low, b0)
        a1 = fma(item(x, c + j + half), high, a1)
        b1 = fma(item(x, c + K + j + half), high, b1)
    return a0 + a1, b0 + b1


@inlined
def dot_4(qs, qh, base, L, high_bits, x, c, K):  # pragma: no cover - compiled
    """``dot_1`` for four activation rows x[c], x[c + K], x[c + 2K], x[c + 3K]."""
    a0, a1, b0, b1 = zeros(), zeros(), zeros(), zeros()
    e0, e1, f0, f1 = zeros(), zeros(), zeros(), zeros()
    if values_per_byte(qs) == 1:
        row = base * L * LANES
        for j in range(0, L, 2):
            w = to_float(load_ints(qs, row + j * LANES))
            v = to_float(load_ints(qs, row + (j + 1) * LANES))
            a0 = fma(item(x, c + j), w, a0)
            b0 = fma(item(x, c + K + j), w, b0)
            e0 = fma(item(x, c + 2 * K + j), w, e0)
            f0 = fma(item(x, c + 3 * K + j), w, f0)
            a1 = fma(item(x, c + j + 1), v, a1)
            b1 = fma(item(x, c + K + j + 1), v, b1)
            e1 = fma(item(x, c + 2 * K + j + 1), v, e1)
            f1 = fma(item(x, c + 3 * K + j + 1), v, f1)
        return a0 + a1, b0 + b1, e0 + e1, f0 + f1
    half = L // 2
    row = base * half * LANES
    h = high_word(qh, base, high_bits)
    for j in range(half):
        low, high = nibbles_at(qs, row, j, half, h, high_bits)
        a0 = fma(item(x, c + j), low, a0)
        b0 = fma(item(x, c + K + j), low, b0)
        e0 = fma(item(x, c + 2 * K + j), low, e0)
        f0 = fma(item(x, c + 3 * K + j), low, f0)
        a1 = fma(item(x, c + j + half), high, a1)
        b1 = fma(item(x, c + K + j + half), high, b1)
        e1 = fma(item(x, c + 2 * K + j + half), high, e1)
        f1 = fma(item(x, c + 3 * K + j + half), high, f1)
    return a0 + a1, b0 + b1, e0 + e1, f0 + f1


@inlined
def _layout(qs, qh, K):  # pragma: no cover - compiled
    """(values per block, high bits per value): from the arrays' shapes."""
    L = qs.shape[2] * values_per_byte(qs)
    return L, (32 // L if qh.shape[0] != 0 else 0)


# A matrix as the helpers below take it: (qs, qh, d, m) data pointers, has_m, offset, L, high bits,
# blocks per row. One tuple keeps the calls short.


@inlined
def panel_rows_1(W, x, xs, out, K, p, r, col):  # pragma: no cover - compiled
    """Row r of ``out`` over panel p, the block's values used straight from registers."""
    qs, qh, d, m, has_m, offset, L, high_bits, nb = W
    t = zeros()
    c, s = r * K, r * nb
    for k in range(nb):
        base = p * nb + k
        prefetch_block(qs, base + PREFETCH_BLOCKS, L)
        dv, mv = block_scales(d, m, has_m, offset, base)
        t = fma(mv, item(xs, s + k), fma(dv, dot_1(qs, qh, base, L, high_bits, x, c + k * L), t))
    store(out, col, t)


@inlined
def panel_rows_2(W, x, xs, out, K, p, r, col, n_out):  # pragma: no cover - compiled
    """Rows r, r + 1 over panel p."""
    qs, qh, d, m, has_m, offset, L, high_bits, nb = W
    t0, t1 = zeros(), zeros()
    c, s = r * K, r * nb
    for k in range(nb):
        base = p * nb + k
        dv, mv = block_scales(d, m, has_m, offset, base)
        a0, a1 = dot_2(qs, qh, base, L, high_bits, x, c + k * L, K)
        t0 = fma(mv, item(xs, s + k), fma(dv, a0, t0))
        t1 = fma(mv, item(xs, s + nb + k), fma(dv, a1, t1))
    store(out, col, t0)
    store(out, col + n_out, t1)


@inlined
def panel_rows_4(W, x, xs, out, K, p, r, col, n_out):  # pragma: no cover - compiled
    """Rows r .. r + 3 over panel p."""
    qs, qh, d, m, has_m, offset, L, high_bits, nb = W
    t0, t1, t2, t3 = zeros(), zeros(), zeros(), zeros()
    c, s = r * K, r * nb
    for k in range(nb):
        base = p * nb + k
        dv, mv = block_scales(d, m, has_m, offset, base)
        a0, a1, a2, a3 = dot_4(qs, qh, base, L, high_bits, x, c + k * L, K)
        t0 = fma(mv, item(xs, s + k), fma(dv, a0, t0))
        t1 = fma(mv, item(xs, s + nb + k), fma(dv, a1, t1))
        t2 = fma(mv, item(xs, s + 2 * nb + k), fma(dv, a2, t2))
        t3 = fma(mv, item(xs, s + 3 * nb + k), fma(dv, a3, t3))
    store(out, col, t0)
    store(out, col + n_out, t1)
    store(out, col + 2 * n_out, t2)
    store(out, col + 3 * n_out, t3)


@inlined
def grouped_rows(W, x, xs, out, K, p, n_panels, rows, tile, qf, tot, col, n_out):  # pragma: no cover
    """Rows 0 .. rows - 1 (a multiple of ``tile``) over panels p .. p + n_panels - 1 (1 or 2): each
    block widened once into the L1 scratch ``qf`` and multiplied into every row group; with two
    panels a tile of 8 rows holds 16 accumulators, each activation broadcast feeding two FMAs."""
    qs, qh, d, m, has_m, offset, L, high_bits, nb = W
    for i in range(rows * n_panels):
        store(tot, i * LANES, zeros())
    for k in range(nb):
        base = p * nb + k
        unpack_block(qs, qh, base, L, high_bits, qf)
        dv, mv = block_scales(d, m, has_m, offset, base)
        if n_panels == 2:
            other = base + nb
            unpack_block(qs, qh, other, L, high_bits, qf, L * LANES)
            ev, nv = block_scales(d, m, has_m, offset, other)
            for r in range(0, rows, 8):
                rows_8x2(x, K, xs, nb, qf, L, k, r, dv, mv, ev, nv, tot, rows)
        else:
            for r in range(0, rows, tile):
                if tile >= 8:
                    rows_8(x, K, xs, nb, qf, L, k, r, dv, mv, tot)
                else:
                    rows_4(x, K, xs, nb, qf, L, k, r, dv, mv, tot)
    for i in range(n_panels):
        for r in range(rows):
            store(out, r * n_out + col + i * LANES, load(tot, (i * rows + r) * LANES))


@inlined
def dequantize_pair(W, p, K, wf):  # pragma: no cover - compiled
    """Panels p and p + 1 as float32 weights in the scratch ``wf``: ``wf[(i * K + c) * 16 + lane]``."""
    qs, qh, d, m, has_m, offset, L, high_bits, nb = W
    for i in range(2):
        for k in range(nb):
            base = (p + i) * nb + k
            at = (i * K + k * L) * LANES
            unpack_block(qs, qh, base, L, high_bits, wf, at)
            dv, mv = block_scales(d, m, has_m, offset, base)
            for j in range(L):
                store(wf, at + j * LANES, fma(dv, load(wf, at + j * LANES), mv))


@inlined
def dense_rows_8x2(x, K, wf, r, out, col, n_out):  # pragma: no cover - compiled
    """Rows r .. r+7 of two dequantized panels (``dequantize_pair``) over all K positions: sixteen
    accumulators kept in registers from the first position to the last, as a GEMM micro-kernel."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    b0, b1, b2, b3 = zeros(), zeros(), zeros(), zeros()
    b4, b5, b6, b7 = zeros(), zeros(), zeros(), zeros()
    c, second = r * K, K * LANES
    for j in range(K):
        w = load(wf, j * LANES)
        v = load(wf, second + j * LANES)
        x0, x1, x2, x3 = item(x, c), item(x, c + K), item(x, c + 2 * K), item(x, c + 3 * K)
        a0, b0 = fma(x0, w, a0), fma(x0, v, b0)
        a1, b1 = fma(x1, w, a1), fma(x1, v, b1)
        a2, b2 = fma(x2, w, a2), fma(x2, v, b2)
        a3, b3 = fma(x3, w, a3), fma(x3, v, b3)
        x4, x5, x6, x7 = item(x, c + 4 * K), item(x, c + 5 * K), item(x, c + 6 * K), item(x, c + 7 * K)
        a4, b4 = fma(x4, w, a4), fma(x4, v, b4)
        a5, b5 = fma(x5, w, a5), fma(x5, v, b5)
        a6, b6 = fma(x6, w, a6), fma(x6, v, b6)
        a7, b7 = fma(x7, w, a7), fma(x7, v, b7)
        c += 1
    at = r * n_out + col
    store(out, at, a0)
    store(out, at + LANES, b0)
    store(out, at + n_out, a1)
    store(out, at + n_out + LANES, b1)
    store(out, at + 2 * n_out, a2)
    store(out, at + 2 * n_out + LANES, b2)
    store(out, at + 3 * n_out, a3)
    store(out, at + 3 * n_out + LANES, b3)
    store(out, at + 4 * n_out, a4)
    store(out, at + 4 * n_out + LANES, b4)
    store(out, at + 5 * n_out, a5)
    store(out, at + 5 * n_out + LANES, b5)
    store(out, at + 6 * n_out, a6)
    store(out, at + 6 * n_out + LANES, b6)
    store(out, at + 7 * n_out, a7)
    store(out, at + 7 * n_out + LANES, b7)


@kernel
def gemv(x, xs, qs, qh, d, m, offset, out, col0, p0, p1, max_tile):  # pragma: no cover - compiled
    """out[:, col0 + 16p : col0 + 16p + 16] = x @ W[panel p].T for panels p0 <= p < p1.

    x (B, K) float32 (B <= 16 best, any B works); xs (B, K / L): x's per-block sums; out (B, n)
    float32, C-contiguous. ``max_tile`` (8 with AVX-512's 32 vector registers, else 4): groups of
    that many rows share one widening of each block, kept in an L1 scratch (with AVX-512, two panels
    at a time); the rows left over (and every row of a smaller step) widen the values in registers
    for up to max_tile / 2 rows at once. From ``DENSE_ROWS`` rows (prefill chunks) two panels are
    dequantized whole into the scratch first and each group of 8 rows runs over all K positions with
    its 16 accumulators in registers: a GEMM micro-kernel on a packed panel, as BLAS's. Each panel's
    weights come from memory once; other row groups read them from L1/L2."""
    B, K = x.shape
    n_out, nb = out.shape[1], qs.shape[1]
    L, high_bits = _layout(qs, qh, K)
    grouped = B // max_tile * max_tile  # rows computed from the scratch
    pair = 2 if max_tile >= 8 else 1  # panels per scratch pass
    dense = pair == 2 and grouped >= DENSE_ROWS
    qf_buffer = np.empty(pair * (K if dense else L) * LANES, dtype=np.float32)  # widened once for all rows
    tot_buffer = np.empty(pair * grouped * LANES, dtype=np.float32)
    qf, tot, xp, xsp, outp = pointer(qf_buffer), pointer(tot_buffer), pointer(x), pointer(xs), pointer(out)
    W = (pointer(qs), pointer(qh), pointer(d), pointer(m), m.shape[0] != 0, offset, L, high_bits, nb)
    p = p0
    while p < p1:
        n_panels = min(pair, p1 - p) if grouped else 1
        col = col0 + p * LANES
        if dense and n_panels == 2:
            dequantize_pair(W, p, K, qf)
            for r in range(0, grouped, 8):
                dense_rows_8x2(xp, K, qf, r, outp, col, n_out)
        elif grouped:
            grouped_rows(W, xp, xsp, outp, K, p, n_panels, grouped, max_tile, qf, tot, col, n_out)
        for i in range(n_panels):
            c, r = col + i * LANES, grouped
            while r + 4 <= B and max_tile >= 8:
                panel_rows_4(W, xp, xsp, outp, K, p + i, r, r * n_out + c, n_out)
                r += 4
            while r + 2 <= B:
                panel_rows_2(W, xp, xsp, outp, K, p + i, r, r * n_out + c, n_out)
                r += 2
            if r < B:
                panel_rows_1(W, xp, xsp, outp, K, p + i, r, r * n_out + c)
        p += n_panels
    keep_alive(qf_buffer)
    keep_alive(tot_buffer)


@kernel
def dequantize(qs, qh, d, m, offset, p0, p1, out):  # pragma: no cover - compiled
    """Panels p0 <= p < p1 as float32 in (in, out) order: out[c, 16 (p - p0) + lane], out (K, n)
    C-contiguous with n >= 16 (p1 - p0): the weights of ``x @ out`` for BLAS."""
    K, n = out.shape
    nb = qs.shape[1]
    L, high_bits = _layout(qs, qh, K)
    qf_buffer = np.empty(L * LANES, dtype=np.float32)
    qf, outp = pointer(qf_buffer), pointer(out)
    qsp, qhp, dp, mp = pointer(qs), pointer(qh), pointer(d), pointer(m)
    has_m = m.shape[0] != 0
    for p in range(p0, p1):
        col = (p - p0) * LANES
        for k in range(nb):
            base = p * nb + k
            unpack_block(qsp, qhp, base, L, high_bits, qf)
            dv, mv = block_scales(dp, mp, has_m, offset, base)
            for j in range(L):
                store(outp, (k * L + j) * n + col, fma(dv, load(qf, j * LANES), mv))
    keep_alive(qf_buffer)


@kernel
def gather_rows(qs, qh, d, m, offset, rows, out):  # pragma: no cover - compiled
    """out[i] = W[rows[i]] as float32 (an embedding lookup). out (len(rows), K)."""
    K = out.shape[1]
    nb = qs.shape[1]
    L, high_bits = _layout(qs, qh, K)
    buffers = np.empty((2, L * LANES), dtype=np.float32)
    qf, w = pointer(buffers[0]), pointer(buffers[1])
    qsp, qhp, dp, mp = pointer(qs), pointer(qh), pointer(d), pointer(m)
    has_m = m.shape[0] != 0
    for i in range(rows.shape[0]):
        p, lane = rows[i] // LANES, rows[i] % LANES
        for k in range(nb):
            base = p * nb + k
            unpack_block(qsp, qhp, base, L, high_bits, qf)
            dv, mv = block_scales(dp, mp, has_m, offset, base)
            for j in range(L):
                store(w, 0, fma(dv, load(qf, j * LANES), mv))
                out[i, k * L + j] = item(w, lane)
    keep_alive(buffers)


# ---------------------------------------------------------------------------------------------
# Projections as jobs for the worker pool (``pool.py``)
# ---------------------------------------------------------------------------------------------
# job words after the pool's own: the call's arrays and the matrix's table
J_N, J_K, J_X, J_OUT, J_OUT_STRIDE, J_XS32, J_XS16, J_TABLE, J_TILE = range(J_USER, J_USER + 9)
# a matrix's table: its part and chunk counts, each part's words, then each chunk's (part, p0, p1)
T_PARTS, T_CHUNKS, T_HEAD = 0, 1, 2
PART_WORDS = 12
P_KIND, P_QS, P_QH, P_D, P_M, P_NB, P_PANELS, P_COL, P_OFFSET, P_BLOCK, P_QH_N, P_M_N = range(PART_WORDS)
CHUNK_BLOCKS = 96  # blocks per chunk (a few panels): small enough to balance, large enough to amortise


def table(parts: Sequence[Any]) -> np.ndarray:
    """The int64 table a projection job reads for a matrix of ``weights.Panels`` parts: each part's
    kind (nibbles or int8, float16 or float32 scales), array addresses and shapes, then the chunks."""
    words: list[int] = [len(parts), 0]
    chunks: list[int] = []
    col = 0
    for i, p in enumerate(parts):
        kind = (2 if p.qs.dtype == np.int8 else 0) + (1 if p.d.dtype == np.float32 else 0)
        nb = p.qs.shape[1]
        words += [kind, p.qs.ctypes.data, p.qh.ctypes.data, p.d.ctypes.data, p.m.ctypes.data, nb,
                  p.n_panels, col, int(p.offset), p.block, p.qh.shape[0], p.m.shape[0]]  # fmt: skip
        step = max(2, CHUNK_BLOCKS // nb // 2 * 2)  # even: panels go two at a time
        for a in range(0, p.n_panels, step):
            chunks += [i, a, min(a + step, p.n_panels)]
        col += p.n_panels * LANES
    words[T_CHUNKS] = len(chunks) // 3
    return np.array(words + chunks, dtype=np.int64)


@functools.cache
def project_chunk() -> int:
    """The address of ``_project_chunk`` compiled as a C function (a pool job's chunk function);
    compiled (or loaded from the disk cache) at the first call, not at import."""
    compiled: Any = cfunc(CHUNK_SIGNATURE, cache=True)(_project_chunk)
    return int(compiled.address)


def _project_chunk(words, c):  # pragma: no cover - compiled
    """Chunk ``c`` of a projection job: ``gemv`` over its panels."""
    job = carray(words, (JOB_WORDS,))
    tab, at, p0, p1 = chunk_part(job, c)
    project_part(job, tab, at, p0, p1)


@inlined
def chunk_part(job, c):  # pragma: no cover - compiled
    """(the job's matrix table, where chunk ``c``'s part starts in it, the chunk's first and end
    panel)."""
    n_parts = carray(address(job[J_TABLE]), (T_HEAD,), np.int64)[T_PARTS]
    tab = carray(address(job[J_TABLE]), (T_HEAD + n_parts * PART_WORDS + 3 * job[J_CHUNKS],), np.int64)
    chunk = T_HEAD + n_parts * PART_WORDS + 3 * c
    return tab, T_HEAD + tab[chunk] * PART_WORDS, tab[chunk + 1], tab[chunk + 2]


@inlined
def project_part(job, tab, at, p0, p1):  # pragma: no cover - compiled
    """``gemv`` over panels p0 <= p < p1 of the part at ``tab[at]``, its arrays typed by its kind."""
    B, K, L = job[J_N], job[J_K], tab[at + P_BLOCK]
    nb, n_panels = tab[at + P_NB], tab[at + P_PANELS]
    x = carray(address(job[J_X]), (B, K), np.float32)
    out = carray(address(job[J_OUT]), (B, job[J_OUT_STRIDE]), np.float32)
    xs = carray(address(job[J_XS32] if L == 32 else job[J_XS16]), (B, K // L), np.float32)
    qh_n, m_n = tab[at + P_QH_N], tab[at + P_M_N]
    qh = carray(address(tab[at + P_QH]), (qh_n, nb if qh_n else 0, LANES), np.uint32)
    kind, offset, col, tile = tab[at + P_KIND], np.float32(tab[at + P_OFFSET]), tab[at + P_COL], job[J_TILE]
    m_shape = (m_n, nb if m_n else 0, LANES)
    if kind == 0:  # nibbles, float16 scales
        qs = carray(address(tab[at + P_QS]), (n_panels, nb, L // 2, LANES), np.uint8)
        d = carray(address(tab[at + P_D]), (n_panels, nb, LANES), np.uint16)
        m = carray(address(tab[at + P_M]), m_shape, np.uint16)
        gemv(x, xs, qs, qh, d, m, offset, out, col, p0, p1, tile)
    elif kind == 1:  # nibbles, float32 scales
        qs = carray(address(tab[at + P_QS]), (n_panels, nb, L // 2, LANES), np.uint8)
        d32 = carray(address(tab[at + P_D]), (n_panels, nb, LANES), np.float32)
        m32 = carray(address(tab[at + P_M]), m_shape, np.float32)
        gemv(x, xs, qs, qh, d32, m32, offset, out, col, p0, p1, tile)
    elif kind == 2:  # int8, float16 scales
        q8 = carray(address(tab[at + P_QS]), (n_panels, nb, L, LANES), np.int8)
        d = carray(address(tab[at + P_D]), (n_panels, nb, LANES), np.uint16)
        m = carray(address(tab[at + P_M]), m_shape, np.uint16)
        gemv(x, xs, q8, qh, d, m, offset, out, col, p0, p1, tile)
    else:  # int8, float32 scales
        q8 = carray(address(tab[at + P_QS]), (n_panels, nb, L, LANES), np.int8)
        d32 = carray(address(tab[at + P_D]), (n_panels, nb, LANES), np.float32)
        m32 = carray(address(tab[at + P_M]), m_shape, np.float32)
        gemv(x, xs, q8, qh, d32, m32, offset, out, col, p0, p1, tile)


@njit(boundscheck=False, cache=True, nogil=True, fastmath=True)
def _block_sums(x, L, out):  # pragma: no cover - compiled
    B, K = x.shape
    for b in range(B):
        for k in range(K // L):
            s = np.float32(0.0)
            for j in range(L):
                s += x[b, k * L + j]
            out[b, k] = s


@inlined
def block_sums(x, sums32, sums16):  # pragma: no cover - compiled
    """(Σ x per 32-value block, per 16-value block) of x's rows, each empty unless asked for."""
    B, K = x.shape
    xs32 = np.empty((B, K // 32 if sums32 else 0), dtype=np.float32)
    xs16 = np.empty((B, K // 16 if sums16 else 0), dtype=np.float32)
    if sums32:
        _block_sums(x, 32, xs32)
    if sums16:
        _block_sums(x, 16, xs16)
    return xs32, xs16


@inlined
def fill_job(job, tab, x, out, xs32, xs16, tile, chunk_fn):  # pragma: no cover - compiled
    """A projection job's words (``J_*``) for the matrix whose table is ``tab``."""
    job[J_FUNC], job[J_CHUNKS] = chunk_fn, tab[T_CHUNKS]
    job[J_N], job[J_K], job[J_X], job[J_OUT] = x.shape[0], x.shape[1], x.ctypes.data, out.ctypes.data
    job[J_OUT_STRIDE], job[J_XS32], job[J_XS16] = out.shape[1], xs32.ctypes.data, xs16.ctypes.data
    job[J_TABLE], job[J_TILE] = tab.ctypes.data, tile


@kernel
def project(ctrl, job, tab, x, out, tile, sums32, sums16, chunk_fn):  # pragma: no cover - compiled
    """out = x @ W.T for the matrix whose ``table`` is ``tab``, as a pool job (``pool().run``).
    ``sums32``/``sums16``: whether parts with 32-/16-value blocks exist (their Σ x are computed
    here, once); ``chunk_fn``: ``project_chunk()``."""
    xs32, xs16 = block_sums(x, sums32, sums16)
    fill_job(job, tab, x, out, xs32, xs16, tile, chunk_fn)
    dispatch(ctrl, job)
    keep_alive(xs32)  # the workers read them through the job's words: not freed before this
    keep_alive(xs16)
