"""The kernel layer against references: blocks unpacked from real GGUF bytes equal the `gguf`
package's own dequantization; ``linear()`` on every path equals a float64 product of the same
weights; the numba path and the NumPy path give the same model on every tensor type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from engine import Model, kernels
from engine.gguf import GgufFile
from engine.kernels import BlockWeight, DenseWeight, linear
from engine.kernels import weights as kw
from tests.engine.conftest import rel_diff
from tests.fixtures.tiny_model import WEIGHT_TYPES, write_tiny_gguf

BLOCK_TYPE_NAMES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
IDS = [1, 5, 9, 3, 7, 2, 11, 4]

needs_numba = pytest.mark.skipif(kernels.backend("auto") != "numba", reason="numba is not installed")


def random_blocks(type_name: str, shape: tuple[int, int], seed: int = 0) -> BlockWeight:
    """A matrix quantized by the `gguf` package itself, unpacked by the engine."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape, dtype=np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(w, qtype)  # (O, bytes per row) uint8, the file's own layout
    return kw.blocks_from_gguf(qtype, raw, shape)


@pytest.mark.parametrize("type_name", BLOCK_TYPE_NAMES)
def test_blocks_unpack_to_the_gguf_packages_values(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 96), dtype=np.float32)
    raw = gguf.quants.quantize(w, qtype)
    blocks = kw.blocks_from_gguf(qtype, raw, w.shape)
    expected = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
    np.testing.assert_allclose(blocks.dequantize(), expected, rtol=1e-6, atol=1e-7)
    assert blocks.q.dtype == np.int8 and (blocks.m is not None) == type_name.endswith("_1")
    assert blocks.nbytes < w.nbytes / 2.5  # int8 values + a float32 scale (and minimum) per 32


@needs_numba
@pytest.mark.parametrize("type_name", BLOCK_TYPE_NAMES)
@pytest.mark.parametrize("n_rows", [1, 2, 3, 4, 5, 7, 8, 11, 16, 17, 40])
def test_linear_on_blocks_equals_the_dequantized_product(type_name, n_rows):
    w = random_blocks(type_name, (200, 128), seed=n_rows)
    x = np.random.default_rng(n_rows).standard_normal((n_rows, 128), dtype=np.float32)
    expected = x.astype(np.float64) @ w.dequantize().astype(np.float64).T  # (N, O)
    y = linear(x, w)
    assert y.shape == (n_rows, 200) and y.dtype == np.float32
    assert rel_diff(y, expected) < 2e-6


@needs_numba
def test_linear_tiles_a_large_matrix_and_accepts_strided_rows(monkeypatch):
    monkeypatch.setattr(kernels, "TILE_VALUES", 64 * 128)  # 64 rows a tile: 200 rows take four tiles
    w = random_blocks("Q4_1", (200, 128))
    x = np.random.default_rng(2).standard_normal((40, 256), dtype=np.float32)[:, ::2]  # not contiguous
    expected = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    assert rel_diff(linear(x, w), expected) < 2e-6
    assert rel_diff(linear(x[:3], w), expected[:3]) < 2e-6


def test_dense_weight_is_plain_matmul():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((30, 20), dtype=np.float32)
    x = rng.standard_normal((5, 20), dtype=np.float32)
    for dense in (kw.finish(w), kw.finish(w, transposed_view=True)):
        assert isinstance(dense, DenseWeight) and dense.shape == (30, 20)
        np.testing.assert_allclose(linear(x, dense), x @ w.T, rtol=1e-6)


def test_assembly_reorders_scales_and_fuses_rows():
    a, b = random_blocks("Q4_1", (64, 64), 4), random_blocks("Q8_0", (32, 64), 5)
    order = np.random.default_rng(6).permutation(64)
    fused = kw.concat_rows([kw.scale_rows(kw.take_rows(a, order), 0.125), b])
    assert isinstance(fused, BlockWeight) and fused.m is not None  # Q8_0's rows get a zero minimum
    expected = np.concatenate([a.dequantize()[order] * np.float32(0.125), b.dequantize()])
    np.testing.assert_allclose(fused.dequantize(), expected, rtol=1e-6, atol=1e-7)
    mixed = kw.concat_rows([a, np.ones((2, 64), dtype=np.float32)])  # a float32 part: all float32
    assert isinstance(mixed, np.ndarray) and mixed.shape == (66, 64)


