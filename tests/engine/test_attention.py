"""The fused attention kernel (engine/kernels/attention.py) against the NumPy reference
(``engine.model.attention``) over random shapes: grouped-query heads, sliding windows, start offsets,
several rows and several sequences in one call, long caches split by position; float32, float16 and
q8_0 caches. The kernel reads each dtype as stored; the reference gets the same values as float32,
so every dtype is held to float32's bar (summation order only). q8_0's own error against float32
K/V is held to its documented bar (Q8_BAR). The compiled code is checked for vector instructions on
an AVX2 and an AVX-512 target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import Model, kernels
from engine.kv_cache import dequantize_q8_0, quantize_q8_0
from engine.model import Row
from engine.model import attention as numpy_attention
from tests.engine.conftest import rel_diff

pytestmark = pytest.mark.skipif(kernels.backend("auto") != "numba", reason="numba is not installed")
ROOT = Path(__file__).resolve().parents[2]
BAR = 1e-5  # float32 summation order
MODEL_BAR = 5e-5  # the same through two layers of a random tiny model (float16 measured 1.4e-5)
Q8_BAR = 3e-2  # q8_0 K/V against float32 K/V: the attention output's max error relative to its max
DTYPES = ("float32", "float16", "q8_0")


def stored(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the cache's bytes as the kernel reads them, the same values as float32)."""
    if dtype == "float16":
        half = x.astype(np.float16)
        return half.view(np.uint16), half.astype(np.float32)
    if dtype == "q8_0":
        q = quantize_q8_0(x)
        return q, dequantize_q8_0(q)
    return x, x


def random_case(rng: np.random.Generator, dtype: str) -> dict:
    KVH, G = int(rng.integers(1, 4)), int(rng.choice([1, 2, 3, 4]))
    Hd = int(rng.choice([32, 64] if dtype == "q8_0" else [16, 32, 64]))
    T = int(rng.choice([1, 1, 2, 4, 7, 33, 70]))
    start = int(rng.integers(0, 400))
    window = int(rng.choice([0, 0, 3, 64, 1000]))
    capacity = start + T + int(rng.integers(0, 20))
    keys, values = (rng.standard_normal((KVH, capacity, Hd), dtype=np.float32) for _ in range(2))
    q = rng.standard_normal((T, KVH * G, Hd), dtype=np.float32) * np.float32(0.3)
    return {"q": q, "keys": keys, "values": values, "start": start, "window": window}


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_attention_equals_numpy_over_random_shapes(dtype):
    from engine.kernels.attention import attention

    rng = np.random.default_rng({"float32": 1, "float16": 2, "q8_0": 3}[dtype])
    for case in range(30):
        c = random_case(rng, dtype)
        k_stored, k_float = stored(c["keys"], dtype)
        v_stored, v_float = stored(c["values"], dtype)
        S = c["start"] + c["q"].shape[0]
        expected = numpy_attention(c["q"], k_float[:, :S], v_float[:, :S], c["start"], c["window"])
        threads = 1 + case % 8  # up to 8: few items per thread, so long caches are split
        out = attention(c["q"], k_stored, v_stored, c["start"], c["window"], dtype, threads)
        assert rel_diff(out, expected) < BAR, (case, {k: v for k, v in c.items() if isinstance(v, int)})


def test_several_sequences_in_one_call_and_layers_by_address():
    """One plan, three sequences of different capacities, starts and row counts, read at layer 1 of
    (L, 2, KVH, capacity, Hd) buffers through layer 0's address, as the model does."""
    from engine.kernels.attention import StepPlan

    rng = np.random.default_rng(4)
    KVH, G, Hd, L = 2, 3, 32, 3
    shapes = [(700, 699, 1), (50, 20, 6), (1200, 1100, 1)]  # (capacity, start, new tokens)
    buffers = [rng.standard_normal((L, 2, KVH, cap, Hd), dtype=np.float32) for cap, _, _ in shapes]
    q = rng.standard_normal((sum(t for _, _, t in shapes), KVH * G, Hd), dtype=np.float32)
    plan = StepPlan([b[0, 0] for b in buffers], [b[0, 1] for b in buffers], [b.strides[0] for b in buffers],
                    [s for _, s, _ in shapes], [t for _, _, t in shapes], "float32", threads=4)  # fmt: skip
    for window in (0, 100):
        out = plan.run(q, 1, window)
        r0 = 0
        for buf, (_, start, T) in zip(buffers, shapes, strict=True):
            end = start + T
            expected = numpy_attention(q[r0 : r0 + T], buf[1, 0, :, :end], buf[1, 1, :, :end], start, window)
            assert rel_diff(out[r0 : r0 + T], expected) < BAR
            r0 += T
    _, n_splits = plan.items(0, G)
    assert n_splits.max() > 1  # the long decode rows were split by position, and still agree


def test_q8_0_error_against_float32_kv_is_within_its_bar():
    from engine.kernels.attention import attention

    rng = np.random.default_rng(5)
    worst = 0.0
    for _ in range(10):
        c = random_case(rng, "q8_0")
        k_q, _ = stored(c["keys"], "q8_0")
        v_q, _ = stored(c["values"], "q8_0")
        S = c["start"] + c["q"].shape[0]
        exact = numpy_attention(c["q"], c["keys"][:, :S], c["values"][:, :S], c["start"], c["window"])
        worst = max(worst, rel_diff(attention(c["q"], k_q, v_q, c["start"], c["window"], "q8_0"), exact))
    assert 1e-4 < worst < Q8_BAR  # visibly quantized, within the bar


