"""How many CPU threads the kernels use, and keeping two thread pools off each other's cores.

The numba path runs every matrix product on the engine's own threads: the JIT kernels through numba's
pool, prefill GEMMs split by rows over a small pool of Python threads, each calling BLAS on one
thread. BLAS is held to one thread while the engine computes (``compute()``), because OpenBLAS's
workers spin after each call and starve numba's workers on a 2-core machine (measured: a 17-row
product of expanded weights took 36 ms interleaved with numba calls against 1.3 ms alone).

``set_threads(0)`` (auto) uses every core this process may run on; the count can change at any time
(Settings → CPU threads) and takes effect at the next step.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any

MAX_THREADS = 256


def available_cpus() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class _State:
    def __init__(self) -> None:
        self.requested = 0  # 0 = auto
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.pool_size = 0


_state = _State()
_local = threading.local()


def set_threads(n: int) -> int:
    """Threads for the kernels: ``n`` > 0, or 0 for auto. Returns the count now in effect."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_THREADS:
        raise ValueError(f"cpu_threads={n!r} must be 0 (auto) or 1..{MAX_THREADS}")
    _state.requested = n
    return threads()


def threads() -> int:
    """The thread count in effect: the requested one, capped by the cores available."""
    cpus = available_cpus()
    return min(_state.requested, cpus) if _state.requested else cpus


def pool() -> ThreadPoolExecutor:
    """A pool of ``threads()`` workers for row-split GEMMs (rebuilt when the count changes)."""
    n = threads()
    with _state.lock:
        if _state.pool is None or _state.pool_size != n:
            old = _state.pool
            _state.pool, _state.pool_size = ThreadPoolExecutor(n, thread_name_prefix="smallmind-gemm"), n
            if old is not None:
                old.shutdown(wait=False)
        return _state.pool


@cache
def _blas() -> Any:
    """OpenBLAS/MKL/BLIS controllers of the loaded NumPy (threadpoolctl), or None."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    return libs or None


@contextmanager
def compute() -> Iterator[int]:
    """Within: numba uses ``threads()`` threads (numba's setting is per calling thread) and BLAS one."""
    import numba

    n = threads()
    if getattr(_local, "numba_threads", None) != n:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        _local.numba_threads = n
    libs = _blas()
    before = [lib.num_threads for lib in libs] if libs else []
    for lib in libs or ():
        lib.set_num_threads(1)
    try:
        yield n
    finally:
        for lib, count in zip(libs or (), before, strict=True):
            lib.set_num_threads(count)
