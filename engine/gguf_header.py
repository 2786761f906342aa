"""One bounded pass over a GGUF file's header: its metadata as Python values and its tensor infos.

A model file comes from a download, so nothing in its header is trusted. Every declared count and
length is checked against the bytes left in the file before anything is read, and every value is
counted as it is materialized (the size of the Python object it becomes, and its slot in a list):
the whole parse may hold at most ``METADATA_BYTES_PER_FILE_BYTE`` times the file's size (plus a small
floor), never more than ``MAX_METADATA_BYTES``; past that the file is refused with "the file's
metadata is too large". An array is priced before it is read, so a file of 800k one-byte strings
is refused at once instead of parsed. Nested arrays, unknown value types, impossible shapes, tensor
data outside the file or off the alignment are refused with the reason and the place.

A real model's header is small beside its weights (SmolLM2's vocabulary and merges are ~3% of its
file, materialized): the bound only ever stops files made to exhaust memory.
"""

from __future__ import annotations

import math
import mmap
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ModelFileError, UnsupportedModelError
from .gguf_constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)
MAX_ARRAY_LENGTH = 1 << 22  # items in one metadata array (vocabularies hold 32k-260k tokens)
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
METADATA_BYTES_PER_FILE_BYTE = 3  # materialized metadata may take 3x the file's size...
METADATA_FLOOR_BYTES = 1 << 20  # ...plus 1 MiB (tiny test files)...
MAX_METADATA_BYTES = 512 << 20  # ...and never more than 512 MiB (a 262k vocabulary takes ~40 MiB)

