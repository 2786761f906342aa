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

import numpy as np
from numba import njit, types
from numba.extending import overload

from .simd import fma, load, load_ints, load_scales, store, to_float, zeros

LANES = 16
# Reassociation lets LLVM reorder the sums; results differ from a sequential float32 sum only in
# summation order (held to the float32 reference by the tests).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
kernel = njit(fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)


def values_per_byte(qs):  # pragma: no cover - replaced by the overload below when compiled
    """2 for nibbles (uint8 ``qs``), 1 for int8 values: a constant of the compiled code."""
    raise NotImplementedError


@overload(values_per_byte)
def _values_per_byte(qs):  # pragma: no cover - compiled
    n = 1 if qs.dtype == types.int8 else 2
    return lambda qs: n


@kernel
def block_length(qs):  # pragma: no cover - compiled
    """Values per block."""
    return qs.shape[2] * values_per_byte(qs)


@kernel
def unpack_block(qs, qh, base, L, qf):  # pragma: no cover - compiled
    """The block ``base`` (= panel * blocks + block) as float32 raw values (no scale, no offset):
    ``qf[j * 16 + lane]`` for j < L."""
    if values_per_byte(qs) == 1:
        row = base * L * LANES
        for j in range(L):
            store(qf, j * LANES, to_float(load_ints(qs, row + j * LANES)))
        return
    half = L // 2
    row = base * half * LANES
    if qh.shape[0] == 0:
        for j in range(half):
            v = load_ints(qs, row + j * LANES)
            store(qf, j * LANES, to_float(v & 15))
            store(qf, (j + half) * LANES, to_float(v >> 4))
        return
    bits = 32 // L  # high bits per value: 1 (Q5, 32-value blocks), 2 (Q6_K, 16-value blocks)
    mask = (1 << bits) - 1
    h = load_ints(qh, base * LANES)
    for j in range(half):
        v = load_ints(qs, row + j * LANES)
        low = (v & 15) | (((h >> (bits * j)) & mask) << 4)
        high = (v >> 4) | (((h >> (bits * (j + half))) & mask) << 4)
        store(qf, j * LANES, to_float(low))
        store(qf, (j + half) * LANES, to_float(high))


@kernel
def block_scales(d, m, offset, base):  # pragma: no cover - compiled
    """(scale, minimum + offset * scale) of block ``base``, 16 lanes each."""
    dv = load_scales(d, base * LANES)
    mv = dv * np.float32(offset)
    if m.shape[0] != 0:
        mv = mv + load_scales(m, base * LANES)
    return dv, mv


@kernel
def _finish(tot, r, a, dv, mv, xsum):  # pragma: no cover - compiled
    """tot[r] += d * Σ x·q + (m + offset·d) * Σ x"""
    t = load(tot, r * LANES)
    store(tot, r * LANES, fma(mv, xsum, fma(dv, a, t)))


@kernel
def rows_8(x, xs, qf, L, k, r, dv, mv, tot):  # pragma: no cover - compiled
    """Activation rows r .. r+7 against one block: one weight vector load feeds eight FMAs."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    c0 = k * L
    for j in range(L):
        w = load(qf, j * LANES)
        c = c0 + j
        a0 = fma(x[r, c], w, a0)
        a1 = fma(x[r + 1, c], w, a1)
        a2 = fma(x[r + 2, c], w, a2)
        a3 = fma(x[r + 3, c], w, a3)
        a4 = fma(x[r + 4, c], w, a4)
        a5 = fma(x[r + 5, c], w, a5)
        a6 = fma(x[r + 6, c], w, a6)
        a7 = fma(x[r + 7, c], w, a7)
    _finish(tot, r, a0, dv, mv, xs[r, k])
    _finish(tot, r + 1, a1, dv, mv, xs[r + 1, k])
    _finish(tot, r + 2, a2, dv, mv, xs[r + 2, k])
    _finish(tot, r + 3, a3, dv, mv, xs[r + 3, k])
    _finish(tot, r + 4, a4, dv, mv, xs[r + 4, k])
    _finish(tot, r + 5, a5, dv, mv, xs[r + 5, k])
    _finish(tot, r + 6, a6, dv, mv, xs[r + 6, k])
    _finish(tot, r + 7, a7, dv, mv, xs[r + 7, k])


@kernel
def rows_4(x, xs, qf, L, k, r, dv, mv, tot):  # pragma: no cover - compiled
    """Activation rows r .. r+3 (two accumulators each: FMA latency is 4 cycles)."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    b0, b1, b2, b3 = zeros(), zeros(), zeros(), zeros()
    c0 = k * L
    for j in range(0, L, 2):
        w = load(qf, j * LANES)
        v = load(qf, (j + 1) * LANES)
        c = c0 + j
        a0 = fma(x[r, c], w, a0)
        a1 = fma(x[r + 1, c], w, a1)
        a2 = fma(x[r + 2, c], w, a2)
        a3 = fma(x[r + 3, c], w, a3)
        b0 = fma(x[r, c + 1], v, b0)
        b1 = fma(x[r + 1, c + 1], v, b1)
        b2 = fma(x[r + 2, c + 1], v, b2)
        b3 = fma(x[r + 3, c + 1], v, b3)
    _finish(tot, r, a0 + b0, dv, mv, xs[r, k])
    _finish(tot, r + 1, a1 + b1, dv, mv, xs[r + 1, k])
    _finish(tot, r + 2, a2 + b2, dv, mv, xs[r + 2, k])
    _finish(tot, r + 3, a3 + b3, dv, mv, xs[r + 3, k])


