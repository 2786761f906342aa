"""The GGUF format's numbers the engine reads a file with: tensor types and their block sizes, metadata
value types, the default alignment, the recommended-sampling keys.

They are the format's own (ggml.h, gguf.h; the names are those of the ``gguf`` package, version 0.19),
written here so that opening and loading a model never imports that package: it costs ~6 MiB of
resident memory and pulls in PyYAML (and SentencePiece with its OpenMP runtime when installed). The
package is imported only where its NumPy dequantization is needed (``GgufFile.load`` of a tensor type
the engine does not keep as blocks); a test checks that these tables agree with it.
"""

from __future__ import annotations

from enum import IntEnum

GGUF_DEFAULT_ALIGNMENT = 32  # bytes, when the file has no general.alignment
QK_K = 256  # values per K-quant super-block


class GGMLQuantizationType(IntEnum):
    """A tensor's type id (ggml's ``ggml_type``); the ids missing here were removed from ggml."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_T = GGMLQuantizationType
# type -> (values per block, bytes per block)
GGML_QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    _T.F32: (1, 4),
    _T.F16: (1, 2),
    _T.Q4_0: (32, 2 + 16),
    _T.Q4_1: (32, 2 + 2 + 16),
    _T.Q5_0: (32, 2 + 4 + 16),
    _T.Q5_1: (32, 2 + 2 + 4 + 16),
    _T.Q8_0: (32, 2 + 32),
    _T.Q8_1: (32, 4 + 4 + 32),
    _T.Q2_K: (256, 2 + 2 + QK_K // 16 + QK_K // 4),
    _T.Q3_K: (256, 2 + QK_K // 4 + QK_K // 8 + 12),
    _T.Q4_K: (256, 2 + 2 + QK_K // 2 + 12),
    _T.Q5_K: (256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    _T.Q6_K: (256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    _T.Q8_K: (256, 4 + QK_K + QK_K // 8),
    _T.IQ2_XXS: (256, 2 + QK_K // 4),
    _T.IQ2_XS: (256, 2 + QK_K // 4 + QK_K // 32),
    _T.IQ3_XXS: (256, 2 + QK_K // 4 + QK_K // 8),
    _T.IQ1_S: (256, 2 + QK_K // 8 + QK_K // 16),
    _T.IQ4_NL: (32, 2 + 16),
    _T.IQ3_S: (256, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    _T.IQ2_S: (256, 2 + QK_K // 4 + QK_K // 16),
    _T.IQ4_XS: (256, 2 + 2 + QK_K // 2 + QK_K // 64),
    _T.I8: (1, 1),
    _T.I16: (1, 2),
    _T.I32: (1, 4),
    _T.I64: (1, 8),
    _T.F64: (1, 8),
    _T.IQ1_M: (256, QK_K // 8 + QK_K // 16 + QK_K // 32),
    _T.BF16: (1, 2),
    _T.TQ1_0: (256, 2 + 4 * 13),
    _T.TQ2_0: (256, 2 + 64),
    _T.MXFP4: (32, 1 + 16),
    _T.NVFP4: (64, 4 + 32),
    _T.Q1_0: (128, 2 + 16),
}


class GGUFValueType(IntEnum):
    """A metadata value's type id."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# The publisher's recommended sampling settings (llama.cpp's general.sampling.* keys)
SAMPLING_TEMP = "general.sampling.temp"
SAMPLING_TOP_K = "general.sampling.top_k"
SAMPLING_TOP_P = "general.sampling.top_p"
SAMPLING_MIN_P = "general.sampling.min_p"
SAMPLING_PENALTY_REPEAT = "general.sampling.penalty_repeat"


def quant_shape_to_byte_shape(shape: tuple[int, ...], tensor_type: GGMLQuantizationType) -> tuple[int, ...]:
    """A tensor's shape in values (NumPy order) -> the shape of its bytes (rows of whole blocks)."""
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    if shape[-1] % block_size:
        raise ValueError(
            f"Quantized tensor row size ({shape[-1]}) is not a multiple of {tensor_type.name} block size "
            f"({block_size})"
        )
    return (*shape[:-1], shape[-1] // block_size * type_size)
