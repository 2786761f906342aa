"""Weight matrices as the kernels read them, built from a GGUF tensor's own bytes.

- ``PackedWeight`` (numba path): the file's quantized bits in panels of 16 output rows
  (``quant.py`` describes the layout): 4-bit values two to a byte, the fifth/sixth bits of Q5 and
  Q6_K in a uint32 per block, Q8_0 as int8, each block's scale and minimum as the file's float16 (or
  float32 where float16 cannot hold them exactly: K-quants' sub-block scales, rows scaled at load).
  SmolLM2's Q4_1 projections take 0.625 bytes a weight, as in the file. A matrix fused from tensors
  of different types (Gemma's q/k in Q5_0 beside v in Q8_0) keeps one part per type.
- ``BlockWeight``: the load-time form a tensor is unpacked into (int8 values, a float32 scale and
  minimum per block) while rows are reordered, scaled and fused; ``finish()`` packs it.
- ``DenseWeight``: float32, laid out once for ``x @ W`` ((in, out)); every other tensor type (F32,
  F16, BF16, other quantizations through the ``gguf`` package) and the whole model on the NumPy path.

``linear()`` in ``engine.kernels`` takes a ``PackedWeight`` or a ``DenseWeight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..gguf_constants import GGML_QUANT_SIZES, GGMLQuantizationType
from ..memory import return_freed_memory as return_freed_memory  # model.py calls it as kw.

F32 = np.float32
QK = 32  # values per block, for every type kept as blocks

T = GGMLQuantizationType
BLOCK_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
QK_K = 256  # values per K-quant super-block
LANES = 16  # output rows per panel


@dataclass(frozen=True, slots=True)
class BlockWeight:
    """A quantized (out, in) matrix as it is unpacked at load: int8 values, a float32 scale (and
    minimum) per block of 32 values (16 for Q6_K: the block size is K / d.shape[1]). ``bits`` and
    ``offset`` say how the file stores each value: as the ``bits``-bit code ``q - offset``."""

    q: np.ndarray  # (O, K) int8
    d: np.ndarray  # (O, K/32) float32
    m: np.ndarray | None  # (O, K/32) float32, or None for types without a minimum
    bits: int = 8  # 4, 5, 6 or 8
    offset: int = 0  # -8 (Q4_0), -16 (Q5_0), -32 (Q6_K) or 0

    @property
    def block(self) -> int:
        return self.q.shape[1] // self.d.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes)

    @property
    def layout(self) -> tuple[int, int, int]:
        """What must agree for two matrices to be packed as one: (bits, offset, block)."""
        return self.bits, self.offset, self.block

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
class Panels:
    """One quantization type's rows of a ``PackedWeight`` (layout in ``quant.py``): ``rows`` output
    rows (the last panel padded with zero rows), ``block`` values per scale."""

    qs: np.ndarray  # (P, nb, block/2, 16) uint8 nibbles, or (P, nb, block, 16) int8
    qh: np.ndarray  # (P, nb, 16) uint32 high bits, or (0, 0, 16)
    d: np.ndarray  # (P, nb, 16) float16 bits (uint16) or float32
    m: np.ndarray  # like d, or (0, 0, 16)
    offset: float
    block: int
    rows: int

    @property
    def n_panels(self) -> int:
        return self.qs.shape[0]

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.qh.nbytes + self.d.nbytes + self.m.nbytes

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        return self.qs, self.qh, self.d, self.m, self.offset


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A quantized (out, in) matrix in the file's bits, in panels of 16 output rows: one ``Panels``
    per quantization type, their rows one after the other."""

    parts: tuple[Panels, ...]
    shape: tuple[int, int]
    padded_rows: int = field(init=False)  # output columns the kernels write (whole panels)
    block_sizes: tuple[bool, bool] = field(init=False)  # a part with 32-value blocks? with 16?
    kernel_rows: int = field(default=16, init=False)  # steps up to this many rows take the kernel
    calibration: Any = field(default=None, init=False, repr=False, compare=False)  # to run, or None
    _table: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "padded_rows", sum(LANES * p.n_panels for p in self.parts))
        sizes = (any(p.block == 32 for p in self.parts), any(p.block == 16 for p in self.parts))
        object.__setattr__(self, "block_sizes", sizes)

    def use_kernel_up_to(self, rows: int) -> None:
        """Set ``kernel_rows`` (``calibration.py`` measures it per CPU)."""
        object.__setattr__(self, "kernel_rows", int(rows))

    def calibrate_with(self, group: Any) -> None:
        """The ``calibration.Calibration`` that sets ``kernel_rows`` at the first large step."""
        object.__setattr__(self, "calibration", group)

    def kernel_table(self) -> np.ndarray:
        """The parts' addresses, shapes and chunks as the compiled kernels read them (``quant.table``),
        built once."""
        if self._table is None:
            from .quant import table

            object.__setattr__(self, "_table", table(self.parts))
        assert self._table is not None
        return self._table

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def dequantize(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """float32 (O, K) (or the chosen rows): the values the kernels multiply by."""
        from . import quant

        ids = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows).reshape(-1)
        out = np.empty((ids.size, self.shape[1]), dtype=F32)
        start = 0
        for part in self.parts:
            mine = (ids >= start) & (ids < start + part.rows)
            if mine.any():
                picked = np.empty((int(mine.sum()), self.shape[1]), dtype=F32)
                quant.gather_rows(*part.arrays(), (ids[mine] - start).astype(np.int64), picked)
                out[mine] = picked
            start += part.rows
        return out


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


