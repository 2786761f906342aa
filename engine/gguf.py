"""Read a GGUF file with the `gguf` package: metadata, the model's config, float32 weights.

One table (``TENSOR_NAMES``) names every tensor the engine reads. Errors name the file and the
reason (not a GGUF file, truncated, unknown architecture, missing tensor, unsupported type), so the
app can show them as they are.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import ModelFileError, UnsupportedModelError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

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
    """Hyper-parameters of a Llama-architecture model, read from GGUF metadata."""

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
        try:
            self._reader = _PlainArrayReader(self.path)
        except (ValueError, IndexError, KeyError, OverflowError, TypeError) as exc:
            raise ModelFileError(self.path, f"cannot parse the GGUF header: {_describe(exc)}") from exc
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise ModelFileError(self.path, f"metadata field {key!r} is unreadable: {exc}") from exc
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
        """The tensor as float32 in NumPy order (for a weight matrix: (out_features, in_features))."""
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
        return out.reshape(shape).astype(np.float32, copy=False)

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
    if head[:4] != GGUF_MAGIC:
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

    def key(name: str) -> str:
        return f"{arch}.{name}"

    n_heads = int(f.require(key("attention.head_count")))
    hidden = int(f.require(key("embedding_length")))
    n_kv_heads = int(f.get(key("attention.head_count_kv"), n_heads))
    head_dim = int(f.get(key("attention.key_length"), hidden // max(n_heads, 1)))
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ModelFileError(f.path, f"bad head counts: {n_heads} query heads, {n_kv_heads} KV heads")
    if head_dim % 2:
        raise UnsupportedModelError(f.path, f"head dimension {head_dim} is odd; RoPE needs an even one")
    n_rot = int(f.get(key("rope.dimension_count"), head_dim))
    if n_rot != head_dim:
        raise UnsupportedModelError(f.path, f"partial RoPE ({n_rot} of {head_dim} dims) is not supported")
    scaling = str(f.get(key("rope.scaling.type"), "none"))
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(f.path, f"RoPE scaling {scaling!r} is not supported")
    rope_scale = float(f.get(key("rope.scaling.factor"), 1.0)) if scaling == "linear" else 1.0
    vocab_size = int(f.tensor_shape(TOKEN_EMBD)[0])
    return ModelConfig(
        architecture=arch,
        n_layers=int(f.require(key("block_count"))),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        ffn_size=int(f.require(key("feed_forward_length"))),
        vocab_size=vocab_size,
        context_length=int(f.get(key("context_length"), 2048)),
        rope_theta=float(f.get(key("rope.freq_base"), 10000.0)),
        rms_eps=float(f.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        rope_scale=rope_scale or 1.0,
        name=str(f.get("general.name", "")),
    )
