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
BLOCK_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)


@dataclass(frozen=True, slots=True)
class BlockWeight:
    """A quantized (out, in) matrix: int8 values, a float32 scale (and minimum) per 32 values."""

    q: np.ndarray  # (O, K) int8
    d: np.ndarray  # (O, K/32) float32
    m: np.ndarray | None  # (O, K/32) float32, or None for types without a minimum

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
        w = q.reshape(O, K // QK, QK).astype(F32)  # (O, nb, 32)
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


def blocks_from_gguf(
    tensor_type: gguf.GGMLQuantizationType, raw: np.ndarray, shape: tuple[int, int]
) -> BlockWeight:
    """Unpack a Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensor's bytes (rows of blocks) into a ``BlockWeight``."""
    O, K = shape
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
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
        if all(b.m is None for b in blocks):
            m = None
        else:
            m = np.concatenate([np.zeros_like(b.d) if b.m is None else b.m for b in blocks])
        return BlockWeight(np.concatenate([b.q for b in blocks]), np.concatenate([b.d for b in blocks]), m)
    return np.concatenate([p if isinstance(p, np.ndarray) else p.dequantize() for p in parts])


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
