"""A decode-sized step's transformer blocks in one compiled call (numba): no Python between the
projections.

A decode step of SmolLM2 runs 30 blocks; each block in Python (``Model._block``) is ~25 NumPy
calls and four ``linear()`` calls around its four projections: ~75 us of interpreter and dispatch
per block on the Intel Xeon, 2.3 ms a token where the projections take 5.7. Here the whole stack of
blocks is one numba function: the norms, bias, QK-norm, RoPE, the K/V writes, attention
(``attention.attend_serial``), the activation and the residual adds run in compiled loops, and each
projection is the same pool job ``linear()`` runs (``quant.project``), handed to the workers from
compiled code.

It covers the steps where that overhead matters and nothing else (``Model`` checks, else runs the
Python blocks): every matrix packed (``PackedWeight``), at most ``SMALL_ROWS`` rows, every sequence
in the attention plan with a float32 (or float16) cache. Attention runs on the calling thread when its work is
small, else as a pool job (``attention.attend_on_pool``), as the Python blocks run it. The math is
the Python blocks' (float32, the same order of operations up to fused multiply-adds): greedy output
is identical, logits within the reference bar.

``silu`` and GELU's tanh form are both ``g * sigmoid(z)`` (z = g, or 2 sqrt(2/pi) (g + 0.044715 g^3)
since 1 + tanh(y) = 2 sigmoid(2y)), with a vectorizable ``exp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic, overload

from . import SMALL_ROWS, _max_tile, projection, vnni
from .attention import (
    HAS_F16C,
    StepPlan,
    _pointer,
    attend_chunk,
    attend_on_pool,
    attend_serial,
    exp_nonpositive,
)
from .pool import address, pool
from .quant import FASTMATH, project
from .weights import PackedWeight

# numpy's error model: a float division is a division (Python's checks for zero and raises, a branch
# that keeps LLVM from vectorizing the loop around it: the activation ran 7x slower)
kernel = njit(fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True, error_model="numpy")
# inlined into their loops by numba (a call LLVM does not inline keeps a loop scalar)
inlined = njit(
    fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True, error_model="numpy", inline="always"
)
exp_inlined = inlined(exp_nonpositive.py_func)

# a matrix's row of ``Blocks.mats``: its kernel table's address and length, output columns written
# (whole panels), whether it has 32- and 16-value blocks
M_TABLE, M_LENGTH, M_PADDED, M_SUMS32, M_SUMS16 = range(5)
WQKV, WO, W_GATE_UP, W_DOWN = range(4)
# ``Blocks.norms``' rows per layer
ATTN_NORM, FFN_NORM, POST_ATTN_NORM, POST_FFN_NORM = range(4)
# ``Blocks.flags``
F_QK_NORM, F_POST_ATTN, F_POST_FFN, F_BIAS, F_GELU = range(5)
GELU_SCALE = np.float32(2.0 * np.sqrt(2.0 / np.pi))


@inlined
def sigmoid_times(g, z):  # pragma: no cover - compiled
    """g / (1 + exp(-z)), with exp of a non-positive argument only (no overflow), vectorizable."""
    e = exp_inlined(-abs(z))  # exp(-|z|)
    top = np.float32(1.0) if z >= 0 else e  # a select, not a branch: the loop stays vectorized
    return g * top / (np.float32(1.0) + e)


@kernel
def rms_norm_into(x, w, eps, out):  # pragma: no cover - compiled
    """out[r] = x[r] * w / sqrt(mean(x[r]^2) + eps) over the first len(w) columns of x."""
    D = w.shape[0]
    for r in range(x.shape[0]):
        s = np.float32(0.0)
        for i in range(D):
            s += x[r, i] * x[r, i]
        inv = np.float32(1.0) / np.sqrt(s / np.float32(D) + eps)
        for i in range(D):
            out[r, i] = x[r, i] * inv * w[i]


@inlined
def add_output(x, out, normed, norm, eps, scratch):  # pragma: no cover - compiled
    """x += out (its first D columns), RMS-normed by ``norm`` first when ``normed`` (Gemma 3's norms
    on the attention and MLP outputs); ``scratch`` (N, D) takes the normed rows."""
    if normed:
        rms_norm_into(out, norm, eps, scratch)
        out = scratch
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[r, i] += out[r, i]


@kernel
def rope_head(src, at, dst, norm, use_norm, eps, cos, sin, r):  # pragma: no cover - compiled
    """One head's Hd values at ``src[r, at:]``, RMS-normed by ``norm`` when asked, rotated (RoPE,
    rotate-half) by row r's angles, into ``dst`` (Hd,)."""
    Hd = dst.shape[0]
    half = Hd // 2
    inv = np.float32(1.0)
    if use_norm:
        s = np.float32(0.0)
        for i in range(Hd):
            s += src[r, at + i] * src[r, at + i]
        inv = np.float32(1.0) / np.sqrt(s / np.float32(Hd) + eps)
    for i in range(Hd):  # normed values first (the rotation reads each twice)
        dst[i] = src[r, at + i] * inv * (norm[i] if use_norm else np.float32(1.0))
    for i in range(half):  # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); sin holds [-sin, sin]
        a, b = dst[i], dst[i + half]
        dst[i] = a * cos[r, i] + b * sin[r, i]
        dst[i + half] = b * cos[r, i + half] + a * sin[r, i + half]


