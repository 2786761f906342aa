"""Which path a projection takes at each row count on this CPU, measured once and cached.

A step of N rows can multiply a packed matrix two ways: the register-tiled kernel (``quant.gemv``:
reads the packed bits once, widens them in registers; its cost grows with N at ~65% of the FMA peak)
or expanding tiles of the matrix to float32 and calling BLAS (a fixed cost of writing 4 bytes per
weight, then BLAS's GEMM at ~90% of the peak). Decode steps (1-16 rows) always take the kernel; for
prefill chunks the crossover depends on the CPU (vector width, memory). At a model's first step of
more than 16 rows, ``Calibration.run`` times both at 24..256 rows on its first gate/up matrix and
every packed matrix of the model takes the kernel up to the largest count the kernel does not lose.

Both are timed on the calling thread alone, in that thread's CPU time: on a shared machine the wall
clock measures the load (a busy neighbour made BLAS's two spinning threads look 10x slower and the
kernel win at 256 rows, where on one quiet core BLAS is 25% faster). The crossover found for one
thread holds for the engine's threads: both paths split the matrix's rows between them.

Kept in the app's cache directory (``calibration.json``), keyed by the CPU model, the kernels'
version and the matrix's shape and layout: each CPU measures once (~0.1-0.5 s).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .weights import PackedWeight

log = logging.getLogger(__name__)

VERSION = 2  # bump when the kernels change enough to move the crossover
DECODE_ROWS = 16  # always the kernel: a decode step of up to 16 sequences
CANDIDATE_ROWS = (24, 32, 48, 64, 96, 128, 192, 256)
RUNS = 3  # best of, alternating the two paths
MARGIN = 1.1  # the kernel loses a row count only when slower by more than this (within it: a tie, and
# the kernel then keeps BLAS's threads and the expanded tiles' memory traffic out of the step)

MatMul = Callable[[np.ndarray, PackedWeight], np.ndarray]  # a way to compute x @ W.T


class Calibration:
    """A model's packed matrices, waiting for their crossover (``run``: once, at the first large step)."""

    def __init__(self, sample: PackedWeight, matrices: list[PackedWeight]) -> None:
        self.sample, self.matrices = sample, matrices
        self.pending = True
        self.lock = threading.Lock()

    def run(self, small: MatMul, large: MatMul, cache_file: Path) -> int:
        with self.lock:
            if self.pending:
                rows = kernel_rows(self.sample, small, large, cache_file)
                for w in self.matrices:
                    w.use_kernel_up_to(rows)
                self.pending = False
            return self.sample.kernel_rows


def cpu_name() -> str:
    """The CPU model as the OS names it (lscpu's "Model name")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def key(w: PackedWeight) -> str:
    layouts = "+".join(f"{p.qs.dtype}/{p.d.dtype}/{p.block}" for p in w.parts)
    return f"{cpu_name()}|v{VERSION}|{w.shape[0]}x{w.shape[1]} {layouts}"


def kernel_rows(w: PackedWeight, small: MatMul, large: MatMul, cache_file: Path) -> int:
    """The most rows a step may have for ``small`` (the kernel) to be used rather than ``large``
    (expand + BLAS) on matrices like ``w``: cached in ``cache_file``, else measured now."""
    k = key(w)
    cached = _read(cache_file)
    entry = cached.get(k)
    rows = entry.get("kernel_rows") if isinstance(entry, dict) else None
    if isinstance(rows, int):
        return rows
    started = time.perf_counter()
    rows, figures = measure(w, small, large)
    cached = _read(cache_file)  # another process may have written meanwhile
    measured = time.strftime("%Y-%m-%d %H:%M:%S")
    cached[k] = {"kernel_rows": rows, "thread_cpu_ms": figures, "measured": measured}
    _write(cache_file, cached)
    log.info("calibrated %s: the kernel up to %d rows (%.2f s)", k, rows, time.perf_counter() - started)
    return rows


def measure(w: PackedWeight, small: MatMul, large: MatMul) -> tuple[int, dict[str, list[float]]]:
    """(kernel rows, {rows: [kernel ms, BLAS ms]} in thread CPU time): the last candidate row count
    the kernel is not slower at (by ``MARGIN``), counting up from ``DECODE_ROWS`` until it loses."""
    rng = np.random.default_rng(0)
    figures: dict[str, list[float]] = {}
    rows = DECODE_ROWS
    for n in CANDIDATE_ROWS:
        x = rng.standard_normal((n, w.shape[1]), dtype=np.float32)
        best = [float("inf"), float("inf")]
        small(x, w), large(x, w)  # warm: caches, buffers
        for _ in range(RUNS):
            for i, path in enumerate((small, large)):
                t = time.thread_time()
                path(x, w)
                best[i] = min(best[i], time.thread_time() - t)
        figures[str(n)] = [round(best[0] * 1e3, 3), round(best[1] * 1e3, 3)]
        if best[0] > MARGIN * best[1]:
            break
        rows = n
    return rows, figures


def _read(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, dict[str, object]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:  # a read-only cache costs a calibration per process, nothing else
        log.warning("cannot keep the kernels' calibration in %s: %s", path, exc)
