"""8-bit activations (an opt-in mode): the projections of 4-bit weights as integer dot products with
AVX-512 VNNI, as llama.cpp computes them.

The default path keeps activations float32 (greedy output equal to the float32 reference). This
mode quantizes each activation row per block of 32 values to int8 with one float32 scale (ggml's
``q8_0``/``q8_1``: ``d = max|x| / 127``, ``q = round(x / d)``), and multiplies the weights' 4-bit
codes by them with ``vpdpbusd`` (64 unsigned x signed byte products summed into 16 int32 lanes per
instruction, four times the multiply-adds of a float32 FMA): per block ``Σ W x ≈ d_w d_x Σ q_w q_x
+ (m_w + offset d_w) Σ x``, with ``Σ x`` from the float32 activations. Its error against the float32
reference is what ``benchmarks/bench_vs_llamacpp.py --activations int8`` reports.

Weights stay in their panels (``quant.py``'s layout, byte j of lane r holding row r's values j and
j + 16 of a block): 64 bytes hold values j .. j+3 of 16 rows, ``[j][row]``; one byte shuffle
(``vpermb``) turns them into ``[row][j]``, the four bytes of each row's int32 lane that ``vpdpbusd``
sums, and a mask or a shift picks the low (j) or high (j + 16) nibbles. Each activation word (four
int8 values) is broadcast to the 16 lanes. Types: 4-bit codes without high bits (Q4_0, Q4_1, Q4_K);
other matrices keep the float32 kernel.

Needs AVX-512 VNNI and VBMI (Intel Ice Lake and later, AMD Zen 4 and later): ``available()``; elsewhere
the mode falls back to float32 activations.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import carray, cfunc, types

from .pool import CHUNK_SIGNATURE, JOB_WORDS, address, dispatch
from .quant import (
    J_K,
    J_N,
    J_OUT,
    J_OUT_STRIDE,
    J_TILE,
    J_XS32,
    LANES,
    P_BLOCK,
    P_COL,
    P_D,
    P_KIND,
    P_M,
    P_M_N,
    P_NB,
    P_OFFSET,
    P_PANELS,
    P_QH_N,
    P_QS,
    PREFETCH_BLOCKS,
    block_scales,
    block_sums,
    chunk_part,
    fill_job,
    inlined,
    kernel,
    prefetch_block,
    project_part,
)  # fmt: skip
from .simd import (
    _I,
    I32Vector,
    _intrinsic,
    _pointer,
    fma,
    i32v,
    int_zeros,
    item,
    keep_alive,
    pointer,
    store,
    to_float,
    zeros,
)

_B64 = ir.VectorType(ir.IntType(8), 64)
# [j][row] (4 x 16 bytes) -> [row][j]: byte 4 r + j of the result is byte 16 j + r of the source
_TRANSPOSE = [16 * (i % 4) + i // 4 for i in range(64)]


@functools.cache
def available() -> bool:
    """Whether this CPU (as numba compiles for it) has the instructions: AVX-512 VNNI and VBMI."""
    from numba.core import config

    features = getattr(config, "CPU_FEATURES", None)  # set by numba at run time; tests may name others
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    names = set(features.split(","))
    return {"+avx512vnni", "+avx512vbmi", "+avx512bw"} <= names


@_intrinsic
def load_words(typingctx: Any, array: Any, offset: Any) -> Any:
    """64 bytes of ``array`` (uint8 or int8) from ``offset`` as 16 int32 lanes (their bits)."""
    if not (isinstance(array, (types.Array, types.CPointer)) and array.dtype in (types.uint8, types.int8)):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        v = builder.load(_pointer(context, builder, sig, args, ir.IntType(8), 64), align=1)
        return builder.bitcast(v, _I)

    return i32v(array, offset), codegen


@_intrinsic
def transpose_bytes(typingctx: Any, value: Any) -> Any:
    """A 4 x 16 byte matrix [j][row] as 16 x 4 [row][j] (``vpermb`` with AVX-512 VBMI)."""
    if not isinstance(value, I32Vector):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        b = builder.bitcast(args[0], _B64)
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 64), _TRANSPOSE)
        return builder.bitcast(builder.shuffle_vector(b, ir.Constant(_B64, ir.Undefined), mask), _I)

    return i32v(value), codegen


@_intrinsic
def dot_bytes(typingctx: Any, acc: Any, unsigned: Any, signed: Any) -> Any:
    """``acc`` + in each int32 lane the sum of its four unsigned x signed byte products
    (``vpdpbusd``)."""
    if not all(isinstance(a, I32Vector) for a in (acc, unsigned, signed)):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic(
            "llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(_I, [_I] * 3)
        )
        return builder.call(fn, list(args))

    return i32v(acc, unsigned, signed), codegen


@_intrinsic
def splat_word(typingctx: Any, array: Any, offset: Any) -> Any:
    """The four bytes of ``array`` (int8) at ``offset`` as one int32, in all 16 lanes."""
    if not (isinstance(array, (types.Array, types.CPointer)) and array.dtype == types.int8):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        word = builder.load(_pointer(context, builder, sig, args, ir.IntType(8), 4), align=1)
        value = builder.bitcast(word, ir.IntType(32))
        undef = ir.Constant(_I, ir.Undefined)
        one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(
            one, undef, ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        )

    return i32v(array, offset), codegen


# ---------------------------------------------------------------------------------------------
# The kernel: rows of int8 activations against panels of 4-bit codes
# ---------------------------------------------------------------------------------------------
LOW = 0x0F0F0F0F


@inlined
def _codes(qs, row, j):  # pragma: no cover - compiled
    """Values j .. j+3 (low nibbles) and j+16 .. j+19 (high) of a block's 16 rows, four bytes a lane."""
    w = transpose_bytes(load_words(qs, row + j * LANES))
    return w & LOW, (w >> 4) & LOW