def project_8bit(ctrl, job, tab, x, out, tile, sums32, sums16, chunk_fn):  # pragma: no cover - compiled
    """``vnni.project`` where the CPU has VNNI; elsewhere (never called there) the float32 job, so
    that no instruction the CPU lacks is ever compiled."""
    raise NotImplementedError


@overload(project_8bit)
def _project_8bit(ctrl, job, tab, x, out, tile, sums32, sums16, chunk_fn):  # pragma: no cover - compiled
    chosen = vnni.project if vnni.available() else project
    return lambda ctrl, job, tab, x, out, tile, sums32, sums16, chunk_fn: chosen(
        ctrl, job, tab, x, out, tile, sums32, sums16, chunk_fn
    )


@intrinsic
def _half_bits(typingctx, value):  # pragma: no cover - compiled
    """float32 -> the bits of the nearest float16 (ties to even, as NumPy's ``astype``): LLVM's
    ``fptrunc``, one ``vcvtps2ph`` with F16C."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def stored(value, proto):  # pragma: no cover - replaced by the overload below when compiled
    """``value`` as a cache of ``proto``'s storage type holds it: float32 as is, float16 as its bits."""
    raise NotImplementedError


@overload(stored)
def _stored(value, proto):  # pragma: no cover - compiled
    if proto.dtype == types.uint16:
        return lambda value, proto: _half_bits(np.float32(value))  # type: ignore[call-arg]
    return lambda value, proto: value


@kernel
def _project(ctrl, job, mats, i, x, tile, chunk_fn, int8):  # pragma: no cover - compiled
    """x @ W.T for matrix ``i`` of ``mats``, as ``linear()`` runs it: (N, padded columns); ``int8``:
    with 8-bit activations (``vnni.project``, whose chunk function ``chunk_fn`` is then)."""
    tab = carray(address(mats[i, M_TABLE]), (mats[i, M_LENGTH],), np.int64)
    out = np.empty((x.shape[0], mats[i, M_PADDED]), dtype=np.float32)
    sums32, sums16 = mats[i, M_SUMS32] != 0, mats[i, M_SUMS16] != 0
    if int8:
        project_8bit(ctrl, job, tab, x, out, tile, sums32, sums16, chunk_fn)
    else:
        project(ctrl, job, tab, x, out, tile, sums32, sums16, chunk_fn)
    return out


