"""numba kernels over ``BlockWeight`` matrices (int8 values, a float32 scale per 32 values).

``matvec`` serves decode-sized steps: each weight row is read once from memory and multiplied into
up to 8 activation rows at a time, so a step of 8 sequences streams the weights once, not 8 times
(OpenBLAS packs the whole weight for every call of 2 rows or more). The inner loop runs over a whole
row with the block's scale gathered per value (``d[o, j >> 5]``): that is the form LLVM turns into
wide SIMD here (measured 19 G weights/s on one core, against ~1.5 for a loop per 32-value block with
a reduction per block). The shift must be a constant in the loop (a variable one, for Q6_K's 16-value
blocks, made the same loop scalar: 2.7 G weights/s), so each kernel has one loop per block size. Each
activation row keeps its own accumulator (``a0`` .. ``a7``); a kernel
per group width (1, 2, 4, 8) keeps them in registers.

The "_1" types' minimum is applied as ``sum_k m[o, k] * xsum[b, k]`` with the per-block sums of x
computed once per call (llama.cpp's factoring of ``vec_dot_q4_1``).

``dequantize_rows`` serves prefill: a tile of rows is expanded to float32 and BLAS does the GEMM
(each of the engine's threads expands and multiplies its own tiles).

Compiled code is cached on disk (``NUMBA_CACHE_DIR``, set by ``engine.kernels`` to the app's cache
directory), so only the first start pays the compile.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Reassociation lets LLVM vectorize the sums; the result differs from a sequential float32 sum only
# in summation order (held to the float32 reference by the tests).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
kernel = njit(fastmath=FASTMATH, boundscheck=False, parallel=True, cache=True, nogil=True)
serial_kernel = njit(fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)


@serial_kernel
def block_shift(K, n_blocks):  # pragma: no cover - compiled
    """log2 of the values per scale: 5 for 32-value blocks, 4 for Q6_K's 16-value ones."""
    return 4 if n_blocks * 16 == K else 5


@kernel
def matvec_1(x, xs, q, d, m, out):  # pragma: no cover - compiled
    """out[0, o] = sum_j x[0, j] W[o, j]. x (1, K) f32; xs (1, nb); q (O, K) i8; d, m (O, nb)."""
    O, K = q.shape
    nm = m.shape[1]
    sh = block_shift(K, d.shape[1])
    for o in prange(O):
        a0 = np.float32(0.0)
        if sh == 5:  # constant shifts: LLVM vectorizes the scale gather only for a constant
            for j in range(K):
                a0 += x[0, j] * (np.float32(q[o, j]) * d[o, j >> 5])
        else:
            for j in range(K):
                a0 += x[0, j] * (np.float32(q[o, j]) * d[o, j >> 4])
        for k in range(nm):
            a0 += m[o, k] * xs[0, k]
        out[0, o] = a0


@kernel
def matvec_2(x, xs, q, d, m, out):  # pragma: no cover - compiled
    """Rows of x two at a time (B even)."""
    O, K = q.shape
    B = x.shape[0]
    nm = m.shape[1]
    sh = block_shift(K, d.shape[1])
    for o in prange(O):
        for g in range(0, B, 2):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            if sh == 5:  # constant shifts: LLVM vectorizes the scale gather only for a constant
                for j in range(K):
                    w = np.float32(q[o, j]) * d[o, j >> 5]
                    a0 += x[g, j] * w
                    a1 += x[g + 1, j] * w
            else:
                for j in range(K):
                    w = np.float32(q[o, j]) * d[o, j >> 4]
                    a0 += x[g, j] * w
                    a1 += x[g + 1, j] * w
            for k in range(nm):
                a0 += m[o, k] * xs[g, k]
                a1 += m[o, k] * xs[g + 1, k]
            out[g, o] = a0
            out[g + 1, o] = a1


@kernel
def matvec_4(x, xs, q, d, m, out):  # pragma: no cover - compiled
    """Rows of x four at a time (B a multiple of 4)."""
    O, K = q.shape
    B = x.shape[0]
    nm = m.shape[1]
    sh = block_shift(K, d.shape[1])
    for o in prange(O):
        for g in range(0, B, 4):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            if sh == 5:  # constant shifts: LLVM vectorizes the scale gather only for a constant
                for j in range(K):
                    w = np.float32(q[o, j]) * d[o, j >> 5]
                    a0 += x[g, j] * w
                    a1 += x[g + 1, j] * w
                    a2 += x[g + 2, j] * w
                    a3 += x[g + 3, j] * w
            else:
                for j in range(K):
                    w = np.float32(q[o, j]) * d[o, j >> 4]
                    a0 += x[g, j] * w
                    a1 += x[g + 1, j] * w
                    a2 += x[g + 2, j] * w
                    a3 += x[g + 3, j] * w
            for k in range(nm):
                mk = m[o, k]
                a0 += mk * xs[g, k]
                a1 += mk * xs[g + 1, k]
                a2 += mk * xs[g + 2, k]
                a3 += mk * xs[g + 3, k]
            out[g, o] = a0
            out[g + 1, o] = a1
            out[g + 2, o] = a2
            out[g + 3, o] = a3