@kernel
def rows_1(x, xs, qf, L, k, r, dv, mv, tot):  # pragma: no cover - compiled
    """One activation row (four accumulators)."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    c0 = k * L
    for j in range(0, L, 4):
        c = c0 + j
        a0 = fma(x[r, c], load(qf, j * LANES), a0)
        a1 = fma(x[r, c + 1], load(qf, (j + 1) * LANES), a1)
        a2 = fma(x[r, c + 2], load(qf, (j + 2) * LANES), a2)
        a3 = fma(x[r, c + 3], load(qf, (j + 3) * LANES), a3)
    _finish(tot, r, (a0 + a1) + (a2 + a3), dv, mv, xs[r, k])


@kernel
def gemv(x, xs, qs, qh, d, m, offset, out, col0, p0, p1, max_tile):  # pragma: no cover - compiled
    """out[:, col0 + 16p : col0 + 16p + 16] = x @ W[panel p].T for panels p0 <= p < p1.

    x (B, K) float32, B <= 16 best (any B works); xs (B, K / L): x's per-block sums; out (B, n)
    float32, C-contiguous; ``max_tile`` 8 or 4: activation rows per register tile (8 needs 32 vector
    registers: AVX-512)."""
    B = x.shape[0]
    n_out = out.shape[1]
    nb = qs.shape[1]
    L = block_length(qs)
    qf = np.empty(L * LANES, dtype=np.float32)  # one block's values, widened once for every row
    tot = np.empty(B * LANES, dtype=np.float32)
    for p in range(p0, p1):
        for r in range(B):
            store(tot, r * LANES, zeros())
        for k in range(nb):
            base = p * nb + k
            unpack_block(qs, qh, base, L, qf)
            dv, mv = block_scales(d, m, offset, base)
            r = 0
            if max_tile >= 8:
                while r + 8 <= B:
                    rows_8(x, xs, qf, L, k, r, dv, mv, tot)
                    r += 8
            while r + 4 <= B:
                rows_4(x, xs, qf, L, k, r, dv, mv, tot)
                r += 4
            while r < B:
                rows_1(x, xs, qf, L, k, r, dv, mv, tot)
                r += 1
        for r in range(B):
            store(out, r * n_out + col0 + p * LANES, load(tot, r * LANES))


@kernel
def dequantize(qs, qh, d, m, offset, p0, p1, out):  # pragma: no cover - compiled
    """Panels p0 <= p < p1 as float32 in (in, out) order: out[c, 16 (p - p0) + lane], out (K, n)
    C-contiguous with n >= 16 (p1 - p0): the weights of ``x @ out`` for BLAS."""
    n = out.shape[1]
    nb = qs.shape[1]
    L = block_length(qs)
    qf = np.empty(L * LANES, dtype=np.float32)
    for p in range(p0, p1):
        col = (p - p0) * LANES
        for k in range(nb):
            base = p * nb + k
            unpack_block(qs, qh, base, L, qf)
            dv, mv = block_scales(d, m, offset, base)
            for j in range(L):
                store(out, (k * L + j) * n + col, fma(dv, load(qf, j * LANES), mv))


@kernel
def gather_rows(qs, qh, d, m, offset, rows, out):  # pragma: no cover - compiled
    """out[i] = W[rows[i]] as float32 (an embedding lookup). out (len(rows), K)."""
    nb = qs.shape[1]
    L = block_length(qs)
    qf = np.empty(L * LANES, dtype=np.float32)
    w = np.empty(LANES, dtype=np.float32)
    for i in range(rows.shape[0]):
        p, lane = rows[i] // LANES, rows[i] % LANES
        for k in range(nb):
            base = p * nb + k
            unpack_block(qs, qh, base, L, qf)
            dv, mv = block_scales(d, m, offset, base)
            for j in range(L):
                store(w, 0, fma(dv, load(qf, j * LANES), mv))
                out[i, k * L + j] = w[lane]