@inlined
def int8_rows_1(qs, d, m, has_m, offset, nb, p, xq, dx, xs, K, r, out, col):  # pragma: no cover - compiled
    """Activation row r against panel p: 16 outputs at ``out[col:]``."""
    t = zeros()
    for k in range(nb):
        base = p * nb + k
        prefetch_block(qs, base + PREFETCH_BLOCKS, 32)
        row, c = base * 16 * LANES, r * K + k * 32
        a = int_zeros()
        for j in range(0, 16, 4):
            low, high = _codes(qs, row, j)
            a = dot_bytes(dot_bytes(a, low, splat_word(xq, c + j)), high, splat_word(xq, c + 16 + j))
        dv, mv = block_scales(d, m, has_m, offset, base)
        s = r * nb + k
        t = fma(dv * item(dx, s), to_float(a), fma(mv, item(xs, s), t))
    store(out, col, t)


@inlined
def int8_rows_8(qs, d, m, has_m, offset, nb, p, xq, dx, xs, K, r, out, col, n_out):  # pragma: no cover
    """Activation rows r .. r+7 against panel p: each byte shuffle feeds sixteen ``vpdpbusd``."""
    t0, t1, t2, t3, t4, t5, t6, t7 = zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
    for k in range(nb):
        base = p * nb + k
        prefetch_block(qs, base + PREFETCH_BLOCKS, 32)
        row, c = base * 16 * LANES, r * K + k * 32
        a0, a1, a2, a3 = int_zeros(), int_zeros(), int_zeros(), int_zeros()
        a4, a5, a6, a7 = int_zeros(), int_zeros(), int_zeros(), int_zeros()
        for j in range(0, 16, 4):
            low, high = _codes(qs, row, j)
            a0 = dot_bytes(dot_bytes(a0, low, splat_word(xq, c + j)), high, splat_word(xq, c + 16 + j))
            a1 = dot_bytes(
                dot_bytes(a1, low, splat_word(xq, c + K + j)), high, splat_word(xq, c + K + 16 + j)
            )
            c2, c3 = c + 2 * K, c + 3 * K
            a2 = dot_bytes(dot_bytes(a2, low, splat_word(xq, c2 + j)), high, splat_word(xq, c2 + 16 + j))
            a3 = dot_bytes(dot_bytes(a3, low, splat_word(xq, c3 + j)), high, splat_word(xq, c3 + 16 + j))
            c4, c5, c6, c7 = c + 4 * K, c + 5 * K, c + 6 * K, c + 7 * K
            a4 = dot_bytes(dot_bytes(a4, low, splat_word(xq, c4 + j)), high, splat_word(xq, c4 + 16 + j))
            a5 = dot_bytes(dot_bytes(a5, low, splat_word(xq, c5 + j)), high, splat_word(xq, c5 + 16 + j))
            a6 = dot_bytes(dot_bytes(a6, low, splat_word(xq, c6 + j)), high, splat_word(xq, c6 + 16 + j))
            a7 = dot_bytes(dot_bytes(a7, low, splat_word(xq, c7 + j)), high, splat_word(xq, c7 + 16 + j))
        dv, mv = block_scales(d, m, has_m, offset, base)
        s = r * nb + k
        t0 = fma(dv * item(dx, s), to_float(a0), fma(mv, item(xs, s), t0))
        t1 = fma(dv * item(dx, s + nb), to_float(a1), fma(mv, item(xs, s + nb), t1))
        t2 = fma(dv * item(dx, s + 2 * nb), to_float(a2), fma(mv, item(xs, s + 2 * nb), t2))
        t3 = fma(dv * item(dx, s + 3 * nb), to_float(a3), fma(mv, item(xs, s + 3 * nb), t3))
        t4 = fma(dv * item(dx, s + 4 * nb), to_float(a4), fma(mv, item(xs, s + 4 * nb), t4))
        t5 = fma(dv * item(dx, s + 5 * nb), to_float(a5), fma(mv, item(xs, s + 5 * nb), t5))
        t6 = fma(dv * item(dx, s + 6 * nb), to_float(a6), fma(mv, item(xs, s + 6 * nb), t6))
        t7 = fma(dv * item(dx, s + 7 * nb), to_float(a7), fma(mv, item(xs, s + 7 * nb), t7))
    store(out, col, t0)
    store(out, col + n_out, t1)
    store(out, col + 2 * n_out, t2)
    store(out, col + 3 * n_out, t3)
    store(out, col + 4 * n_out, t4)
    store(out, col + 5 * n_out, t5)
    store(out, col + 6 * n_out, t6)
    store(out, col + 7 * n_out, t7)