@kernel
def matvec_8(x, xs, q, d, m, out):  # pragma: no cover - compiled
    """Rows of x eight at a time (B a multiple of 8)."""
    O, K = q.shape
    B = x.shape[0]
    nm = m.shape[1]
    sh = block_shift(K, d.shape[1])
    for o in prange(O):
        for g in range(0, B, 8):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            a4 = np.float32(0.0)
            a5 = np.float32(0.0)
            a6 = np.float32(0.0)
            a7 = np.float32(0.0)
            if sh == 5:  # constant shifts: LLVM vectorizes the scale gather only for a constant
                for j in range(K):
                    w = np.float32(q[o, j]) * d[o, j >> 5]
                    a0 += x[g, j] * w
                    a1 += x[g + 1, j] * w
                    a2 += x[g + 2, j] * w
                    a3 += x[g + 3, j] * w
                    a4 += x[g + 4, j] * w
                    a5 += x[g + 5, j] * w
                    a6 += x[g + 6, j] * w
                    a7 += x[g + 7, j] * w
            else:
                for j in range(K):
                    w = np.float32(q[o, j]) * d[o, j >> 4]
                    a0 += x[g, j] * w
                    a1 += x[g + 1, j] * w
                    a2 += x[g + 2, j] * w
                    a3 += x[g + 3, j] * w
                    a4 += x[g + 4, j] * w
                    a5 += x[g + 5, j] * w
                    a6 += x[g + 6, j] * w
                    a7 += x[g + 7, j] * w
            for k in range(nm):
                mk = m[o, k]
                a0 += mk * xs[g, k]
                a1 += mk * xs[g + 1, k]
                a2 += mk * xs[g + 2, k]
                a3 += mk * xs[g + 3, k]
                a4 += mk * xs[g + 4, k]
                a5 += mk * xs[g + 5, k]
                a6 += mk * xs[g + 6, k]
                a7 += mk * xs[g + 7, k]
            out[g, o] = a0
            out[g + 1, o] = a1
            out[g + 2, o] = a2
            out[g + 3, o] = a3
            out[g + 4, o] = a4
            out[g + 5, o] = a5
            out[g + 6, o] = a6
            out[g + 7, o] = a7


@serial_kernel
def dequantize_rows(q, d, m, row0, out):  # pragma: no cover - compiled
    """out[r] = W[row0 + r] as float32. q (O, K) i8; d, m (O, nb); out (R, K). One thread: callers
    run one tile per thread."""
    R, K = out.shape
    nm = m.shape[1]
    sh = block_shift(K, d.shape[1])
    for r in range(R):
        o = row0 + r
        if nm:
            if sh == 5:  # constant shifts: LLVM vectorizes the scale gather only for a constant
                for j in range(K):
                    out[r, j] = np.float32(q[o, j]) * d[o, j >> 5] + m[o, j >> 5]
            else:
                for j in range(K):
                    out[r, j] = np.float32(q[o, j]) * d[o, j >> 4] + m[o, j >> 4]
        else:
            if sh == 5:  # constant shifts: LLVM vectorizes the scale gather only for a constant
                for j in range(K):
                    out[r, j] = np.float32(q[o, j]) * d[o, j >> 5]
            else:
                for j in range(K):
                    out[r, j] = np.float32(q[o, j]) * d[o, j >> 4]


MATVEC = {1: matvec_1, 2: matvec_2, 4: matvec_4, 8: matvec_8}


# ---------------------------------------------------------------------------------------------
# Decode attention: one new token against its whole cache, read once, float16 read as it is stored
# ---------------------------------------------------------------------------------------------
@intrinsic
def _f32_from_bits(typingctx, bits):  # pragma: no cover - compiled
    """Reinterpret a uint32's bits as a float32 (LLVM bitcast; numba has no scalar view)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@serial_kernel
def _half(h):  # pragma: no cover - compiled
    """float16 bits -> float32, exact for every finite value (subnormals included): the exponent and
    mantissa shifted into float32's places and rescaled by 2**112, then the sign."""
    bits = np.uint32(h)
    magnitude = _f32_from_bits((bits & np.uint32(0x7FFF)) << np.uint32(13)) * np.float32(5.192296858534828e33)  # type: ignore[call-arg]
    return -magnitude if bits & np.uint32(0x8000) else magnitude


def load_row(cache, h, s, out):  # pragma: no cover - replaced by the overload below when compiled
    """out[:] = cache[h, s, :] as float32."""
    raise NotImplementedError


@overload(load_row)
def _load_row(cache, h, s, out):  # pragma: no cover - compiled
    """A float32 cache row is copied; a float16 one (viewed as uint16) converted as it is read."""
    if cache.dtype == types.uint16:

        def from_half(cache, h, s, out):
            for i in range(out.shape[0]):
                out[i] = _half(cache[h, s, i])

        return from_half

    def copy(cache, h, s, out):
        for i in range(out.shape[0]):
            out[i] = cache[h, s, i]

    return copy


@kernel
def decode_attention(q, keys, values, n, out):  # pragma: no cover - compiled
    """Attention of one new token: q (H, Hd) pre-scaled; keys, values (KVH, cap, Hd), float32 or a
    float16 cache viewed as uint16, with n positions filled; out (H, Hd). Each key and value row is
    read once for the G query heads that share it; KV heads run in parallel."""
    H, Hd = q.shape
    KVH = keys.shape[0]
    G = H // KVH
    for h in prange(KVH):
        scores = np.empty((G, n), dtype=np.float32)
        row = np.empty(Hd, dtype=np.float32)
        for s in range(n):
            load_row(keys, h, s, row)
            for g in range(G):
                acc = np.float32(0.0)
                for i in range(Hd):
                    acc += q[h * G + g, i] * row[i]
                scores[g, s] = acc
        for g in range(G):
            top = np.float32(-np.inf)
            for s in range(n):
                top = max(top, scores[g, s])
            total = np.float32(0.0)
            for s in range(n):
                e = np.exp(scores[g, s] - top)
                scores[g, s] = e
                total += e
            inv = np.float32(1.0) / total
            for s in range(n):
                scores[g, s] *= inv
            for i in range(Hd):
                out[h * G + g, i] = 0.0
        for s in range(n):
            load_row(values, h, s, row)
            for g in range(G):
                p = scores[g, s]
                for i in range(Hd):
                    out[h * G + g, i] += p * row[i]
