"""How many CPU threads the kernels use, and keeping two thread pools off each other's cores.

The numba path runs every matrix product on the engine's own threads: the projection kernels on the
worker pool of ``pool.py`` (woken per step, spinning between the step's kernels), prefill GEMMs split
by rows over short-lived Python threads, each calling BLAS on one thread (the pool's workers sleep
meanwhile), and the attention kernel's larger work as pool jobs too. No kernel uses numba's
threading layer.
BLAS is held to one thread while the engine computes (``compute()``), because OpenBLAS's workers
spin after each call and starve numba's workers on a 2-core machine (measured: a 17-row product of
expanded weights took 36 ms interleaved with numba calls against 1.3 ms alone).

``set_threads(0)`` (auto) uses every core this process may run on, less the cores other processes
keep busy (read from ``/proc/stat`` against this process's own CPU time, at most twice a second): on
2 cores with one busy program beside it the engine drops to one thread, which keeps ~90% of its
speed where two threads fall to a third (a parallel step waits for its slowest thread, and a thread
sharing a core with a busy program is slow). ``set_threads(n)`` fixes the count. It can change at
any time (Settings → CPU threads) and takes effect at the next step.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

MAX_THREADS = 256


@cache
def available_cpus() -> int:
    """Physical cores this process may run on (SMT siblings share a core's memory port and FMA units:
    a second thread on one core adds nothing to a memory-bound kernel)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows: logical CPUs
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        try:
            with open(
                f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", encoding="ascii"
            ) as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


class _State:
    def __init__(self) -> None:
        self.requested = 0  # 0 = auto


_state = _State()


def set_threads(n: int) -> int:
    """Threads for the kernels: ``n`` > 0, or 0 for auto. Returns the count now in effect."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_THREADS:
        raise ValueError(f"cpu_threads={n!r} must be 0 (auto) or 1..{MAX_THREADS}")
    _state.requested = n
    return threads()


def requested_threads() -> int:
    """The count asked for with ``set_threads`` (0 = auto)."""
    return _state.requested


def threads() -> int:
    """The thread count in effect: the requested one, capped by the cores available; in auto mode,
    the cores available less those other processes keep busy (at least one)."""
    cpus = available_cpus()
    if _state.requested:
        return min(_state.requested, cpus)
    busy = _load.others_busy()
    return max(1, cpus - int(busy + 0.4)) if busy is not None else cpus


class _LoadMonitor:
    """Cores kept busy by other processes: all CPU time the system spent (/proc/stat) less this
    process's own, over the last interval. None where /proc/stat does not exist."""

    INTERVAL_S = 0.5

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: tuple[float, float, float] | None = None  # (wall, system busy s, own cpu s)
        self.busy: float | None = None

    @staticmethod
    def _system_busy_s() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy = sum(ticks) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")

    def others_busy(self) -> float | None:
        now = time.monotonic()
        with self.lock:
            if self.last is not None and now - self.last[0] < self.INTERVAL_S:
                return self.busy
            system = self._system_busy_s()
            if system is None:
                return None
            times = os.times()
            own = times.user + times.system
            if self.last is not None:
                wall, system0, own0 = self.last
                self.busy = max(0.0, ((system - system0) - (own - own0)) / (now - wall))
            self.last = (now, system, own)
            return self.busy


_load = _LoadMonitor()


def run_split(jobs: list[Callable[[], None]]) -> None:
    """Run ``jobs`` at once: the first on the calling thread, each other on a short-lived thread (a
    persistent pool would outlive the engine; a thread costs ~0.1 ms, a prefill GEMM ~10 ms)."""
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # re-raised on the calling thread below
            errors.append(exc)

    helpers = [threading.Thread(target=guarded, args=(job,), name="smallmind-gemm") for job in jobs[1:]]
    for t in helpers:
        t.start()
    guarded(jobs[0])
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]


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
def blas_threads(n: int) -> Iterator[None]:
    """Within: BLAS (threadpoolctl's view of the loaded NumPy's) on ``n`` threads."""
    libs = _blas()
    before = [lib.num_threads for lib in libs] if libs else []
    for lib in libs or ():
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, count in zip(libs or (), before, strict=True):
            lib.set_num_threads(count)


@contextmanager
def compute() -> Iterator[int]:
    """Within (one model step): the kernels' pool uses ``threads()`` threads, BLAS one."""
    from .pool import pool

    n = threads()
    pool().begin(n)
    with blas_threads(1):
        yield n