@kernel
def gemv_int8(xq, dx, xs, qs, d, m, offset, out, col0, p0, p1):  # pragma: no cover - compiled
    """out[:, col0 + 16p : col0 + 16p + 16] = x @ W[panel p].T for panels p0 <= p < p1, with x given
    as int8 ``xq`` (B, K) times its per-32-value scales ``dx`` (B, K/32) and ``xs`` = Σ x per block;
    W's blocks 32 4-bit codes with no high bits (``qs`` (P, nb, 16, 16) uint8)."""
    B, K = xq.shape
    n_out, nb = out.shape[1], qs.shape[1]
    has_m = m.shape[0] != 0
    qsp, dp, mp, xqp, dxp, xsp, outp = (
        pointer(qs),
        pointer(d),
        pointer(m),
        pointer(xq),
        pointer(dx),
        pointer(xs),
        pointer(out),
    )
    for p in range(p0, p1):
        col = col0 + p * LANES
        r = 0
        while r + 8 <= B:
            int8_rows_8(qsp, dp, mp, has_m, offset, nb, p, xqp, dxp, xsp, K, r, outp, r * n_out + col, n_out)
            r += 8
        while r < B:
            int8_rows_1(qsp, dp, mp, has_m, offset, nb, p, xqp, dxp, xsp, K, r, outp, r * n_out + col)
            r += 1