@kernel
def run_blocks(  # pragma: no cover - compiled
    ctrl, job, x, mats, norms, qk_norms, biases, flags, shape, eps, windows,
    cos, sin, local_cos, local_sin, seqs, row_seq, items, n_splits, local_items, local_n_splits,
    proto, serial, tile, chunk_fn, attend_fn, int8,
):  # fmt: skip
    """Every block over x (N, D) float32; returns the last block's output (N, D).

    mats (layers * 4, 5): the four matrices of each layer (``M_*``); norms (layers, 4, D); qk_norms
    (layers, 2, Hd); biases (layers, (H + 2 KVH) Hd) or (layers, 0); flags (``F_*``); shape: H, KVH,
    Hd, F; windows (layers,): the sliding window, 0 on global layers, which use cos/sin (N, Hd)
    where local ones use local_cos/local_sin; seqs, items, n_splits: the attention plan's
    (``attention.StepPlan``) for window 0 and for the local window; row_seq (N, 2): each row's
    sequence and position; serial (2,): whether global and local layers attend on this thread alone,
    else as a pool job (``attend_fn``: ``attention.attend_chunk(dtype)``); int8: the projections
    with 8-bit activations (``kernels.activations()``)."""
    N, D = x.shape
    H, KVH, Hd, F = shape[0], shape[1], shape[2], shape[3]
    qk_norm, post_attn, post_ffn = flags[F_QK_NORM] != 0, flags[F_POST_ATTN] != 0, flags[F_POST_FFN] != 0
    has_bias, gelu = flags[F_BIAS] != 0, flags[F_GELU] != 0
    P = 1
    for b in range(n_splits.shape[0]):
        P = max(P, n_splits[b], local_n_splits[b])
    part_m = np.empty((P, N, H), dtype=np.float32)
    part_l = np.empty((P, N, H), dtype=np.float32)
    part_acc = np.empty((P, N, H, Hd), dtype=np.float32)
    h = np.empty((N, D), dtype=np.float32)
    q = np.empty((N, H, Hd), dtype=np.float32)
    attn = np.empty((N, H, Hd), dtype=np.float32)
    kv_row = np.empty(Hd, dtype=np.float32)
    act = np.empty((N, F), dtype=np.float32)
    x = x.copy()
    for layer in range(norms.shape[0]):
        window = windows[layer]
        c, s = (local_cos, local_sin) if window > 0 else (cos, sin)
        rms_norm_into(x, norms[layer, ATTN_NORM], eps, h)
        qkv = _project(ctrl, job, mats, 4 * layer + WQKV, h, tile, chunk_fn, int8)
        if has_bias:
            for r in range(N):
                for i in range(biases.shape[1]):
                    qkv[r, i] += biases[layer, i]
        for r in range(N):
            for head in range(H):
                rope_head(qkv, head * Hd, q[r, head], qk_norms[layer, 0], qk_norm, eps, c, s, r)
            b, pos = row_seq[r, 0], row_seq[r, 1]
            base = seqs[b, 0] + layer * seqs[b, 1]
            keys = carray(_pointer(base, proto), (KVH, seqs[b, 3], Hd))  # type: ignore[call-arg]
            values = carray(_pointer(base + seqs[b, 2], proto), (KVH, seqs[b, 3], Hd))
            for kh in range(KVH):
                rope_head(qkv, (H + kh) * Hd, kv_row, qk_norms[layer, 1], qk_norm, eps, c, s, r)
                for i in range(Hd):
                    keys[kh, pos, i] = stored(kv_row[i], proto)
                    values[kh, pos, i] = stored(qkv[r, (H + KVH + kh) * Hd + i], proto)
        its, splits = (local_items, local_n_splits) if window > 0 else (items, n_splits)
        if serial[1 if window > 0 else 0]:
            attend_serial(q, attn, part_m, part_l, part_acc, seqs, its, splits, proto, layer, KVH, Hd, window)
        else:
            attend_on_pool(ctrl, job, attend_fn, q, attn, part_m, part_l, part_acc, seqs, its, splits, layer,
                           KVH, Hd, window)  # fmt: skip
        out = _project(ctrl, job, mats, 4 * layer + WO, attn.reshape(N, H * Hd), tile, chunk_fn, int8)
        add_output(x, out, post_attn, norms[layer, POST_ATTN_NORM], eps, h)
        rms_norm_into(x, norms[layer, FFN_NORM], eps, h)
        gate_up = _project(ctrl, job, mats, 4 * layer + W_GATE_UP, h, tile, chunk_fn, int8)
        for r in range(N):
            for i in range(F):
                g = gate_up[r, i]
                z = g
                if gelu:
                    z = GELU_SCALE * (g + np.float32(0.044715) * g * g * g)
                act[r, i] = sigmoid_times(g, z) * gate_up[r, F + i]
        out = _project(ctrl, job, mats, 4 * layer + W_DOWN, act, tile, chunk_fn, int8)
        add_output(x, out, post_ffn, norms[layer, POST_FFN_NORM], eps, h)
    return x


