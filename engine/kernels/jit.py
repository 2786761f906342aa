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
from numba import njit, prange

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