@kernel
def quantize_rows(x, xq, dx):  # pragma: no cover - compiled
    """x (B, K) float32 -> xq (B, K) int8 and dx (B, K/32): per block of 32, d = max|x| / 127 and
    q = round(x / d) (0 where the block is all zeros)."""
    B, K = x.shape
    for b in range(B):
        for k in range(K // 32):
            top = np.float32(0.0)
            for j in range(32):
                top = max(top, abs(x[b, k * 32 + j]))
            d = top / np.float32(127.0)
            inv = np.float32(127.0) / top if top > 0 else np.float32(0.0)
            for j in range(32):
                xq[b, k * 32 + j] = np.int8(np.rint(x[b, k * 32 + j] * inv))
            dx[b, k] = d


# ---------------------------------------------------------------------------------------------
# Projections as pool jobs, as ``quant.project``, with the activations quantized once per call
# ---------------------------------------------------------------------------------------------
J_XQ, J_DX = J_TILE + 1, J_TILE + 2


@functools.cache
def project_chunk() -> int:
    """The address of ``_project_chunk`` compiled as the pool's chunk function (at its first use)."""
    compiled: Any = cfunc(CHUNK_SIGNATURE, cache=True)(_project_chunk)
    return int(compiled.address)


def _project_chunk(words, c):  # pragma: no cover - compiled
    """Chunk ``c`` of an int8 projection job: ``gemv_int8`` over parts of 4-bit codes without high
    bits in 32-value blocks, ``quant.gemv`` (float32 activations) over any other part."""
    job = carray(words, (JOB_WORDS,))
    tab, at, p0, p1 = chunk_part(job, c)
    kind = tab[at + P_KIND]
    if not (kind <= 1 and tab[at + P_QH_N] == 0 and tab[at + P_BLOCK] == 32):
        project_part(job, tab, at, p0, p1)
        return
    B, K, nb, n_panels = job[J_N], job[J_K], tab[at + P_NB], tab[at + P_PANELS]
    out = carray(address(job[J_OUT]), (B, job[J_OUT_STRIDE]), np.float32)
    xs = carray(address(job[J_XS32]), (B, K // 32), np.float32)
    xq = carray(address(job[J_XQ]), (B, K), np.int8)
    dx = carray(address(job[J_DX]), (B, K // 32), np.float32)
    qs = carray(address(tab[at + P_QS]), (n_panels, nb, 16, LANES), np.uint8)
    m_n, offset, col = tab[at + P_M_N], np.float32(tab[at + P_OFFSET]), tab[at + P_COL]
    m_shape = (m_n, nb if m_n else 0, LANES)
    if kind == 0:  # float16 scales
        d = carray(address(tab[at + P_D]), (n_panels, nb, LANES), np.uint16)
        m = carray(address(tab[at + P_M]), m_shape, np.uint16)
        gemv_int8(xq, dx, xs, qs, d, m, offset, out, col, p0, p1)
    else:
        d32 = carray(address(tab[at + P_D]), (n_panels, nb, LANES), np.float32)
        m32 = carray(address(tab[at + P_M]), m_shape, np.float32)
        gemv_int8(xq, dx, xs, qs, d32, m32, offset, out, col, p0, p1)


@kernel
def project(ctrl, job, tab, x, out, tile, sums32, sums16, chunk_fn):  # pragma: no cover - compiled
    """``quant.project`` with 8-bit activations for the parts that take them (``chunk_fn``:
    ``project_chunk()`` here): x quantized once per call (where K is a multiple of 32)."""
    B, K = x.shape
    n32 = K // 32 if K % 32 == 0 else 0
    xq = np.empty((B, K if n32 else 0), dtype=np.int8)
    dx = np.empty((B, n32), dtype=np.float32)
    if n32:
        quantize_rows(x, xq, dx)
    xs32, xs16 = block_sums(x, sums32, sums16)
    fill_job(job, tab, x, out, xs32, xs16, tile, chunk_fn)
    job[J_XQ], job[J_DX] = xq.ctypes.data, dx.ctypes.data
    dispatch(ctrl, job)
    keep_alive(xs32)  # the workers read them through the job's words: not freed before this
    keep_alive(xs16)
    keep_alive(xq)
    keep_alive(dx)