def test_backend_choice(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numpy")
    assert kernels.backend() == "numpy"
    assert kernels.backend("numpy") == "numpy"
    monkeypatch.setenv(kernels.KERNELS_ENV, "fortran")
    with pytest.raises(ValueError, match="SMALLMIND_KERNELS='fortran'"):
        kernels.backend()


@needs_numba
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_numba_and_numpy_paths_give_the_same_model(tmp_path, weight_type):
    path = write_tiny_gguf(tmp_path / f"{weight_type}.gguf", weight_type=weight_type, seed=7)
    fast, reference = Model.from_gguf(path, kernel_path="numba"), Model.from_gguf(path, kernel_path="numpy")
    assert reference.weights.kernels == "numpy" and fast.weights.kernels == "numba"
    if weight_type in BLOCK_TYPE_NAMES:  # kept quantized: a quarter of float32's bytes or less
        assert isinstance(fast.weights.layers[0].w_gate_up, BlockWeight)
        assert fast.weights.nbytes < reference.weights.nbytes / 2.5
    assert rel_diff(fast.forward(IDS), reference.forward(IDS)) < 1e-5  # prefill: the tiled BLAS path
    caches = [fast.new_cache(64), reference.new_cache(64)]
    outputs: list[list[int]] = [[], []]
    for model, cache, out in zip((fast, reference), caches, outputs, strict=True):
        logits = model.forward(IDS, cache)[-1]
        for _ in range(12):  # decode: the JIT kernels at one row
            out.append(int(np.argmax(logits)))
            logits = model.forward([out[-1]], cache)[-1]
    assert outputs[0] == outputs[1]


@needs_numba
@pytest.mark.smollm2
def test_smollm2_numba_and_numpy_paths_agree(smollm2, smollm2_path, reference_prompts):
    model, _ = smollm2
    assert model.weights.kernels == kernels.backend()
    reference = Model.from_gguf(GgufFile(smollm2_path), kernel_path="numpy")
    fast = model if model.weights.kernels == "numba" else Model.from_gguf(smollm2_path, kernel_path="numba")
    assert fast.weights.nbytes < reference.weights.nbytes / 3  # Q4_1/Q8_0 blocks vs float32
    ids = reference_prompts[4]["input_ids"]
    assert rel_diff(fast.forward(ids), reference.forward(ids)) < 1e-4


def test_thread_count_auto_fixed_and_invalid():
    try:
        assert kernels.set_threads(1) == 1 and kernels.threads() == 1
        assert kernels.set_threads(kernels.MAX_THREADS) == kernels.available_cpus()  # capped by the cores
        assert kernels.set_threads(0) >= 1 and kernels.requested_threads() == 0
        for bad in (-1, kernels.MAX_THREADS + 1, 1.5, True):
            with pytest.raises(ValueError, match="cpu_threads"):
                kernels.set_threads(bad)  # type: ignore[arg-type]
    finally:
        kernels.set_threads(0)


def test_busy_neighbour_lowers_the_automatic_thread_count():
    """A process spinning on every core but one leaves the engine one thread fewer (Linux only)."""
    import subprocess
    import sys
    import time

    from engine.kernels import cpu

    cpus = kernels.available_cpus()
    if cpus < 2 or cpu._LoadMonitor._system_busy_s() is None:
        pytest.skip("needs 2+ cores and /proc/stat")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        kernels.set_threads(0)
        deadline = time.monotonic() + 20
        count = kernels.threads()
        while count == cpus and time.monotonic() < deadline:  # bounded; a reading needs one interval
            time.sleep(cpu._LoadMonitor.INTERVAL_S + 0.1)
            count = kernels.threads()
        assert count < cpus, (count, cpu._load.busy)
        kernels.set_threads(cpus)
        assert kernels.threads() == cpus  # a fixed count is kept however busy the machine is
    finally:
        kernels.set_threads(0)
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=10)