Weight = PackedWeight | DenseWeight


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


def block_row(tensor_type: GGMLQuantizationType) -> int:
    """What a row's length must be a multiple of for ``tensor_type`` to be kept as blocks."""
    return QK_K if tensor_type in (T.Q4_K, T.Q5_K, T.Q6_K) else QK


def blocks_from_gguf(
    tensor_type: GGMLQuantizationType, raw: np.ndarray, shape: tuple[int, int]
) -> BlockWeight:
    """Unpack a tensor's bytes (rows of blocks) of one of ``BLOCK_TYPES`` into a ``BlockWeight``."""
    O, K = shape
    block_size, block_bytes = GGML_QUANT_SIZES[tensor_type]
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
    bits, offset = (8, 0) if tensor_type == T.Q8_0 else (4, 0) if tensor_type in (T.Q4_0, T.Q4_1) else (5, 0)
    if tensor_type == T.Q8_0:
        q = blocks[:, :, 2:].view(np.int8)  # (O, nb, 32)
    elif tensor_type == T.Q4_0:
        q, offset = _nibbles(blocks[:, :, 2:]).astype(np.int8) - np.int8(8), -8
    elif tensor_type == T.Q4_1:
        m = _f16(blocks, 2)
        q = _nibbles(blocks[:, :, 4:]).astype(np.int8)
    elif tensor_type == T.Q5_0:
        q = (_nibbles(blocks[:, :, 6:]) | (_high_bits(blocks[:, :, 2:6]) << 4)).astype(np.int8) - np.int8(16)
        offset = -16
    elif tensor_type == T.Q5_1:
        m = _f16(blocks, 2)
        q = (_nibbles(blocks[:, :, 8:]) | (_high_bits(blocks[:, :, 4:8]) << 4)).astype(np.int8)
    else:
        raise ValueError(f"{tensor_type.name} is not kept as blocks")
    return BlockWeight(np.ascontiguousarray(q.reshape(O, K)), d, m, bits, offset)


def _k_quant_blocks(tensor_type: GGMLQuantizationType, blocks: np.ndarray) -> BlockWeight:
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
        return BlockWeight(np.ascontiguousarray(q.reshape(O, -1)), d.reshape(O, -1), None, 6, -32)
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
    bits = 4 if tensor_type == T.Q4_K else 5
    return BlockWeight(np.ascontiguousarray(q.astype(np.int8)), scales, minimums, bits)


# ---------------------------------------------------------------------------------------------
# Assembling a layer's matrices (row reorders, folded scales, fused projections)
# ---------------------------------------------------------------------------------------------
Blocks = BlockWeight | tuple[BlockWeight, ...]  # a matrix being assembled: one type, or several fused


def take_rows(w: BlockWeight | np.ndarray, order: np.ndarray) -> BlockWeight | np.ndarray:
    if isinstance(w, np.ndarray):
        return w[order]
    return replace(w, q=w.q[order], d=w.d[order], m=None if w.m is None else w.m[order])


def scale_rows(w: BlockWeight | np.ndarray, scale: float) -> BlockWeight | np.ndarray:
    """The matrix times a constant (for a block matrix: its scales and minimums)."""
    if isinstance(w, np.ndarray):
        return w * F32(scale)
    return replace(w, d=w.d * F32(scale), m=None if w.m is None else w.m * F32(scale))


