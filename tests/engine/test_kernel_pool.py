"""The kernels' worker pool: jobs computed by several threads equal the one-thread result, however
the chunks fall; workers spin only during a step and sleep after it; a second caller computes alone;
the engine leaves the process environment alone."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine import kernels
from engine.kernels import PackedWeight, linear
from engine.kernels import weights as kw
from tests.engine.conftest import rel_diff
from tests.engine.test_kernels import random_blocks

pytestmark = pytest.mark.skipif(kernels.backend("auto") != "numba", reason="numba is not installed")


def fused_weight() -> PackedWeight:
    """Three layouts in one matrix (like Gemma's q/k in Q5_0 beside v in Q8_0), many chunks."""
    parts = [random_blocks("Q4_1", (512, 256), 1), random_blocks("Q5_0", (256, 256), 2)]
    parts.append(random_blocks("Q8_0", (96, 256), 3))
    w = kw.finish(kw.concat_rows(parts))
    assert isinstance(w, PackedWeight) and w.kernel_table()[1] > 4  # chunks for both threads
    return w


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.skipif(kernels.available_cpus() < 2, reason="needs 2 cores")
def test_two_threads_give_the_one_thread_result_and_sleep_after_the_step():
    from engine.kernels.pool import pool

    w = fused_weight()
    kernels.warm_up()  # as a model load does
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 256), dtype=np.float32) for n in (1, 3, 8, 16) for _ in range(50)]
    expected = [x.astype(np.float64) @ w.dequantize().astype(np.float64).T for x in xs]
    try:
        kernels.set_threads(1)
        with kernels.compute():
            alone = [linear(x, w) for x in xs]
        assert pool().n_spinning == 0  # one thread: no worker woken
        helped = pool().chunks_helped
        kernels.set_threads(2)
        spinning_seen, shared = False, []
        deadline = time.monotonic() + 20  # bounded: a loaded machine may schedule the worker late
        with kernels.compute():
            while time.monotonic() < deadline and not (spinning_seen and pool().chunks_helped > helped):
                shared.append([linear(x, w) for x in xs])  # jobs back to back: the worker takes chunks
                spinning_seen |= pool().n_spinning == 1  # between the step's kernels: spinning, not asleep
    finally:
        kernels.set_threads(0)
    assert spinning_seen and pool().chunks_helped > helped
    for a, ref in zip(alone, expected, strict=True):
        assert rel_diff(a, ref) < 2e-6
    for batch in shared:
        for a, b in zip(alone, batch, strict=True):
            np.testing.assert_array_equal(a, b)  # a chunk's result does not depend on its thread
    assert wait_until(lambda: pool().n_spinning == 0)  # idle after the step: asleep within IDLE_S


def test_a_second_thread_computes_alone_while_a_job_runs():
    w = fused_weight()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 256), dtype=np.float32)
    expected = linear(x, w)
    results: list[np.ndarray] = []

    def caller() -> None:
        with kernels.compute():
            results.extend(linear(x, w) for _ in range(200))

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 600
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_the_engine_sets_no_process_environment(tmp_path):
    """Loading and running a model on the numba path changes no environment variable that another
    library would read (OMP_WAIT_POLICY made llama.cpp in the same process 2.8x slower)."""
    script = """
import json, os, sys
from engine import Model
from tests.fixtures.tiny_model import write_tiny_gguf
before = dict(os.environ)
path = write_tiny_gguf(sys.argv[1] + "/t.gguf", weight_type="Q4_1", seed=1)
model = Model.from_gguf(path, kernel_path="numba")
model.forward([1, 2, 3])
print(json.dumps(sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "NUMBA_CACHE"))}
    env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]  # the tests' compiled kernels
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
