"""Every way a model file can be wrong gets a clear error naming the file and the reason."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from engine import Model, ModelFileError, Tokenizer, UnsupportedModelError
from engine.gguf import GgufFile
from tests.fixtures.tiny_model import rewrite_gguf, write_tiny_gguf


def load(path: Path) -> Model:
    return Model.from_gguf(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="directory"):
        load(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty") as info:
        load(path)
    assert str(path) in str(info.value)


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load(path)


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.05, 0.3, 0.9, 0.999])
def test_truncated_file(tiny_model_path, tmp_path, fraction):
    data = tiny_model_path.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * fraction))])
    with pytest.raises(ModelFileError, match=r"truncated|ends inside|cannot parse|shorter") as info:
        load(path)
    assert str(path) in str(info.value)


def test_unknown_architecture_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", extra_metadata={"general.architecture": "mamba"})
    with pytest.raises(UnsupportedModelError, match="'mamba'"):
        load(path)


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", omit_tensors=["blk.1.ffn_up.weight"])
    with pytest.raises(ModelFileError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'"):
        load(path)


def test_missing_metadata_key_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", extra_metadata={"llama.block_count": None})
    with pytest.raises(ModelFileError, match=r"llama\.block_count"):
        load(path)


def _rewrite_tensor(src: Path, dst: Path, name: str, data: np.ndarray, raw_dtype=None) -> Path:
    return rewrite_gguf(src, dst, replace={name: data}, raw_dtype=raw_dtype)


def test_wrong_tensor_shape(tiny_model_path, tmp_path):
    bad = np.zeros((64, 60), dtype=np.float32)
    path = _rewrite_tensor(tiny_model_path, tmp_path / "shape.gguf", "blk.0.attn_q.weight", bad)
    with pytest.raises(ModelFileError, match=r"blk\.0\.attn_q\.weight.*shape"):
        load(path)


def test_unsupported_tensor_type(tiny_model_path, tmp_path):
    ints = np.zeros((64, 64), dtype=np.int32)
    path = _rewrite_tensor(tiny_model_path, tmp_path / "type.gguf", "blk.0.attn_q.weight", ints)
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q\.weight.*I32"):
        load(path)


def test_k_quant_tensors_dequantize_through_the_loader(tiny_model_path, tmp_path):
    """K-quants cannot be written by the gguf package, so raw blocks go in and must come out as the
    package's own dequantization, shaped (out, in)."""
    qtype = gguf.GGMLQuantizationType.Q6_K
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 255, size=(4, 256 // block * size), dtype=np.uint8)
    raw[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # a sane block scale
    path = _rewrite_tensor(tiny_model_path, tmp_path / "k.gguf", "blk.0.attn_q.weight", raw, raw_dtype=qtype)
    f = GgufFile(path)
    out = f.load("blk.0.attn_q.weight")
    assert out.shape == (4, 256) and out.dtype == np.float32
    np.testing.assert_array_equal(out, gguf.quants.dequantize(raw, qtype).reshape(4, 256))


def test_unsupported_tokenizer_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tokenizer_model="bert")
    with pytest.raises(UnsupportedModelError, match="bert"):
        Tokenizer.from_gguf(path)