def concat_rows(parts: Sequence[BlockWeight | np.ndarray]) -> Blocks | np.ndarray:
    """Stack (out_i, K) matrices into one (sum out_i, K): neighbours of one layout (bits, offset,
    block size) merge, different ones stay parts of one matrix. A float32 part makes all float32."""
    if not all(isinstance(p, BlockWeight) for p in parts):
        return np.concatenate([p if isinstance(p, np.ndarray) else p.dequantize() for p in parts])
    groups: list[list[BlockWeight]] = []
    for p in parts:
        assert isinstance(p, BlockWeight)
        if groups and groups[-1][0].layout == p.layout and groups[-1][-1].shape[0] % LANES == 0:
            groups[-1].append(p)
        else:
            groups.append([p])
    merged = tuple(_merge(g) for g in groups)
    return merged[0] if len(merged) == 1 else merged


def _merge(blocks: list[BlockWeight]) -> BlockWeight:
    if len(blocks) == 1:
        return blocks[0]
    m = None
    if any(b.m is not None for b in blocks):
        m = np.concatenate([np.zeros_like(b.d) if b.m is None else b.m for b in blocks])
    q, d = np.concatenate([b.q for b in blocks]), np.concatenate([b.d for b in blocks])
    return replace(blocks[0], q=q, d=d, m=m)


def finish(w: Blocks | np.ndarray, transposed_view: bool = False) -> Weight:
    """The matrix as ``linear()`` reads it: blocks packed into panels; float32 laid out (in, out) for
    ``x @ W`` (with ``transposed_view`` it stays (out, in) in memory, used through a transposed view)."""
    if isinstance(w, BlockWeight):
        w = (w,)
    if isinstance(w, tuple):
        if all(b.shape[0] % LANES == 0 for b in w[:-1]):  # only the last part's panel may be padded
            return PackedWeight(tuple(pack(b) for b in w), (sum(b.shape[0] for b in w), w[0].shape[1]))
        w = np.concatenate([b.dequantize() for b in w])
    w = np.asarray(w, dtype=F32)
    return DenseWeight(np.ascontiguousarray(w).T if transposed_view else np.ascontiguousarray(w.T))


def pack(w: BlockWeight) -> Panels:
    """A ``BlockWeight`` in panels of 16 rows, each value in its ``bits`` (``quant.py``'s layout)."""
    O, K = w.shape
    L, nb = w.block, K // w.block
    n_panels = -(-O // LANES)

    def panels(a: np.ndarray) -> np.ndarray:  # (O, nb, X) -> (P, nb, X, 16), zero rows padded
        if a.shape[0] != n_panels * LANES:
            a = np.concatenate([a, np.zeros((n_panels * LANES - O, *a.shape[1:]), dtype=a.dtype)])
        return np.ascontiguousarray(a.reshape(n_panels, LANES, nb, -1).transpose(0, 2, 3, 1))

    qh = np.zeros((0, 0, LANES), dtype=np.uint32)
    if w.bits == 8:
        qs = panels(w.q.reshape(O, nb, L))  # int8
    else:
        codes = (w.q.astype(np.int16) - w.offset).astype(np.uint8).reshape(O, nb, L)  # 0 .. 2**bits - 1
        low, half = codes & 0x0F, L // 2
        qs = panels(low[..., :half] | (low[..., half:] << 4))  # byte j: positions j and j + L/2
        if w.bits > 4:
            high_bits = w.bits - 4
            if high_bits * L != 32:
                raise ValueError(f"{w.bits}-bit values in {L}-value blocks do not fill a uint32 per block")
            shifts = np.arange(L, dtype=np.uint32) * np.uint32(high_bits)
            words = ((codes >> 4).astype(np.uint32) << shifts).sum(axis=-1, dtype=np.uint32)  # (O, nb)
            qh = panels(words[..., None])[:, :, 0, :]
    d, m = _scales(w.d, w.m)

    def lanes(a: np.ndarray) -> np.ndarray:  # (O, nb) -> (P, nb, 16)
        return panels(a[..., None])[:, :, 0, :]

    m_lanes = np.zeros((0, 0, LANES), dtype=d.dtype) if m is None else lanes(m)
    return Panels(qs, qh, lanes(d), m_lanes, float(w.offset), L, O)


def _scales(d: np.ndarray, m: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and minimums) as float16 bits where float16 holds every one exactly (the legacy
    types' own values), else float32."""
    values = [d] if m is None else [d, m]
    with np.errstate(over="ignore"):
        exact = all(np.array_equal(v.astype(np.float16).astype(F32), v) for v in values)
    if not exact:
        return d.astype(F32), None if m is None else m.astype(F32)
    return d.astype(np.float16).view(np.uint16), None if m is None else m.astype(np.float16).view("<u2")


def embed(w: Weight, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of an embedding table stored as a (V, D) matrix, as float32 (N, D)."""
    return np.ascontiguousarray(w.dequantize(ids), dtype=F32)