@dataclass(slots=True)
class Blocks:
    """A model's blocks laid out for ``run_blocks``: the matrices' kernel tables, the norms stacked."""

    mats: np.ndarray  # (layers * 4, 5) int64
    norms: np.ndarray  # (layers, 4, D) float32
    qk_norms: np.ndarray  # (layers, 2, Hd) float32
    biases: np.ndarray  # (layers, (H + 2 KVH) Hd) or (layers, 0) float32
    flags: np.ndarray  # (5,) int64
    shape: np.ndarray  # (4,) int64: H, KVH, Hd, F
    eps: np.float32
    windows: np.ndarray  # (layers,) int64
    keep: tuple[object, ...]  # what the tables' addresses point into

    @classmethod
    def of(
        cls, layers: list, n_heads: int, n_kv_heads: int, head_dim: int, ffn: int, eps: float,
        windows: list[int], gelu: bool,
    ) -> Blocks | None:  # fmt: skip
        """The layout of ``layers`` (``model.LayerWeights``), or None when a matrix is not packed."""
        mats, keep = [], []
        for w in layers:
            for m in (w.wqkv, w.wo, w.w_gate_up, w.w_down):
                if not isinstance(m, PackedWeight):
                    return None
                table = m.kernel_table()
                keep.append(table)
                mats.append([table.ctypes.data, table.size, m.padded_rows, *m.block_sizes])
        D, Hd = layers[0].attn_norm.shape[0], head_dim
        norms = np.zeros((len(layers), 4, D), dtype=np.float32)
        qk_norms = np.ones((len(layers), 2, Hd), dtype=np.float32)
        first = layers[0]
        has_bias = first.qkv_bias is not None
        biases = np.zeros((len(layers), first.qkv_bias.shape[0] if has_bias else 0), dtype=np.float32)
        for i, w in enumerate(layers):
            norms[i, ATTN_NORM], norms[i, FFN_NORM] = w.attn_norm, w.ffn_norm
            if w.post_attn_norm is not None:
                norms[i, POST_ATTN_NORM] = w.post_attn_norm
            if w.post_ffn_norm is not None:
                norms[i, POST_FFN_NORM] = w.post_ffn_norm
            if w.q_norm is not None and w.k_norm is not None:
                qk_norms[i, 0], qk_norms[i, 1] = w.q_norm, w.k_norm
            if has_bias:
                biases[i] = w.qkv_bias
        flags = np.array([first.q_norm is not None, first.post_attn_norm is not None,
                          first.post_ffn_norm is not None, has_bias, gelu], dtype=np.int64)  # fmt: skip
        return cls(np.array(mats, dtype=np.int64), norms, qk_norms, biases, flags,
                   np.array([n_heads, n_kv_heads, head_dim, ffn], dtype=np.int64), np.float32(eps),
                   np.array(windows, dtype=np.int64), tuple(keep))  # fmt: skip

    def runs(self, plan: StepPlan, n_rows: int, n_sequences: int) -> bool:
        """Whether this step can run here: ``plan`` attends every sequence, over float32 caches (or
        float16 ones on CPUs with F16C: LLVM would call a conversion routine numba does not link
        elsewhere), and the step has at most ``SMALL_ROWS`` rows."""
        dtypes = ("float32", "float16") if HAS_F16C else ("float32",)
        return len(plan.sequences) == n_sequences and plan.dtype in dtypes and n_rows <= SMALL_ROWS

    def run(
        self, x: np.ndarray, plan: StepPlan, cos: np.ndarray, sin: np.ndarray, local_cos: np.ndarray,
        local_sin: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        """The blocks over x (N, D): the workers of the engine's pool help with the projections."""
        G = int(self.shape[0] // self.shape[1])
        items, n_splits = plan.items(0, G)
        local_window = int(self.windows.max())
        local_items, local_n_splits = plan.items(local_window, G) if local_window else (items, n_splits)
        serial = np.array([plan.serial(0), plan.serial(local_window)], dtype=np.bool_)
        project_fn, chunk = projection()
        int8 = project_fn is vnni.project
        row_seq = np.empty((x.shape[0], 2), dtype=np.int64)
        for b, (_, _, _, _, start, T, first) in enumerate(plan.seqs.tolist()):
            row_seq[first : first + T, 0] = b
            row_seq[first : first + T, 1] = np.arange(start, start + T)
        args = (np.ascontiguousarray(x, dtype=np.float32), self.mats, self.norms, self.qk_norms, self.biases,
                self.flags, self.shape, self.eps, self.windows, cos, sin, local_cos, local_sin, plan.seqs,
                row_seq, items, n_splits, local_items, local_n_splits, plan.proto, serial, _max_tile(),
                chunk, attend_chunk(plan.dtype), int8)  # fmt: skip
        with pool().words() as (ctrl, job):
            return run_blocks(ctrl, job, *args)


@dataclass(slots=True)
class _WarmLayer:  # the fields of ``model.LayerWeights`` that ``Blocks.of`` reads
    attn_norm: np.ndarray
    wqkv: PackedWeight
    wo: PackedWeight
    ffn_norm: np.ndarray
    w_gate_up: PackedWeight
    w_down: PackedWeight
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None
    qkv_bias: np.ndarray | None = None


def warm_up() -> None:
    """Compile (or load from the disk cache) ``run_blocks`` on one tiny block (its types do not depend
    on the model), so the first decode step does not."""
    from . import weights as kw

    rng = np.random.default_rng(0)

    def matrix(rows: int) -> PackedWeight:
        q = rng.integers(0, 16, (rows, 32), dtype=np.int8)
        d = np.full((rows, 1), 0.01, dtype=np.float32)
        packed = kw.finish(kw.BlockWeight(q, d, -d * 8, 4, 0))
        assert isinstance(packed, PackedWeight)
        return packed

    ones = np.ones(32, dtype=np.float32)
    layer = _WarmLayer(ones, matrix(96), matrix(32), ones, matrix(64), matrix(32))
    blocks = Blocks.of([layer], 1, 1, 32, 32, 1e-5, [0], False)
    assert blocks is not None
    cache = np.zeros((1, 2, 1, 4, 32), dtype=np.float32)  # (layers, K/V, KVH, capacity, Hd)
    plan = StepPlan([cache[0, 0]], [cache[0, 1]], [cache.strides[0]], [0], [1], "float32", 1)
    cos, sin = np.ones((1, 32), dtype=np.float32), np.zeros((1, 32), dtype=np.float32)
    blocks.run(np.ones((1, 32), dtype=np.float32), plan, cos, sin, cos, sin)