def test_q8_0_rows_round_trip_within_half_a_step():
    x = np.random.default_rng(6).standard_normal((3, 5, 64), dtype=np.float32)
    q = quantize_q8_0(x)
    assert q.dtype == np.int8 and q.shape == (3, 5, 64 + 4)
    step = np.ascontiguousarray(q[..., 64:]).view(np.float16).astype(np.float32)[..., None]  # (3, 5, 2, 1)
    assert np.allclose(step, np.abs(x.reshape(3, 5, 2, 32)).max(axis=-1, keepdims=True) / 127, rtol=1e-3)
    err = np.abs(dequantize_q8_0(q) - x).reshape(3, 5, 2, 32)
    assert (err <= step * 0.5 * (1 + 1e-6)).all()  # within half a step of the stored scale
    zeros = quantize_q8_0(np.zeros((1, 32), dtype=np.float32))
    assert not dequantize_q8_0(zeros).any()


@pytest.fixture(scope="module")
def tiny_hd32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with 32-value heads (q8_0 needs a multiple of 32)."""
    from tests.fixtures.tiny_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("hd32") / "tiny.gguf", hidden_size=128, n_heads=4, seed=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_numba_path_equals_numpy_path_for_each_cache_dtype(tiny_hd32, dtype):
    """Prefill, then steps mixing a decode row and a 3-position row (drafts) of two sequences, then
    a decode row beside a chunk long enough for BLAS: the numba path (fused kernel, every row in one
    call, the long chunk by attention()) gives the NumPy path's logits."""
    logits = []
    for path in ("numba", "numpy"):
        model = Model.from_gguf(tiny_hd32, kernel_path=path)
        a, b = model.new_cache(128, dtype=dtype), model.new_cache(128, dtype=dtype)
        out = [model.forward(list(range(3, 40)), a), model.forward(list(range(50, 61)), b)]
        for step in range(6):
            out.append(model.forward_last([Row(np.array([7 + step]), a), Row(np.array([1, 2, 3]) + step, b)]))
        # a 20-token chunk after 29 cached (the NumPy attention() path) beside a decode row (fused)
        out += model.forward_tails([Row(np.array([9]), a), Row(np.arange(20) + 5, b)], [1, 20])
        logits.append(np.concatenate([o.reshape(-1, o.shape[-1]) for o in out]))
    assert rel_diff(logits[0], logits[1]) < MODEL_BAR


def test_half_conversions_are_exact_for_every_finite_float16():
    from engine.kernels.attention import half_bits_to_float, half_to_float, serial_kernel

    @serial_kernel
    def convert_all(bits, out):  # pragma: no cover - compiled
        for i in range(bits.shape[0]):
            out[i] = half_bits_to_float(bits[i])

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = bits.view(np.float16)
    finite = np.isfinite(halves)
    portable = np.array([half_to_float(b) for b in bits[finite]], dtype=np.float32)
    np.testing.assert_array_equal(portable, halves[finite].astype(np.float32))
    assert np.signbit(portable[bits[finite] == 0x8000]).all()  # -0.0 keeps its sign
    fast = np.empty(bits.size, dtype=np.float32)
    convert_all(bits, fast)
    np.testing.assert_array_equal(fast[finite], halves[finite].astype(np.float32))


def test_exp_is_within_two_ulp_where_softmax_uses_it():
    from engine.kernels.attention import exp_nonpositive

    x = -np.concatenate([np.linspace(0, 87, 20001), np.geomspace(1e-8, 1, 200)]).astype(np.float32)
    got = np.array([exp_nonpositive(v) for v in x], dtype=np.float64)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(got - exact) / exact).max() < 2.5e-7
    assert exp_nonpositive(np.float32(-np.inf)) < 1e-37  # a -inf score weighs (next to) nothing


@pytest.mark.parametrize("cpu", ["haswell", "skylake-avx512"])
def test_kernel_is_vectorized_for_avx2_and_avx512(cpu, tmp_path):
    """Compiled for a named CPU in a child process (numba reads its target at import), never run:
    the dot products, the exp and the float16 conversion use packed instructions."""
    env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "attention_asm.py"), "float16"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    asm = json.loads(out.stdout.strip().splitlines()[-1])
    assert asm["cpu"] == cpu
    assert asm["fma_packed"] > asm["fma_scalar"] and asm["packed"] > asm["scalar"], asm
    assert asm["vector_round"] >= 1, asm  # exp: floor of a whole vector
    assert asm["cvtph2ps"] >= 1, asm  # float16 -> float32 eight (or sixteen) values at a time
    assert asm["ymm"] > 0 and (cpu != "haswell" or asm["zmm"] == 0), asm


@pytest.mark.parametrize("parallel_work", [0, 1 << 60])
def test_the_parallel_and_the_calling_thread_paths_agree(monkeypatch, parallel_work):
    """Large work runs on numba's threads with the kernels' workers asleep, small work on the calling
    thread beside them (attention.PARALLEL_WORK): both give the reference's attention."""
    from engine.kernels import attention as module
    from engine.kernels.pool import pool

    monkeypatch.setattr(module, "PARALLEL_WORK", parallel_work)
    rng = np.random.default_rng(6)
    KVH, G, Hd, start, T = 2, 3, 32, 900, 3
    k = rng.standard_normal((KVH, 1024, Hd), dtype=np.float32)
    v = rng.standard_normal((KVH, 1024, Hd), dtype=np.float32)
    q = rng.standard_normal((T, KVH * G, Hd), dtype=np.float32)
    pool().begin(2)
    out = module.attention(q, k, v, start, 0, "float32", threads=2)
    expected = numpy_attention(q, k[:, : start + T], v[:, : start + T], start, 0)
    assert rel_diff(out, expected) < BAR
