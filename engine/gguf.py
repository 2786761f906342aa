"""Read a GGUF file with the `gguf` package: metadata, the model's config, float32 weights.

One table (``TENSOR_NAMES``) names every tensor the engine reads. Errors name the file and the
reason (not a GGUF file, truncated, unknown architecture, missing tensor, unsupported type), so the
app can show them as they are.

The header is scanned once before the `gguf` package reads it (``_HeaderScan``): the package trusts
every count in the file, so a metadata array declaring 2**64 items, or a tensor count larger than
the file could hold, would make it loop for hours or allocate without bound. The scan checks each
count against the bytes left and each tensor's extent against the file size, in well under a second
even for a 50k-token vocabulary.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .architectures import ARCHITECTURES, Architecture
from .errors import ModelFileError, UnsupportedModelError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
SUPPORTED_VERSIONS = (2, 3)
MAX_ARRAY_LENGTH = 1 << 22  # items in one metadata array (vocabularies hold 32k-260k tokens)
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_CONTEXT_LENGTH = 1 << 20  # the RoPE tables are allocated for the whole context at load

# Per-block tensors, by the engine's short name -> GGUF name pattern.
TENSOR_NAMES = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "attn_q": "blk.{i}.attn_q.weight",
    "attn_k": "blk.{i}.attn_k.weight",
    "attn_v": "blk.{i}.attn_v.weight",
    "attn_output": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "ffn_gate": "blk.{i}.ffn_gate.weight",
    "ffn_up": "blk.{i}.ffn_up.weight",
    "ffn_down": "blk.{i}.ffn_down.weight",
}
# Per-block tensors some families add (``Architecture.extra_block_tensors``).
EXTRA_TENSOR_NAMES = {
    "attn_q_norm": "blk.{i}.attn_q_norm.weight",
    "attn_k_norm": "blk.{i}.attn_k_norm.weight",
    "post_attention_norm": "blk.{i}.post_attention_norm.weight",
    "post_ffw_norm": "blk.{i}.post_ffw_norm.weight",
    "attn_q_bias": "blk.{i}.attn_q.bias",
    "attn_k_bias": "blk.{i}.attn_k.bias",
    "attn_v_bias": "blk.{i}.attn_v.bias",
}
TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"  # absent when the embeddings are tied
ROPE_FREQS = "rope_freqs.weight"  # optional per-dimension frequency factors (Llama 3.x)

# Tensor types that hold plain numbers (the rest are block-quantized, dequantized by `gguf.quants`).
_PLAIN_TYPES = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
}


class _PlainArrayReader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of the memory map.

    The stock reader slices an ``np.memmap`` once per string of the vocabulary, and every slice of a
    memmap runs ``memmap.__array_finalize__``: 5.4 s for SmolLM2's 49k tokens and 49k merges. A plain
    ndarray view of the same mapping parses in about 1 s, with the same results.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)


def _dequantizable(tensor_type: gguf.GGMLQuantizationType) -> bool:
    return tensor_type in _PLAIN_TYPES or tensor_type in gguf.quants._type_traits


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Hyper-parameters of a model of a supported family, read from GGUF metadata."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    rope_scale: float = 1.0  # linear RoPE scaling: positions are divided by this
    name: str = ""
    sliding_window: int = 0  # tokens a local layer attends to (0: no local layers)

    @property
    def arch(self) -> Architecture:
        """What this family does differently (``engine.architectures``)."""
        return ARCHITECTURES[self.architecture]

    def block_tensor_names(self) -> dict[str, str]:
        """Short name -> GGUF name pattern of every per-block tensor this family has."""
        return {**TENSOR_NAMES, **{k: EXTRA_TENSOR_NAMES[k] for k in self.arch.extra_block_tensors}}

    def is_local_layer(self, index: int) -> bool:
        """Whether block ``index`` attends only to the last ``sliding_window`` tokens."""
        every = self.arch.global_every
        return bool(self.sliding_window and every and (index + 1) % every)

    @property
    def n_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_bytes_per_token_f32(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


class GgufFile:
    """An opened GGUF file: its metadata as Python values and its tensors (memory-mapped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        _check_header(self.path)
        _HeaderScan.run(self.path)
        try:
            self._reader = _PlainArrayReader(self.path)
        except MemoryError:
            raise
        except Exception as exc:  # the scan bounds the reader; whatever it still refuses is named here
            raise ModelFileError(self.path, f"cannot parse the GGUF header: {_describe(exc)}") from exc
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except (ValueError, IndexError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
                raise ModelFileError(self.path, f"metadata field {key!r} is unreadable: {exc}") from exc
        self._reader.fields.clear()  # parsed into ``metadata``: the parts (~35 MB for a 49k vocab) go
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_tensor_extents()

    def _check_tensor_extents(self) -> None:
        size = self.path.stat().st_size
        for t in self._tensors.values():
            if t.data_offset + int(t.n_bytes) > size or t.data.nbytes < int(t.n_bytes):
                raise ModelFileError(
                    self.path,
                    f"file is truncated: tensor {t.name!r} needs bytes up to "
                    f"{t.data_offset + int(t.n_bytes):,} but the file has {size:,}",
                )

    @property
    def data_offset(self) -> int:
        """Where the tensor data starts: everything before is the header (metadata, tensor infos)."""
        return int(self._reader.data_offset)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in NumPy order (rows = output features for a weight matrix)."""
        return tuple(int(d) for d in reversed(self._require(name).shape.tolist()))

    def tensor_type(self, name: str) -> gguf.GGMLQuantizationType:
        return self._require(name).tensor_type

    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 copy in NumPy order (for a weight matrix: (out_features, in_features))."""
        t = self._require(name)
        if not _dequantizable(t.tensor_type):
            raise UnsupportedModelError(
                self.path, f"tensor {name!r} has type {t.tensor_type.name}, which this engine cannot read"
            )
        shape = self.tensor_shape(name)
        if t.tensor_type in _PLAIN_TYPES:
            out = np.asarray(t.data, dtype=np.float32)
        else:
            out = gguf.quants.dequantize(t.data, t.tensor_type)
        # a copy, never a view of the memory map: a weight that kept a view would keep every page of
        # the file resident for as long as the model lives
        return np.array(out.reshape(shape), dtype=np.float32, copy=True)

    def load_raw(self, name: str) -> np.ndarray:
        """A block-quantized tensor's bytes as stored: (rows, bytes per row) uint8, memory-mapped."""
        t = self._require(name)
        rows = self.tensor_shape(name)[0]
        return np.asarray(t.data, dtype=np.uint8).reshape(rows, -1)

    def _require(self, name: str) -> Any:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelFileError(self.path, f"missing tensor {name!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelFileError(self.path, f"missing metadata key {key!r}")
        return self.metadata[key]


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, IndexError):
        return f"the file ends inside the header ({text})"
    if not isinstance(exc, ValueError):
        return f"{type(exc).__name__}: {text}"
    return text


def _check_header(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if path.is_dir():
        raise ModelFileError(path, "is a directory, not a GGUF file")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(path, "file is empty")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC and not GGUF_MAGIC.startswith(head):
        raise ModelFileError(path, f"not a GGUF file (magic bytes {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise ModelFileError(path, f"file is truncated: {size} bytes is shorter than a GGUF header")


_VT = gguf.GGUFValueType
_SCALAR_FORMATS: dict[int, str] = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d",
}  # fmt: skip
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset


class _HeaderScan:
    """One pass over the header, every declared count checked against the bytes left in the file.

    Raises ModelFileError (UnsupportedModelError for a version or tensor type this engine cannot
    read) naming what is wrong and where; after it, the `gguf` reader only meets counts the file can
    back, so it cannot loop for long or allocate more than a few times the file size.
    """

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path, self.buf, self.size = path, buf, len(buf)
        self.pos = 4  # after the magic, checked by _check_header
        self.order = "<"
        self.alignment = gguf.GGUF_DEFAULT_ALIGNMENT

    @classmethod
    def run(cls, path: Path) -> None:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cls(path, buf).scan()

    def fail(self, reason: str, unsupported: bool = False) -> ModelFileError:
        return (UnsupportedModelError if unsupported else ModelFileError)(self.path, reason)

    def read(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise self.fail(f"file is truncated: it ends inside the header (in {what}, at byte {self.pos:,})")
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def count(self, n: int, min_item_bytes: int, subject: str, noun: str, limit: int | None = None) -> None:
        """Refuse a count of ``noun`` that the rest of the file cannot hold (or above ``limit``)."""
        left = self.size - self.pos
        if n * min_item_bytes > left:
            raise self.fail(
                f"file is truncated or corrupt: {subject} declares {n:,} {noun}, but the {left:,} bytes "
                f"left in the file hold at most {left // min_item_bytes:,}"
            )
        if limit is not None and n > limit:
            raise self.fail(f"{subject} declares {n:,} {noun}, more than the limit of {limit:,}")

    def text(self, what: str) -> str:
        start = self.pos
        n = self.read("Q", f"the length of {what}")
        self.count(n, 1, f"{what} at byte {start:,}", "bytes")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {start:,} is not valid UTF-8") from None

    def scan(self) -> None:
        version = self.read("I", "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in SUPPORTED_VERSIONS:
            raise self.fail(
                f"GGUF version {version} is not supported; this engine reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
                unsupported=True,
            )
        n_tensors, n_kv = self.read("Q", "the tensor count"), self.read("Q", "the metadata count")
        self.count(n_kv, _MIN_KV_BYTES, "the header", "metadata entries")
        keys: set[str] = set()
        for _ in range(n_kv):
            key = self.text("a metadata key")
            if key in keys:
                raise self.fail(f"metadata key {key!r} appears twice")
            keys.add(key)
            self.value(self.read("I", f"the type of {key!r}"), key, nested=False)
        self.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "the header", "tensors")
        tensors = [self.tensor_info() for _ in range(n_tensors)]
        data_start = -(-self.pos // self.alignment) * self.alignment
        for name, dims, tensor_type, offset in tensors:
            if offset % self.alignment:  # llama.cpp refuses these too; the data would be read shifted
                raise self.fail(
                    f"tensor {name!r} starts at data offset {offset:,}, not a multiple of the file's "
                    f"alignment {self.alignment}"
                )
            self.check_extent(name, dims, tensor_type, data_start + offset)

    def value(self, value_type: int, key: str, nested: bool) -> None:
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is not None:
            value = self.read(fmt, f"the value of {key!r}")
            if key == "general.alignment" and not nested:
                if value_type != _VT.UINT32 or value <= 0 or value & (value - 1):
                    raise self.fail(f"general.alignment = {value!r} is not a power of two (uint32)")
                self.alignment = value
        elif value_type == _VT.STRING:
            self.text(f"the value of {key!r}")
        elif value_type == _VT.ARRAY and not nested:
            item_type = self.read("I", f"the item type of {key!r}")
            n = self.read("Q", f"the length of {key!r}")
            item_fmt = _SCALAR_FORMATS.get(item_type)
            item_bytes = struct.calcsize(item_fmt) if item_fmt else 8
            self.count(n, item_bytes, f"metadata array {key!r}", "items", MAX_ARRAY_LENGTH)
            if item_fmt is not None:
                self.pos += n * item_bytes
            elif item_type == _VT.STRING:
                self.skip_strings(n, key)
            elif n:
                self.value(item_type, key, nested=True)  # raises: nested array or unknown type
        else:
            what = "an array nested in an array" if value_type == _VT.ARRAY else f"unknown type {value_type}"
            raise self.fail(f"metadata {key!r} has {what}")

    def skip_strings(self, n: int, key: str) -> None:
        """Step over n strings (a vocabulary: one tight loop, no decoding; the reader decodes)."""
        unpack, buf, pos, size = struct.Struct(self.order + "Q").unpack_from, self.buf, self.pos, self.size
        for i in range(n):
            length = unpack(buf, pos)[0] if pos + 8 <= size else size  # past the end: fails below
            pos += 8 + length
            if pos > size:
                raise self.fail(f"file is truncated: it ends inside item {i:,} of metadata array {key!r}")
        self.pos = pos

    def tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self.text("a tensor name")
        n_dims = self.read("I", f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_TENSOR_DIMS}")
        dims = [self.read("Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        if not all(0 < d < 1 << 63 for d in dims):
            raise self.fail(f"tensor {name!r} has an impossible shape {dims}")
        tensor_type = self.read("I", f"the type of tensor {name!r}")
        return name, dims, tensor_type, self.read("Q", f"the data offset of tensor {name!r}")

    def check_extent(self, name: str, dims: list[int], tensor_type: int, start: int) -> None:
        try:
            type_name = gguf.GGMLQuantizationType(tensor_type).name
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
        except (ValueError, KeyError):
            raise self.fail(f"tensor {name!r} has unknown type id {tensor_type}", unsupported=True) from None
        if dims[0] % block:
            raise self.fail(
                f"tensor {name!r} has rows of {dims[0]} values, not a multiple of the {type_name} block "
                f"size {block}"
            )
        end = start + math.prod(dims) * type_size // block
        if end > self.size:
            raise self.fail(
                f"file is truncated: tensor {name!r} needs bytes up to {end:,} but the file has {self.size:,}"
            )


def read_config(f: GgufFile) -> ModelConfig:
    """Build the ModelConfig from metadata, refusing what this engine cannot run."""
    arch = str(f.require("general.architecture"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f.path, f"unknown architecture {arch!r}; this engine runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def whole(name: str, default: int | None = None, high: int = 1 << 24) -> int:
        return _whole_number(f, f"{arch}.{name}", default, high)

    def real(name: str, default: float) -> float:
        return _positive_real(f, f"{arch}.{name}", default)

    n_heads, hidden = whole("attention.head_count"), whole("embedding_length")
    n_kv_heads = whole("attention.head_count_kv", n_heads)
    head_dim = whole("attention.key_length", max(hidden // n_heads, 1))
    if n_heads % n_kv_heads:
        raise ModelFileError(f.path, f"bad head counts: {n_heads} query heads, {n_kv_heads} KV heads")
    if head_dim % 2:
        raise UnsupportedModelError(f.path, f"head dimension {head_dim} is odd; RoPE needs an even one")
    n_rot = whole("rope.dimension_count", head_dim)
    if n_rot != head_dim:
        raise UnsupportedModelError(f.path, f"partial RoPE ({n_rot} of {head_dim} dims) is not supported")
    scaling = str(f.get(f"{arch}.rope.scaling.type", "none"))
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(f.path, f"RoPE scaling {scaling!r} is not supported")
    embd_shape = f.tensor_shape(TOKEN_EMBD)
    if len(embd_shape) != 2:
        raise ModelFileError(
            f.path, f"tensor {TOKEN_EMBD!r} has shape {embd_shape}, expected (vocab, {hidden})"
        )
    return ModelConfig(
        architecture=arch,
        n_layers=whole("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        ffn_size=whole("feed_forward_length"),
        vocab_size=embd_shape[0],
        context_length=whole("context_length", 2048, high=MAX_CONTEXT_LENGTH),
        rope_theta=real("rope.freq_base", 10000.0),
        rms_eps=real("attention.layer_norm_rms_epsilon", 1e-5),
        rope_scale=real("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0,
        name=str(f.get("general.name", "")),
        sliding_window=whole("attention.sliding_window", 0) if ARCHITECTURES[arch].global_every else 0,
    )


def _whole_number(f: GgufFile, key: str, default: int | None, high: int) -> int:
    """A count from the metadata: a whole number in [1, high] (the key is required without a default)."""
    value = f.require(key) if default is None else f.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ModelFileError(f.path, f"metadata {key!r} = {value!r} is not a whole number in [1, {high:,}]")
    return value


def _positive_real(f: GgufFile, key: str, default: float) -> float:
    value = f.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ModelFileError(f.path, f"metadata {key!r} = {value!r} is not a finite number > 0")
    return float(value)
