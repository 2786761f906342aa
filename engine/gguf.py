"""Read a GGUF file: metadata, the model's config, float32 weights.

One table (``TENSOR_NAMES``) names every tensor the engine reads. Errors name the file and the
reason (not a GGUF file, truncated, unknown architecture, missing tensor, unsupported type), so the
app can show them as they are.

The header is parsed by ``gguf_header.read_header`` in one bounded pass: every declared count is
checked against the bytes left, and what the metadata becomes in memory is counted as it is made
(at most a few times the file's size). Tensors are views of one memory map of the file.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .architectures import ARCHITECTURES, Architecture
from .errors import ModelFileError, UnsupportedModelError
from .gguf_constants import GGMLQuantizationType, quant_shape_to_byte_shape
from .gguf_header import MAX_ARRAY_LENGTH as MAX_ARRAY_LENGTH  # re-exported: the array limit
from .gguf_header import TensorInfo, read_header

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
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
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
}


def _dequantizable(tensor_type: GGMLQuantizationType) -> bool:
    if tensor_type in _PLAIN_TYPES:
        return True
    import gguf.quants  # only here: loading a model never needs the package otherwise (gguf_constants.py)

    return tensor_type in gguf.quants._type_traits


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


class GgufFile:
    """An opened GGUF file: its metadata as Python values and its tensors (views of a memory map)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        _check_header(self.path)
        header = read_header(self.path)
        self.metadata: dict[str, Any] = header.metadata
        self._tensors: dict[str, TensorInfo] = header.tensors
        self._data_offset = header.data_offset
        self._byte_order = header.byte_order
        # a plain ndarray view of the map: slicing an np.memmap runs __array_finalize__ every time
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)

    @property
    def data_offset(self) -> int:
        """Where the tensor data starts: everything before is the header (metadata, tensor infos)."""
        return self._data_offset

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in NumPy order (rows = output features for a weight matrix)."""
        return tuple(reversed(self._require(name).dims))

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return self._require(name).tensor_type

    def _data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as stored: plain numbers in NumPy order, or (..., bytes per row) uint8."""
        raw = self._map[t.offset : t.offset + t.n_bytes]
        shape = tuple(reversed(t.dims))
        plain = _PLAIN_TYPES.get(t.tensor_type)
        if plain is not None:
            return raw.view(np.dtype(plain).newbyteorder(self._byte_order)).reshape(shape)
        return raw.reshape(quant_shape_to_byte_shape(shape, t.tensor_type))

    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 copy in NumPy order (for a weight matrix: (out_features, in_features))."""
        t = self._require(name)
        if not _dequantizable(t.tensor_type):
            raise UnsupportedModelError(
                self.path, f"tensor {name!r} has type {t.tensor_type.name}, which this engine cannot read"
            )
        shape = self.tensor_shape(name)
        data = self._data(t)
        if t.tensor_type in _PLAIN_TYPES:
            out = np.asarray(data, dtype=np.float32)
        else:
            import gguf  # imported by _dequantizable already

            out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.tensor_type))
        # a copy, never a view of the memory map: a weight that kept a view would keep every page of
        # the file resident for as long as the model lives
        return np.array(out.reshape(shape), dtype=np.float32, copy=True)

    def load_raw(self, name: str) -> np.ndarray:
        """A block-quantized tensor's bytes as stored: (rows, bytes per row) uint8, memory-mapped."""
        t = self._require(name)
        rows = self.tensor_shape(name)[0]
        return self._map[t.offset : t.offset + t.n_bytes].reshape(rows, -1)

    def _require(self, name: str) -> TensorInfo:
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
