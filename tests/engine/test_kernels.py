"""The kernel layer against references: blocks unpacked from real GGUF bytes equal the `gguf`
package's own dequantization, and so do the panels they are packed into; ``linear()`` on every path
equals a float64 product of the same weights; the numba path and the NumPy path give the same model
on every tensor type; the kernels compile to packed SIMD code for AVX2 and AVX-512 CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine import Model, kernels
from engine.gguf import GgufFile
from engine.kernels import BlockWeight, DenseWeight, PackedWeight, linear
from engine.kernels import weights as kw
from tests.engine.conftest import rel_diff
from tests.fixtures.tiny_model import WEIGHT_TYPES, write_tiny_gguf

BLOCK_TYPE_NAMES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
IDS = [1, 5, 9, 3, 7, 2, 11, 4]
REPO_ROOT = Path(__file__).resolve().parents[2]

needs_numba = pytest.mark.skipif(kernels.backend("auto") != "numba", reason="numba is not installed")


def random_blocks(type_name: str, shape: tuple[int, int], seed: int = 0) -> BlockWeight:
    """A matrix quantized by the `gguf` package itself, unpacked by the engine."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape, dtype=np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(w, qtype)  # (O, bytes per row) uint8, the file's own layout
    return kw.blocks_from_gguf(qtype, raw, shape)


def random_packed(type_name: str, shape: tuple[int, int], seed: int = 0) -> PackedWeight:
    packed = kw.finish(random_blocks(type_name, shape, seed))
    assert isinstance(packed, PackedWeight)
    return packed


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
    packed = kw.finish(blocks)
    assert isinstance(packed, PackedWeight)
    np.testing.assert_array_equal(packed.dequantize(), blocks.dequantize())
    np.testing.assert_array_equal(packed.dequantize(np.array([47, 0, 5])), blocks.dequantize()[[47, 0, 5]])
    assert packed.nbytes == raw.nbytes  # the file's own bits: the same bytes, in panels


@needs_numba
@pytest.mark.parametrize("type_name", BLOCK_TYPE_NAMES)
@pytest.mark.parametrize("n_rows", [1, 2, 3, 4, 5, 7, 8, 11, 16, 17, 40])
def test_linear_on_blocks_equals_the_dequantized_product(type_name, n_rows):
    w = random_packed(type_name, (200, 128), seed=n_rows)  # 200 rows: the last panel half padding
    x = np.random.default_rng(n_rows).standard_normal((n_rows, 128), dtype=np.float32)
    expected = x.astype(np.float64) @ w.dequantize().astype(np.float64).T  # (N, O)
    y = linear(x, w)
    assert y.shape == (n_rows, 200) and y.dtype == np.float32
    assert rel_diff(y, expected) < 2e-6