K_QUANTS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of each super-block's f16 scales


def random_k_quant(type_name: str, shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random K-quant bytes with finite scales (the gguf package cannot quantize K-quants), and the
    float32 values the package's own dequantization reads from them."""
    qtype = gguf.GGMLQuantizationType[type_name]
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n_out, K = shape
    raw = rng.integers(0, 256, (n_out, K // 256, block_bytes), dtype=np.uint8)
    for offset in K_QUANTS[type_name]:
        scale = (rng.random((n_out, K // 256)) * 0.05 + 0.001).astype(np.float16)
        raw[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(n_out, K // 256, 2)
    raw = raw.reshape(n_out, -1)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(shape)


@pytest.mark.parametrize("type_name", list(K_QUANTS))
def test_k_quants_unpack_to_the_gguf_packages_values(type_name):
    raw, expected = random_k_quant(type_name, (24, 512))
    blocks = kw.blocks_from_gguf(gguf.GGMLQuantizationType[type_name], raw, (24, 512))
    assert blocks.block == (16 if type_name == "Q6_K" else 32)
    np.testing.assert_allclose(blocks.dequantize(), expected, rtol=2e-6, atol=1e-6)


@needs_numba
@pytest.mark.parametrize("type_name", list(K_QUANTS))
@pytest.mark.parametrize("n_rows", [1, 3, 8, 17])
def test_linear_on_k_quants_equals_the_dequantized_product(type_name, n_rows):
    raw, dense = random_k_quant(type_name, (40, 512), seed=n_rows)
    w = kw.blocks_from_gguf(gguf.GGMLQuantizationType[type_name], raw, (40, 512))
    x = np.random.default_rng(n_rows).standard_normal((n_rows, 512), dtype=np.float32)
    expected = x.astype(np.float64) @ dense.astype(np.float64).T
    assert rel_diff(linear(x, w), expected) < 2e-6


def test_mixed_block_sizes_fuse_into_the_smaller_blocks():
    raw, dense6 = random_k_quant("Q6_K", (16, 256))
    q6 = kw.blocks_from_gguf(gguf.GGMLQuantizationType.Q6_K, raw, (16, 256))
    q4 = random_blocks("Q4_1", (8, 256), seed=9)
    fused = kw.concat_rows([q4, q6])
    assert isinstance(fused, BlockWeight) and fused.block == 16
    np.testing.assert_allclose(
        fused.dequantize(), np.concatenate([q4.dequantize(), dense6]), rtol=2e-6, atol=1e-6
    )


@needs_numba
@pytest.mark.parametrize("name", ["matvec_1", "matvec_8"])
def test_kernel_inner_loops_are_vectorized(name):
    """A guard against the regression found by the benchmark: a runtime block shift (d[o, j >> sh])
    compiled the inner loop to scalar code, 7x slower. Vectorized code is mostly packed float ops
    (`mulps`, `vfmadd...ps`); the scalar one mostly `...ss` (measured 124 packed / 28 scalar for
    matvec_1 as it is, 18 / 30 with the runtime shift)."""
    import re

    import numba

    from engine.kernels import jit

    # compiled afresh (code loaded from numba's disk cache cannot be inspected), with the same options
    kernel = numba.njit(fastmath=jit.FASTMATH, boundscheck=False, parallel=True)(getattr(jit, name).py_func)
    w = random_blocks("Q8_0", (8, 64))
    x = np.ones((8 if name == "matvec_8" else 1, 64), dtype=np.float32)
    empty = np.empty((0, 0), dtype=np.float32)
    kernel(x, empty, w.q, w.d, empty, np.empty((x.shape[0], 8), dtype=np.float32))
    asm = "\n".join(kernel.inspect_asm().values())
    packed = len(re.findall(r"\bv?(?:fmadd\w*|mul|add)ps\b", asm))
    scalar = len(re.findall(r"\bv?(?:fmadd\w*|mul|add)ss\b", asm))
    assert packed > 2 * scalar, (packed, scalar)
