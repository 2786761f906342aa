"""Weight matrices as the kernels read them, built from a GGUF tensor's own bytes.

Two kinds, both in the file's (out, in) orientation while they are being assembled:

- ``BlockWeight``: the file's 32-wide quantization blocks kept as int8 values with one float32 scale
  ``d`` per block and, for the "_1" types, one float32 minimum ``m`` per block, so that
  ``W[o, 32k + j] = d[o, k] * q[o, 32k + j] (+ m[o, k])`` exactly as llama.cpp dequantizes it.
  Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 load this way (4-bit and 5-bit values are widened to one byte:
  kernels read int8 at memory speed, 3.2-3.6x less than float32).
- ``DenseWeight``: float32, laid out once for ``x @ W`` ((in, out)); every other tensor type (F32,
  F16, BF16, K-quants through the ``gguf`` package) and the whole model on the NumPy path.

``linear()`` in ``engine.kernels`` takes either. Nothing here needs numba.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import numpy as np

F32 = np.float32
QK = 32  # values per block, for every type kept as blocks

T = gguf.GGMLQuantizationType
BLOCK_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
QK_K = 256  # values per K-quant super-block


@dataclass(frozen=True, slots=True)
class BlockWeight:
    """A quantized (out, in) matrix: int8 values, a float32 scale (and minimum) per 32 values (per 16
    for Q6_K: the block size is K / d.shape[1])."""

    q: np.ndarray  # (O, K) int8
    d: np.ndarray  # (O, K/32) float32
    m: np.ndarray | None  # (O, K/32) float32, or None for types without a minimum

    @property
    def block(self) -> int:
        return self.q.shape[1] // self.d.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes)

    def dequantize(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """float32 (O, K) (or the chosen rows): the values the kernels multiply by."""
        q, d = self.q[rows], self.d[rows]
        O, K = q.shape
        w = q.reshape(O, d.shape[1], self.block).astype(F32)  # (O, nb, block)
        w *= d[:, :, None]
        if self.m is not None:
            w += self.m[rows][:, :, None]
        return w.reshape(O, K)


@dataclass(frozen=True, slots=True)
class DenseWeight:
    """A float32 matrix laid out for ``x @ wt``."""

    wt: np.ndarray  # (K, O) float32; may be a transposed view of a C-contiguous (O, K) array

    @property
    def shape(self) -> tuple[int, int]:
        return self.wt.shape[1], self.wt.shape[0]

    @property
    def nbytes(self) -> int:
        return self.wt.nbytes

    def dequantize(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self.wt.T[rows]


Weight = BlockWeight | DenseWeight


# ---------------------------------------------------------------------------------------------
# GGUF blocks -> BlockWeight
# ---------------------------------------------------------------------------------------------
def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, as float32. raw: (O, nb, block_bytes) -> (O, nb)"""
    return np.ascontiguousarray(raw[:, :, start : start + 2]).view(np.float16)[:, :, 0].astype(F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit packing: byte j holds value j (low nibble) and j + 16 (high). (.., 16) -> (.., 32)"""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """The fifth bit of each of the 32 values, from the block's little-endian uint32. (.., 4) -> (.., 32)"""
    bits = np.ascontiguousarray(qh).view("<u4")  # (.., 1)
    return ((bits >> np.arange(QK, dtype=np.uint32)) & 1).astype(np.uint8)  # (.., 32)


def block_row(tensor_type: gguf.GGMLQuantizationType) -> int:
    """What a row's length must be a multiple of for ``tensor_type`` to be kept as blocks."""
    return QK_K if tensor_type in (T.Q4_K, T.Q5_K, T.Q6_K) else QK


def blocks_from_gguf(
    tensor_type: gguf.GGMLQuantizationType, raw: np.ndarray, shape: tuple[int, int]
) -> BlockWeight:
    """Unpack a Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensor's bytes (rows of blocks) into a ``BlockWeight``."""
    O, K = shape
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    if tensor_type in (T.Q4_K, T.Q5_K, T.Q6_K):
        if K % QK_K:
            raise ValueError(f"{tensor_type.name}: rows of {K} values do not split into {QK_K}-value blocks")
        return _k_quant_blocks(
            tensor_type, np.asarray(raw, dtype=np.uint8).reshape(O, K // QK_K, block_bytes)
        )
    if block_size != QK or K % QK:
        raise ValueError(f"{tensor_type.name}: rows of {K} values do not split into {QK}-value blocks")
    nb = K // QK
    blocks = np.asarray(raw, dtype=np.uint8).reshape(O, nb, block_bytes)  # (O, nb, bytes)
    d = _f16(blocks, 0)
    m = None
    if tensor_type == T.Q8_0:
        q = blocks[:, :, 2:].view(np.int8)  # (O, nb, 32)
    elif tensor_type == T.Q4_0:
        q = _nibbles(blocks[:, :, 2:]).astype(np.int8) - np.int8(8)
    elif tensor_type == T.Q4_1:
        m = _f16(blocks, 2)
        q = _nibbles(blocks[:, :, 4:]).astype(np.int8)
    elif tensor_type == T.Q5_0:
        q = (_nibbles(blocks[:, :, 6:]) | (_high_bits(blocks[:, :, 2:6]) << 4)).astype(np.int8) - np.int8(16)
    elif tensor_type == T.Q5_1:
        m = _f16(blocks, 2)
        q = (_nibbles(blocks[:, :, 8:]) | (_high_bits(blocks[:, :, 4:8]) << 4)).astype(np.int8)
    else:
        raise ValueError(f"{tensor_type.name} is not kept as blocks")
    return BlockWeight(np.ascontiguousarray(q.reshape(O, K)), d, m)


def _k_quant_blocks(tensor_type: gguf.GGMLQuantizationType, blocks: np.ndarray) -> BlockWeight:
    """Q4_K / Q5_K (8 sub-blocks of 32: 6-bit scale and minimum each) and Q6_K (16 sub-blocks of 16:
    an int8 scale each) as int8 values with a float32 scale (and minimum) per sub-block: the same
    values as the ``gguf`` package's dequantization (``d * sc * q - dmin * m``)."""
    O, n_super, _ = blocks.shape  # (O, K/256, bytes)
    if tensor_type == T.Q6_K:
        ql, qh = blocks[..., :128], blocks[..., 128:192]
        scales = blocks[..., 192:208].view(np.int8).astype(F32)  # (O, n, 16)
        d = _f16(blocks, 208)[..., None] * scales  # (O, n, 16)
        low = (ql.reshape(O, n_super, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F
        high = (
            qh.reshape(O, n_super, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        ) & 3
        q = (low.reshape(O, n_super, 2, 128) | (high.reshape(O, n_super, 2, 128) << 4)).astype(np.int8) - 32
        return BlockWeight(np.ascontiguousarray(q.reshape(O, -1)), d.reshape(O, -1), None)
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]  # (O, n, 1)
    packed = blocks[..., 4:16].reshape(O * n_super, 3, 4)
    a, b, c = packed[:, 0], packed[:, 1], packed[:, 2]  # ggml's 6-bit scales and minimums
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1).reshape(O, n_super, 8)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1).reshape(O, n_super, 8)
    if tensor_type == T.Q4_K:
        qs = blocks[..., 16:].reshape(O, n_super, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(
            1, 1, 1, 2, 1
        )
        q = (qs & 0x0F).reshape(O, -1)
    else:  # Q5_K: the fifth bit of value j of sub-block i is bit i of qh[j]
        qh, qs = blocks[..., 16:48], blocks[..., 48:]
        low = (qs.reshape(O, n_super, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(O, n_super, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
        q = (low.reshape(O, n_super, 8, 32) | (high << 4)).reshape(O, -1)
    scales = (d * sc.astype(F32)).reshape(O, -1)
    minimums = -(dmin * mn.astype(F32)).reshape(O, -1)
    return BlockWeight(np.ascontiguousarray(q.astype(np.int8)), scales, minimums)


# ---------------------------------------------------------------------------------------------
# Assembling a layer's matrices (row reorders, folded scales, fused projections)
# ---------------------------------------------------------------------------------------------
def take_rows(w: BlockWeight | np.ndarray, order: np.ndarray) -> BlockWeight | np.ndarray:
    if isinstance(w, np.ndarray):
        return w[order]
    return BlockWeight(w.q[order], w.d[order], None if w.m is None else w.m[order])


def scale_rows(w: BlockWeight | np.ndarray, scale: float) -> BlockWeight | np.ndarray:
    """The matrix times a constant (for a block matrix: its scales and minimums)."""
    if isinstance(w, np.ndarray):
        return w * F32(scale)
    return BlockWeight(w.q, w.d * F32(scale), None if w.m is None else w.m * F32(scale))


def concat_rows(parts: Sequence[BlockWeight | np.ndarray]) -> BlockWeight | np.ndarray:
    """Stack (out_i, K) matrices into one (sum out_i, K). Mixed kinds fall back to float32."""
    if all(isinstance(p, BlockWeight) for p in parts):
        blocks = [p for p in parts if isinstance(p, BlockWeight)]
        block = min(b.block for b in blocks)  # Q6_K's 16-value blocks beside 32-value ones: scales repeated
        blocks = [_with_block(b, block) for b in blocks]
        if all(b.m is None for b in blocks):
            m = None
        else:
            m = np.concatenate([np.zeros_like(b.d) if b.m is None else b.m for b in blocks])
        return BlockWeight(np.concatenate([b.q for b in blocks]), np.concatenate([b.d for b in blocks]), m)
    return np.concatenate([p if isinstance(p, np.ndarray) else p.dequantize() for p in parts])


def _with_block(w: BlockWeight, block: int) -> BlockWeight:
    """The same matrix with one scale (and minimum) per ``block`` values (a divisor of its own)."""
    if w.block == block:
        return w
    repeat = w.block // block
    m = None if w.m is None else np.repeat(w.m, repeat, axis=1)
    return BlockWeight(w.q, np.repeat(w.d, repeat, axis=1), m)


def finish(w: BlockWeight | np.ndarray, transposed_view: bool = False) -> Weight:
    """The matrix as ``linear()`` reads it. Float32 is laid out (in, out) for ``x @ W``; with
    ``transposed_view`` it stays (out, in) in memory and is used through a transposed view."""
    if isinstance(w, BlockWeight):
        return w
    w = np.asarray(w, dtype=F32)
    return DenseWeight(np.ascontiguousarray(w).T if transposed_view else np.ascontiguousarray(w.T))


def embed(w: Weight, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of an embedding table stored as a (V, D) matrix, as float32 (N, D)."""
    return np.ascontiguousarray(w.dequantize(ids), dtype=F32)
