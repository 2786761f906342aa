"""Which path a projection takes at each row count on this CPU, measured once and cached.

A step of N rows can multiply a packed matrix two ways: the register-tiled kernel (``quant.gemv``:
reads the packed bits once, widens them in registers; its cost grows with N at ~65% of the FMA peak)
or expanding tiles of the matrix to float32 and calling BLAS (a fixed cost of writing 4 bytes per
weight, then BLAS's GEMM at ~90% of the peak). Decode steps (1-16 rows) always take the kernel; for
prefill chunks the crossover depends on the CPU (vector width, cores, memory). ``kernel_rows``
measures both at a few row counts beyond 16 on a model's largest per-layer matrix and returns the
largest count the kernel wins at; ``linear()`` takes the kernel up to it.

The result is kept in the app's cache directory (``calibration.json``), keyed by the CPU model, the
kernels' version, the thread count and the matrix's layout, so each CPU measures once (~0.1-0.5 s,
at the first load of a model of that layout).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .weights import PackedWeight

log = logging.getLogger(__name__)

VERSION = 1  # bump when the kernels change enough to move the crossover
DECODE_ROWS = 16  # always the kernel: a decode step of up to 16 sequences
CANDIDATE_ROWS = (24, 32, 48, 64, 96, 128, 192, 256)
RUNS = 5  # best of, alternating the two paths
MARGIN = 1.1  # the kernel loses a row count only when slower by more than this (within it: a tie, and
# the kernel then keeps BLAS's threads and the expanded tiles' memory traffic out of the step)


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


def key(w: PackedWeight, n_threads: int) -> str:
    layouts = "+".join(f"{p.qs.dtype}/{p.d.dtype}/{p.block}" for p in w.parts)
    return f"{cpu_name()}|v{VERSION}|{n_threads} threads|{w.shape[0]}x{w.shape[1]} {layouts}"


def kernel_rows(
    w: PackedWeight,
    n_threads: int,
    small: Callable[[np.ndarray, PackedWeight], np.ndarray],
    large: Callable[[np.ndarray, PackedWeight], np.ndarray],
    cache_file: Path,
) -> int:
    """The most rows a step may have for ``small`` (the kernel) to be used rather than ``large``
    (expand + BLAS) on matrices like ``w``: cached in ``cache_file``, else measured now."""
    k = key(w, n_threads)
    cached = _read(cache_file)
    entry = cached.get(k)
    rows = entry.get("kernel_rows") if isinstance(entry, dict) else None
    if isinstance(rows, int):
        return rows
    started = time.perf_counter()
    rows, figures = measure(w, small, large)
    cached[k] = {"kernel_rows": rows, "ms": figures, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write(cache_file, cached)
    log.info("calibrated %s: the kernel up to %d rows (%.2f s)", k, rows, time.perf_counter() - started)
    return rows


def measure(
    w: PackedWeight,
    small: Callable[[np.ndarray, PackedWeight], np.ndarray],
    large: Callable[[np.ndarray, PackedWeight], np.ndarray],
) -> tuple[int, dict[str, list[float]]]:
    """(kernel rows, {rows: [kernel ms, BLAS ms]}): the last candidate row count the kernel is not
    slower at (by ``MARGIN``), counting up from ``DECODE_ROWS`` until it first loses."""
    rng = np.random.default_rng(0)
    figures: dict[str, list[float]] = {}
    rows = DECODE_ROWS
    for n in CANDIDATE_ROWS:
        x = rng.standard_normal((n, w.shape[1]), dtype=np.float32)
        best = [float("inf"), float("inf")]
        small(x, w), large(x, w)  # warm: caches, threads
        for _ in range(RUNS):
            for i, path in enumerate((small, large)):
                t = time.perf_counter()
                path(x, w)
                best[i] = min(best[i], time.perf_counter() - t)
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
    except OSError as exc:  # a read-only cache costs a calibration per load, nothing else
        log.warning("cannot keep the kernels' calibration in %s: %s", path, exc)