@needs_numba
def test_linear_tiles_a_large_matrix_and_accepts_strided_rows(monkeypatch):
    monkeypatch.setattr(kernels, "TILE_VALUES", 64 * 128)  # 64 rows a tile: 200 rows take four tiles
    w = random_packed("Q4_1", (200, 128))
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
    a, b = random_blocks("Q4_1", (64, 64), 4), random_blocks("Q4_0", (32, 64), 5)
    c = random_blocks("Q8_0", (48, 64), 6)
    order = np.random.default_rng(6).permutation(64)
    q = kw.scale_rows(kw.take_rows(a, order), 0.125)
    fused = kw.concat_rows([q, random_blocks("Q4_1", (16, 64), 7)])
    assert isinstance(fused, BlockWeight) and fused.shape == (80, 64)  # one layout: merged
    mixed = kw.concat_rows([q, b, c])  # three layouts: three parts of one matrix
    assert isinstance(mixed, tuple) and len(mixed) == 3
    packed = kw.finish(mixed)
    assert isinstance(packed, PackedWeight) and packed.shape == (144, 64)
    assert packed.parts[0].d.dtype == np.uint16  # scaled by a power of two: still exact in float16
    expected = np.concatenate([a.dequantize()[order] * np.float32(0.125), b.dequantize(), c.dequantize()])
    np.testing.assert_allclose(packed.dequantize(), expected, rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(8).standard_normal((3, 64), dtype=np.float32)
    if kernels.backend("auto") == "numba":
        assert rel_diff(linear(x, packed), x.astype(np.float64) @ expected.T) < 2e-6
    scaled = kw.finish(kw.scale_rows(a, 1 / np.sqrt(128)))  # not a power of two: float32 scales
    assert isinstance(scaled, PackedWeight) and scaled.parts[0].d.dtype == np.float32
    np.testing.assert_allclose(
        scaled.dequantize(), a.dequantize() * np.float32(1 / np.sqrt(128)), rtol=1e-6, atol=1e-7
    )
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
    if weight_type in BLOCK_TYPE_NAMES:  # kept in the file's bits
        assert isinstance(fast.weights.layers[0].w_gate_up, PackedWeight)
        assert fast.weights.nbytes < reference.weights.nbytes / 3.5
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
    assert fast.weights.nbytes < smollm2_path.stat().st_size  # the file's Q4_1/Q8_0 bits, in panels
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
    w = kw.finish(kw.blocks_from_gguf(gguf.GGMLQuantizationType[type_name], raw, (40, 512)))
    assert isinstance(w, PackedWeight)
    np.testing.assert_allclose(w.dequantize(), dense, rtol=2e-6, atol=1e-6)
    x = np.random.default_rng(n_rows).standard_normal((n_rows, 512), dtype=np.float32)
    expected = x.astype(np.float64) @ dense.astype(np.float64).T
    assert rel_diff(linear(x, w), expected) < 2e-6


def test_mixed_block_sizes_fuse_as_parts():
    raw, dense6 = random_k_quant("Q6_K", (16, 256))
    q6 = kw.blocks_from_gguf(gguf.GGMLQuantizationType.Q6_K, raw, (16, 256))
    q4 = random_blocks("Q4_1", (32, 256), seed=9)
    fused = kw.finish(kw.concat_rows([q4, q6]))
    assert isinstance(fused, PackedWeight) and [p.block for p in fused.parts] == [32, 16]
    expected = np.concatenate([q4.dequantize(), dense6])
    np.testing.assert_allclose(fused.dequantize(), expected, rtol=2e-6, atol=1e-6)
    uneven = kw.finish(kw.concat_rows([random_blocks("Q4_1", (8, 256)), q6]))  # a part of 8 rows:
    assert isinstance(uneven, DenseWeight)  # panels would leave a gap, so float32


ASM_PROBE = """
import json, re, sys
import numpy as np
from engine.kernels import quant
from engine.kernels import weights as kw

q = np.random.default_rng(0).integers(-16, 16, (16, 64), dtype=np.int8)
part = kw.pack(kw.BlockWeight(q, np.ones((16, 2), np.float32), None, 5, -16))  # Q5_0: nibbles + high bits
x = np.ones((8, 64), dtype=np.float32)
quant.gemv(x, x.reshape(8, 2, 32).sum(-1), *part.arrays(), np.empty((8, 16), np.float32), 0, 0, 1, 8)
asm = "\\n".join(quant.gemv.inspect_asm().values())

# the code built for this target, run with the tiles its registers hold, against the float64 product
from engine import kernels
rng = np.random.default_rng(1)
w = kw.BlockWeight(rng.integers(-16, 16, (32, 128), dtype=np.int8),
                   rng.uniform(0.5, 1.5, (32, 4)).astype(np.float32), None, 5, -16)
dense = w.dequantize().astype(np.float64)
arrays = kw.pack(w).arrays()
errors = {}
for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64):
    xr = rng.standard_normal((n, 128)).astype(np.float32)
    got = np.empty((n, 32), np.float32)
    quant.gemv(xr, xr.reshape(n, 4, 32).sum(-1), *arrays, got, 0, 0, 2, kernels._max_tile())
    want = xr.astype(np.float64) @ dense.T
    errors[n] = float(np.abs(got - want).max() / np.abs(want).max())
count = lambda pattern: len(re.findall(pattern, asm))
print(json.dumps({
    "fma": {r: count(rf"vfmadd\\w+ps\\s[^\\n]*{r}") for r in ("xmm", "ymm", "zmm")},
    "broadcast_fma": count(r"vfmadd\\w+ps\\s[^\\n]*\\{1to16\\}"),
    "scalar_math": count(r"v(?:fmadd\\w*|mul|add)ss"),
    "gathers": count(r"gather"),
    "widened_bytes": count(r"vpmov[zs]xbd"),
    "max_tile": kernels._max_tile(),
    "errors": errors,
}))
"""


@needs_numba
@pytest.mark.parametrize(
    ("cpu", "features", "register"), [("haswell", "-avx512f", "ymm"), ("skylake-avx512", "+avx512f", "zmm")]
)
def test_kernel_compiles_to_packed_simd_for_avx2_and_avx512(tmp_path, cpu, features, register):
    """The tiled kernel compiled for a named CPU (in a subprocess: numba's target is process-wide):
    every FMA is packed, on the widest registers the CPU has (two ymm per 16-lane vector on AVX2,
    one zmm on AVX-512, where the activation is broadcast from memory inside the FMA); bytes are
    widened in registers; nothing is gathered and no arithmetic is scalar. The code built for
    the target then runs at 1..64 rows with the row tiles it picks there and equals the float64 product."""
    import json
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "NUMBA_CPU_NAME": cpu,
        "NUMBA_CPU_FEATURES": features,
        "NUMBA_CACHE_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", ASM_PROBE], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    others = [r for r in ("xmm", "ymm", "zmm") if r != register]
    assert counts["fma"][register] >= 40 and all(counts["fma"][r] == 0 for r in others), counts
    assert counts["widened_bytes"] > 0 and counts["gathers"] == 0 and counts["scalar_math"] == 0, counts
    if register == "zmm":
        assert counts["broadcast_fma"] >= 8, counts  # x[r, c] folded into the FMA as {1to16}
    assert counts["max_tile"] == (8 if register == "zmm" else 4), counts  # as many rows as its registers hold
    assert max(counts["errors"].values()) < 1e-5, counts  # the code runs right on this target


