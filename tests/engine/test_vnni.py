"""The opt-in 8-bit activations (``engine.kernels.vnni``): the integer kernel against the integer
model it computes, the mode's distance from the float32 path on the real model, its setting, and
that CPUs without VNNI never compile its instructions."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from engine import kernels
from engine.kernels import quant, vnni
from engine.kernels import weights as kw
from engine.model import Row
from tests.engine.conftest import rel_diff

pytestmark = pytest.mark.skipif(kernels.backend() != "numba", reason="numba kernels")
needs_vnni = pytest.mark.skipif(not vnni.available(), reason="this CPU has no AVX-512 VNNI/VBMI")


def panels(rng: np.random.Generator, n_out: int, K: int, offset: int, with_min: bool, exact_scales: bool):
    q = rng.integers(0, 16, (n_out, K), dtype=np.int8) + offset  # the file's signed values for Q4_0
    d = rng.uniform(0.01, 0.02, (n_out, K // 32)).astype(np.float32)
    if exact_scales:  # float16-exact: kept as float16 bits; else float32 scales (the other kind)
        d = d.astype(np.float16).astype(np.float32)
    m = (-d * 8).astype(np.float32) if with_min else None
    packed = kw.finish(kw.BlockWeight(q, d, m, 4, offset))
    assert isinstance(packed, kw.PackedWeight)
    return q - offset, d, m, packed.parts[0]


@needs_vnni
@pytest.mark.parametrize(
    ("offset", "with_min", "exact"), [(0, True, True), (-8, False, True), (0, True, False)]
)
@pytest.mark.parametrize("B", [1, 3, 8, 11])
def test_kernel_equals_the_integer_model(offset, with_min, exact, B):
    """Q4_1 (codes and a minimum), Q4_0 (signed values, offset -8) and float32 scales, rows in
    groups of 8 and single ones: Σ_blocks d_w d_x Σ q_w q_x + (m + offset d_w) Σ x, to float32
    rounding."""
    rng = np.random.default_rng(B)
    rows, K = 48, 256
    codes, d, m, part = panels(rng, rows, K, offset, with_min, exact)
    x = rng.standard_normal((B, K)).astype(np.float32)
    xq, dx = np.empty((B, K), np.int8), np.empty((B, K // 32), np.float32)
    vnni.quantize_rows(x, xq, dx)
    assert np.abs(xq).max() == 127 and np.abs(xq * np.repeat(dx, 32, axis=1) - x).max() <= dx.max() / 2 + 1e-7
    xs = np.empty((B, K // 32), np.float32)
    quant._block_sums(x, 32, xs)
    out = np.zeros((B, part.n_panels * 16), np.float32)
    vnni.gemv_int8(xq, dx, xs, part.qs, part.d, part.m, np.float32(part.offset), out, 0, 0, part.n_panels)
    isum = np.einsum("okj,bkj->bok", codes.reshape(rows, -1, 32).astype(np.int64), xq.reshape(B, -1, 32))
    minimum = (m if m is not None else 0) + offset * d  # (O, K/32)
    expected = (d[None] * dx[:, None] * isum + minimum[None] * xs[:, None]).sum(-1)
    assert rel_diff(out[:, :rows], expected) < 1e-5


SENTENCES = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "Two plus two equals",
    "The largest planet in the solar system is",
    "Cats are animals that like to",
    "The opposite of hot is",
    "A week has seven",
]


@needs_vnni
def test_int8_mode_runs_near_the_float32_path(smollm2):
    """The real model, 1 and 8 sequences of English: the 8-bit path really runs (the logits differ),
    within a few percent of the float32 path's (llama.cpp's own activations are 8-bit), mostly the
    same top token."""
    model, tok = smollm2
    before = kernels.activations()
    try:
        for n in (1, 8):
            prompts = [tok.encode(text) for text in SENTENCES[:n]]
            caches = [model.new_cache(32) for _ in prompts]
            for ids, cache in zip(prompts, caches, strict=True):
                model.forward(ids[:-1], cache)
            rows = [Row(np.array(ids[-1:]), cache) for ids, cache in zip(prompts, caches, strict=True)]
            results = {}
            for mode in ("float32", "int8"):
                assert kernels.set_activations(mode) == mode
                results[mode] = model.forward_last(rows)
                for ids, cache in zip(prompts, caches, strict=True):
                    cache.trim(len(ids) - 1)
            error = rel_diff(results["int8"], results["float32"])
            assert 1e-4 < error < 0.15, error
            same = results["int8"].argmax(axis=1) == results["float32"].argmax(axis=1)
            assert same.mean() >= 0.75, same  # a near tie may part them, as llama.cpp's parts from ours
    finally:
        kernels.set_activations(before)


def test_the_setting_is_checked():
    with pytest.raises(ValueError, match="activations='fp16'"):
        kernels.set_activations("fp16")
    assert kernels.set_activations("int8") == ("int8" if vnni.available() else "float32")
    assert kernels.set_activations("float32") == "float32" == kernels.activations()


AVX2_PROBE = """
import json
from engine import kernels
from engine.kernels import blocks, vnni
mode = kernels.set_activations("int8")
blocks.warm_up()  # compiles the blocks (and every kernel they call) for this target, and runs them
print(json.dumps({"available": vnni.available(), "mode": mode}))
"""


def test_a_cpu_without_vnni_never_compiles_its_instructions(tmp_path):
    """The compiled blocks built for an AVX2 CPU (Haswell; a subprocess: numba's target is
    process-wide) compile and run: the 8-bit branch is built from the float32 job there, and asking
    for int8 gives float32 (an instruction LLVM cannot select for the target would abort the
    process)."""
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": "",
        "NUMBA_CACHE_DIR": str(tmp_path),
    }
    done = subprocess.run([sys.executable, "-c", AVX2_PROBE], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == '{"available": false, "mode": "float32"}'