_VT = GGUFValueType
_SCALAR_FORMATS: dict[int, str] = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d",
}  # fmt: skip
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset
_SLOT = 8  # a list's pointer to each item
_NUMBER_COST = _SLOT + 32  # a Python int or float and its slot (small ints are shared: counted anyway)
_STRING_COST = _SLOT + sys.getsizeof("")  # the least a string and its slot take
_TENSOR_INFO_COST = 400  # a TensorInfo, its dims tuple and its dict entry, besides the name
_ENTRY_COST = _STRING_COST + 32 + 32  # the least a metadata entry takes: its key, a value, a dict slot


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where a tensor's data is and how to read it."""

    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the row length (NumPy's shape is reversed)
    tensor_type: GGMLQuantizationType
    offset: int  # absolute: from the start of the file
    n_bytes: int


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    byte_order: Literal["<", ">"]  # ">": a file written on a big-endian machine
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int  # where the tensor data starts: everything before is the header


def read_header(path: Path) -> Header:
    """Parse the header of the GGUF file at ``path`` (magic already checked); ModelFileError says why
    not (UnsupportedModelError for a version or tensor type this engine cannot read)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _Parser(path, buf).parse()


class _Parser:
    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path, self.buf, self.size = path, buf, len(buf)
        self.pos = 4  # after the magic
        self.order: Literal["<", ">"] = "<"
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        self.budget = min(MAX_METADATA_BYTES, METADATA_BYTES_PER_FILE_BYTE * self.size + METADATA_FLOOR_BYTES)
        self.spent = 0  # bytes of Python objects made so far
        self.structs = {order + fmt: struct.Struct(order + fmt) for order in "<>" for fmt in "BbHhIiQqfd?"}

    def fail(self, reason: str, unsupported: bool = False) -> ModelFileError:
        return (UnsupportedModelError if unsupported else ModelFileError)(self.path, reason)

    # ``what`` names the thing being read; ``key``, when given, follows it (quoted): messages are only
    # formatted when they are raised (a header may hold hundreds of thousands of entries).
    def spend(self, n_bytes: int, what: str, key: str | None = None) -> None:
        """Count ``n_bytes`` of objects about to be made for ``what``; refuse past the budget."""
        if self.spent + n_bytes > self.budget:
            self.afford(n_bytes, what, key)
        self.spent += n_bytes

    def afford(self, n_bytes: int, what: str, key: str | None = None) -> None:
        """Refuse now if ``n_bytes`` more (the least that ``what`` will take) would pass the budget."""
        if self.spent + n_bytes > self.budget:
            rule = (
                f"{METADATA_BYTES_PER_FILE_BYTE}x its size + {METADATA_FLOOR_BYTES >> 20} MiB, "
                f"at most {MAX_METADATA_BYTES >> 20} MiB"
            )
            raise self.fail(
                f"the file's metadata is too large: {_named(what, key)} would take more than the "
                f"{self.budget:,} bytes of memory allowed for a {self.size:,}-byte file ({rule})"
            )

    def read(self, fmt: str, what: str, key: str | None = None) -> Any:
        unpacker = self.structs[self.order + fmt]
        if self.pos + unpacker.size > self.size:
            where = f"in {_named(what, key)}, at byte {self.pos:,}"
            raise self.fail(f"file is truncated: it ends inside the header ({where})")
        (value,) = unpacker.unpack_from(self.buf, self.pos)
        self.pos += unpacker.size
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

    def text(self, what: str, key: str | None = None) -> str:
        start = self.pos
        n = self.read("Q", f"the length of {what}", key)
        if n > self.size - self.pos:
            self.count(n, 1, f"{_named(what, key)} at byte {start:,}", "bytes")
        try:
            value = self.buf[self.pos : self.pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{_named(what, key)} at byte {start:,} is not valid UTF-8") from None
        self.pos += n
        self.spend(_SLOT + sys.getsizeof(value), what, key)
        return value

    # -- the header, top to bottom -----------------------------------------------------------
    def parse(self) -> Header:
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
        self.afford(n_kv * _ENTRY_COST, f"{n_kv:,} metadata entries")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.text("a metadata key")
            if key in metadata:
                raise self.fail(f"metadata key {key!r} appears twice")
            metadata[key] = self.value(self.read("I", "the type of", key), key)
        self.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "the header", "tensors")
        self.afford(n_tensors * (_TENSOR_INFO_COST + _STRING_COST), f"{n_tensors:,} tensors")
        infos = [self.tensor_info() for _ in range(n_tensors)]
        data_offset = -(-self.pos // self.alignment) * self.alignment
        tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            if name in tensors:
                raise self.fail(f"tensor {name!r} appears twice")
            if offset % self.alignment:  # llama.cpp refuses these too; the data would be read shifted
                raise self.fail(
                    f"tensor {name!r} starts at data offset {offset:,}, not a multiple of the file's "
                    f"alignment {self.alignment}"
                )
            tensors[name] = self.extent(name, dims, type_id, data_offset + offset)
        return Header(version, self.order, metadata, tensors, self.alignment, data_offset)

    def value(self, value_type: int, key: str) -> Any:
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is not None:
            self.spend(_NUMBER_COST, "the value of", key)
            value = self.read(fmt, "the value of", key)
            if key == "general.alignment":
                if value_type != _VT.UINT32 or value <= 0 or value & (value - 1):
                    raise self.fail(f"general.alignment = {value!r} is not a power of two (uint32)")
                self.alignment = value
            return value
        if value_type == _VT.STRING:
            return self.text("the value of", key)
        if value_type == _VT.ARRAY:
            return self.array(key)
        raise self.fail(f"metadata {key!r} has unknown type {value_type}")

    def array(self, key: str) -> list[Any]:
        item_type = self.read("I", "the item type of", key)
        n = self.read("Q", "the length of", key)
        item_fmt = _SCALAR_FORMATS.get(item_type)
        item_bytes = struct.calcsize(item_fmt) if item_fmt else 8
        self.count(n, item_bytes, f"metadata array {key!r}", "items", MAX_ARRAY_LENGTH)
        if item_fmt is not None:
            self.spend(n * _NUMBER_COST, f"metadata array {key!r} ({n:,} numbers)")
            dtype = np.dtype(self.order + item_fmt)
            values: list[Any] = np.frombuffer(self.buf, dtype, count=n, offset=self.pos).tolist()
            self.pos += n * item_bytes
            return values
        if item_type == _VT.STRING:
            self.spend(n * _STRING_COST, f"metadata array {key!r} ({n:,} strings)")  # priced before read
            return self.strings(n, key)
        if not n:
            return []
        what = "an array nested in an array" if item_type == _VT.ARRAY else f"unknown type {item_type}"
        raise self.fail(f"metadata {key!r} has {what}")

    def strings(self, n: int, key: str) -> list[str]:
        """n strings (a vocabulary: one tight loop); their least cost is already spent."""
        unpack, buf, pos, size = struct.Struct(self.order + "Q").unpack_from, self.buf, self.pos, self.size
        out: list[str] = []
        extra = 0  # bytes beyond each string's least cost
        for i in range(n):
            length = unpack(buf, pos)[0] if pos + 8 <= size else size  # past the end: fails below
            start, pos = pos + 8, pos + 8 + length
            if pos > size:
                raise self.fail(f"file is truncated: it ends inside item {i:,} of metadata array {key!r}")
            try:
                item = buf[start:pos].decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail(f"item {i:,} of metadata array {key!r} is not valid UTF-8") from None
            extra += sys.getsizeof(item) + _SLOT - _STRING_COST
            if extra > 1 << 20:  # count in steps: the budget is checked every MiB, not every string
                self.spend(extra, f"metadata array {key!r}")
                extra = 0
            out.append(item)
        self.spend(extra, f"metadata array {key!r}")
        self.pos = pos
        return out

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.text("a tensor name")
        self.spend(_TENSOR_INFO_COST, "tensor", name)
        n_dims = self.read("I", "the dimension count of tensor", name)
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_TENSOR_DIMS}")
        dims = tuple(self.read("Q", "the shape of tensor", name) for _ in range(n_dims))
        if not all(0 < d < 1 << 63 for d in dims):
            raise self.fail(f"tensor {name!r} has an impossible shape {list(dims)}")
        type_id = self.read("I", "the type of tensor", name)
        return name, dims, type_id, self.read("Q", "the data offset of tensor", name)

    def extent(self, name: str, dims: tuple[int, ...], type_id: int, start: int) -> TensorInfo:
        try:
            tensor_type = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[tensor_type]
        except (ValueError, KeyError):
            raise self.fail(f"tensor {name!r} has unknown type id {type_id}", unsupported=True) from None
        if dims[0] % block:
            raise self.fail(
                f"tensor {name!r} has rows of {dims[0]} values, not a multiple of the {tensor_type.name} "
                f"block size {block}"
            )
        n_bytes = math.prod(dims) * type_size // block
        if start + n_bytes > self.size:
            raise self.fail(
                f"file is truncated: tensor {name!r} needs bytes up to {start + n_bytes:,} but the file "
                f"has {self.size:,}"
            )
        return TensorInfo(name, dims, tensor_type, start, n_bytes)


def _named(what: str, key: str | None) -> str:
    return what if key is None else f"{what} {key!r}"