@needs_numba
def test_calibration_is_measured_once_per_cpu_and_applied(tmp_path):
    """The crossover between the kernel and expand + BLAS is measured on a real matrix, kept in the
    cache file under this CPU's name, read back instead of measured again, and used by linear()."""
    import json

    from engine.kernels import calibration as calibrate

    w = random_packed("Q4_1", (1024, 256))
    cache = tmp_path / "calibration.json"
    rows = calibrate.kernel_rows(w, kernels._small_alone, kernels._large_alone, cache)
    assert rows >= calibrate.DECODE_ROWS
    saved = json.loads(cache.read_text())
    key = calibrate.key(w)
    assert calibrate.cpu_name() in key and saved[key]["kernel_rows"] == rows
    assert min(saved[key]["thread_cpu_ms"]["24"]) > 0  # the kernel's and BLAS's times at 24 rows
    saved[key]["kernel_rows"] = 40
    cache.write_text(json.dumps(saved))
    assert calibrate.kernel_rows(w, kernels._small_alone, kernels._large_alone, cache) == 40  # read back
    w.use_kernel_up_to(40)
    x = np.random.default_rng(3).standard_normal((41, 256), dtype=np.float32)
    expected = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    assert rel_diff(linear(x[:40], w), expected[:40]) < 2e-6  # the kernel at 40 rows
    assert rel_diff(linear(x, w), expected) < 2e-6  # expand + BLAS at 41


@needs_numba
def test_a_models_first_large_step_calibrates_all_its_matrices(tmp_path, monkeypatch):
    """Nothing is measured at load (resident memory after load stays free of BLAS's buffers); the
    first step of more than 16 rows runs the calibration once, for every packed matrix."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))  # the calibration file only: numba has its own
    path = write_tiny_gguf(tmp_path / "q41.gguf", weight_type="Q4_1", seed=3)
    model = Model.from_gguf(path, kernel_path="numba")
    layer = model.weights.layers[0]
    group = layer.w_gate_up.calibration
    assert group is not None and group.pending and not (tmp_path / "calibration.json").exists()
    assert all(m.calibration is group for m in (layer.wqkv, layer.wo, layer.w_down))
    model.forward(list(range(1, 9)))  # 8 rows: no calibration
    assert group.pending
    model.forward(list(range(1, 30)))  # 29 rows
    assert not group.pending and (tmp_path / "calibration.json").exists()
    rows = layer.w_gate_up.kernel_rows
    assert rows >= 16 and all(m.kernel_rows == rows for m in (layer.wqkv, layer.wo, layer.w_down))


@needs_numba
@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q5_0", "Q6_K"])
def test_kernel_at_prefill_sizes_equals_the_dequantized_product(type_name):
    """Chunks of 64+ rows take the kernel's dense path (panel pairs dequantized whole) when the
    calibration says so: 67 rows (eight groups of 8, then 3) over an odd number of panels."""
    if type_name == "Q6_K":
        raw, _ = random_k_quant("Q6_K", (208, 256), seed=4)
        w = kw.finish(kw.blocks_from_gguf(gguf.GGMLQuantizationType.Q6_K, raw, (208, 256)))
    else:
        w = random_packed(type_name, (208, 256), seed=4)  # 13 panels
    assert isinstance(w, PackedWeight)
    w.use_kernel_up_to(256)
    x = np.random.default_rng(5).standard_normal((67, 256), dtype=np.float32)
    expected = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    assert rel_diff(linear(x, w), expected) < 2e-6


def test_the_kernels_cache_in_their_own_directory_without_touching_the_environment(tmp_path: Path) -> None:
    """numba's cache directory is set for the engine's kernels only, through numba's config while
    they are decorated: no NUMBA_CACHE_DIR appears in the environment, and a user's own cached numba
    function keeps numba's default place."""
    code = """
import os, sys
import numba
from engine import kernels
assert kernels.backend() == "numba"
from engine.kernels import attention, quant
ours = kernels.cache_dir()
@numba.njit(cache=True)
def users(x):
    return x + 1
paths = [attention.attend_serial._cache._cache_path, quant.project._cache._cache_path]
assert all(p.startswith(str(ours)) for p in paths), (paths, ours)
assert not users._cache._cache_path.startswith(str(ours)), users._cache._cache_path
assert "NUMBA_CACHE_DIR" not in os.environ
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env |= {"SMALLMIND_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT)}
    script = tmp_path / "user_script.py"  # numba caches only functions defined in a file
    script.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
