"""numba kernels for attention (``decode_attention``); the projections' kernels are in ``quant.py``.

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
