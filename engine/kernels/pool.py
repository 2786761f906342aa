"""The engine's own worker threads for the projection kernels: woken once per step, spinning (not
sleeping) between the step's kernels, back to sleep when the engine is idle.

A decode step runs ~121 projections (4 per layer and the LM head), each a few tens of microseconds
to a millisecond, with NumPy work (norms, RoPE, attention) between them. Handing each projection to
a thread pool that sleeps between calls costs a wake-up per call and per thread; OpenMP's passive
wait policy made SmolLM2's decode 1.6x slower than spinning. Here:

- ``Pool.run`` publishes one projection as a job (a table of the matrix's panels, cut into chunks of
  a few panels) and takes chunks itself; each worker, spinning in compiled code without the GIL,
  takes chunks too (an atomic counter tagged with the job's number, so a late worker can never take
  a chunk of the next job). A worker that is slow or descheduled only takes fewer chunks: the step
  waits for at most the chunk in its hands.
- Workers spin only while the engine computes: ``Pool.begin(n)`` (at the start of each step, from
  ``cpu.compute()``) sets how many may help; they are woken (a ``threading.Event``) at the first
  projection; after ``IDLE_S`` without a job they return to Python and sleep on their event. Steps
  that run BLAS (prefill) put them to sleep at once (``Pool.pause``): OpenBLAS needs those cores.
- Nothing here sets an environment variable or changes another library's threads.

Compiled code reads the job through raw addresses (``job`` words hold ``array.ctypes.data``); every
array a job points to is alive for as long as ``run`` is.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import carray, njit, types

from .quant import gemv
from .simd import _intrinsic

# ---------------------------------------------------------------------------------------------
# Atomics, pause and raw addresses for compiled code
# ---------------------------------------------------------------------------------------------
_I32 = ir.IntType(32)


def _slot(context: Any, builder: Any, sig: Any, args: Any) -> Any:
    array = context.make_array(sig.args[0])(context, builder, args[0])
    return builder.gep(array.data, [context.cast(builder, args[1], sig.args[1], types.intp)])


def _is_words(ty: Any) -> bool:
    return isinstance(ty, types.Array) and ty.dtype == types.int64


@_intrinsic
def atomic_load(typingctx, words, i):  # pragma: no cover - compiled
    if not _is_words(words):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "seq_cst", 8)

    return types.int64(words, i), codegen


@_intrinsic
def atomic_store(typingctx, words, i, value):  # pragma: no cover - compiled
    if not _is_words(words):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, _slot(context, builder, sig, args), "seq_cst", 8)
        return context.get_dummy_value()

    return types.none(words, i, value), codegen


@_intrinsic
def atomic_add(typingctx, words, i, value):  # pragma: no cover - compiled
    """Returns the value before the addition."""
    if not _is_words(words):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), v, "seq_cst")

    return types.int64(words, i, value), codegen


@_intrinsic
def compare_and_swap(typingctx, words, i, expected, new):  # pragma: no cover - compiled
    """Sets ``words[i] = new`` if it holds ``expected``; returns what it held."""
    if not _is_words(words):
        return None

    def codegen(context, builder, sig, args):
        old = context.cast(builder, args[2], sig.args[2], types.int64)
        new = context.cast(builder, args[3], sig.args[3], types.int64)
        pair = builder.cmpxchg(_slot(context, builder, sig, args), old, new, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return types.int64(words, i, expected, new), codegen


@_intrinsic
def pause(typingctx):  # pragma: no cover - compiled
    """The CPU's spin-wait hint (x86 ``pause``, ARM ``yield``): a spinning thread yields its core's
    shared resources and draws less power."""
    arch = llvm.get_process_triple().split("-")[0]

    def codegen(context, builder, sig, args):
        void = ir.VoidType()
        if arch in ("x86_64", "i386", "i686"):
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(void, []))
            builder.call(fn, [])
        elif arch in ("aarch64", "arm64"):
            fn = builder.module.declare_intrinsic("llvm.aarch64.hint", fnty=ir.FunctionType(void, [_I32]))
            builder.call(fn, [_I32(1)])
        return context.get_dummy_value()

    return types.none(), codegen


@_intrinsic
def address(typingctx, value):  # pragma: no cover - compiled
    """An integer address as a pointer (for ``carray``)."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.int64), codegen


# ---------------------------------------------------------------------------------------------
# Jobs: a matrix's table (built once) and a call's header
# ---------------------------------------------------------------------------------------------
# ctrl words, each on its own 64-byte line
GEN, NEXT, DONE, STATE, ACTIVE, HELPED = 0, 8, 16, 24, 32, 40
CTRL_WORDS = 56
SLEEP, RUN = 0, 1
# the header a call writes into ``job``
J_N, J_K, J_X, J_OUT, J_OUT_STRIDE, J_XS32, J_XS16, J_TABLE, J_TILE, J_CHUNKS = range(10)
JOB_WORDS = 16
# a matrix's table: a word count of parts and chunks, then the parts, then the chunks
T_PARTS, T_CHUNKS, T_HEAD = 0, 1, 2
PART_WORDS = 12
P_KIND, P_QS, P_QH, P_D, P_M, P_NB, P_PANELS, P_COL, P_OFFSET, P_BLOCK, P_QH_N, P_M_N = range(PART_WORDS)
CHUNK_BLOCKS = 96  # blocks per chunk (a few panels): small enough to balance, large enough to amortise


def table(parts: Any) -> np.ndarray:
    """The int64 table ``run`` reads for a matrix of ``weights.Panels`` parts: each part's kind,
    array addresses and shapes, then the chunks (part, first panel, end panel)."""
    words: list[int] = [len(parts), 0]
    chunks: list[int] = []
    col = 0
    for i, p in enumerate(parts):
        kind = (2 if p.qs.dtype == np.int8 else 0) + (1 if p.d.dtype == np.float32 else 0)
        nb = p.qs.shape[1]
        words += [kind, p.qs.ctypes.data, p.qh.ctypes.data, p.d.ctypes.data, p.m.ctypes.data, nb,
                  p.n_panels, col, int(p.offset), p.block, p.qh.shape[0], p.m.shape[0]]  # fmt: skip
        step = max(1, CHUNK_BLOCKS // nb)
        for a in range(0, p.n_panels, step):
            chunks += [i, a, min(a + step, p.n_panels)]
        col += p.n_panels * 16
    words[T_CHUNKS] = len(chunks) // 3
    return np.array(words + chunks, dtype=np.int64)


kernel = njit(boundscheck=False, cache=True, nogil=True)


@kernel
def _run_chunk(job, c):  # pragma: no cover - compiled
    """Chunk ``c`` of the job: ``gemv`` over its panels, with arrays typed by the part's kind."""
    n_parts = carray(address(job[J_TABLE]), (T_HEAD,), np.int64)[T_PARTS]
    tab = carray(address(job[J_TABLE]), (T_HEAD + n_parts * PART_WORDS + 3 * job[J_CHUNKS],), np.int64)
    chunk = T_HEAD + n_parts * PART_WORDS + 3 * c
    part, p0, p1 = tab[chunk], tab[chunk + 1], tab[chunk + 2]
    at = T_HEAD + part * PART_WORDS
    B, K, L = job[J_N], job[J_K], tab[at + P_BLOCK]
    nb, n_panels = tab[at + P_NB], tab[at + P_PANELS]
    x = carray(address(job[J_X]), (B, K), np.float32)
    out = carray(address(job[J_OUT]), (B, job[J_OUT_STRIDE]), np.float32)
    xs = carray(address(job[J_XS32] if L == 32 else job[J_XS16]), (B, K // L), np.float32)
    qh = carray(address(tab[at + P_QH]), (tab[at + P_QH_N], nb if tab[at + P_QH_N] else 0, 16), np.uint32)
    kind, offset, col, tile = tab[at + P_KIND], np.float32(tab[at + P_OFFSET]), tab[at + P_COL], job[J_TILE]
    m_shape = (tab[at + P_M_N], nb if tab[at + P_M_N] else 0, 16)
    if kind == 0:  # nibbles, float16 scales
        qs = carray(address(tab[at + P_QS]), (n_panels, nb, L // 2, 16), np.uint8)
        d = carray(address(tab[at + P_D]), (n_panels, nb, 16), np.uint16)
        m = carray(address(tab[at + P_M]), m_shape, np.uint16)
        gemv(x, xs, qs, qh, d, m, offset, out, col, p0, p1, tile)
    elif kind == 1:  # nibbles, float32 scales
        qs = carray(address(tab[at + P_QS]), (n_panels, nb, L // 2, 16), np.uint8)
        d32 = carray(address(tab[at + P_D]), (n_panels, nb, 16), np.float32)
        m32 = carray(address(tab[at + P_M]), m_shape, np.float32)
        gemv(x, xs, qs, qh, d32, m32, offset, out, col, p0, p1, tile)
    elif kind == 2:  # int8, float16 scales
        q8 = carray(address(tab[at + P_QS]), (n_panels, nb, L, 16), np.int8)
        d = carray(address(tab[at + P_D]), (n_panels, nb, 16), np.uint16)
        m = carray(address(tab[at + P_M]), m_shape, np.uint16)
        gemv(x, xs, q8, qh, d, m, offset, out, col, p0, p1, tile)
    else:  # int8, float32 scales
        q8 = carray(address(tab[at + P_QS]), (n_panels, nb, L, 16), np.int8)
        d32 = carray(address(tab[at + P_D]), (n_panels, nb, 16), np.float32)
        m32 = carray(address(tab[at + P_M]), m_shape, np.float32)
        gemv(x, xs, q8, qh, d32, m32, offset, out, col, p0, p1, tile)


@kernel
def _work(ctrl, job, gen):  # pragma: no cover - compiled
    """Take chunks of job ``gen`` until none is left or a newer job replaced it; returns how many.
    The header is read for real only once a chunk is owned: the next job cannot be published before
    that chunk is done."""
    taken = 0
    while True:
        cur = atomic_load(ctrl, NEXT)
        c = cur & 0xFFFFFFFF
        if (cur >> 32) != gen or c >= atomic_load(job, J_CHUNKS):
            return taken
        if compare_and_swap(ctrl, NEXT, cur, cur + 1) == cur:
            _run_chunk(job, c)
            atomic_add(ctrl, DONE, 1)
            taken += 1


@njit(boundscheck=False, cache=True, nogil=True, fastmath=True)
def _block_sums(x, L, out):  # pragma: no cover - compiled
    B, K = x.shape
    for b in range(B):
        for k in range(K // L):
            s = np.float32(0.0)
            for j in range(L):
                s += x[b, k * L + j]
            out[b, k] = s


@kernel
def execute(ctrl, job, tab, x, out, tile, sums32, sums16):  # pragma: no cover - compiled
    """out = x @ W.T for the matrix described by ``tab``: publish the job, take chunks, wait for
    the chunks the workers took. ``sums32``/``sums16``: whether parts with 32-/16-value blocks exist."""
    B, K = x.shape
    xs32 = np.empty((B, K // 32 if sums32 else 0), dtype=np.float32)
    xs16 = np.empty((B, K // 16 if sums16 else 0), dtype=np.float32)
    if sums32:
        _block_sums(x, 32, xs32)
    if sums16:
        _block_sums(x, 16, xs16)
    job[J_N], job[J_K], job[J_X], job[J_OUT] = B, K, x.ctypes.data, out.ctypes.data
    job[J_OUT_STRIDE], job[J_XS32], job[J_XS16] = out.shape[1], xs32.ctypes.data, xs16.ctypes.data
    job[J_TABLE], job[J_TILE], job[J_CHUNKS] = tab.ctypes.data, tile, tab[T_CHUNKS]
    gen = atomic_load(ctrl, GEN) + 1
    atomic_store(ctrl, DONE, 0)
    atomic_store(ctrl, NEXT, gen << 32)
    atomic_store(ctrl, GEN, gen)  # published: workers may start
    _work(ctrl, job, gen)
    while atomic_load(ctrl, DONE) < tab[T_CHUNKS]:
        pause()


@kernel
def worker_loop(ctrl, job, max_idle_spins):  # pragma: no cover - compiled
    """A worker's life between two sleeps: spin (``pause``) and take every new job's chunks until
    told to sleep or idle for ``max_idle_spins`` spins."""
    atomic_add(ctrl, ACTIVE, 1)
    seen = -1  # a job in flight when the worker arrives is joined (its tag guards the chunks)
    idle = 0
    while atomic_load(ctrl, STATE) == RUN and idle < max_idle_spins:
        gen = atomic_load(ctrl, GEN)
        if gen != seen:
            seen = gen
            atomic_add(ctrl, HELPED, _work(ctrl, job, gen))
            idle = 0
        else:
            pause()
            idle += 1
    atomic_add(ctrl, ACTIVE, -1)


@kernel
def _spin(n):  # pragma: no cover - compiled
    for _ in range(n):
        pause()


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------
class Pool:
    """Worker threads for ``run``; one per process (``pool()``)."""

    IDLE_S = 0.002  # a worker without a job for this long goes back to sleep

    def __init__(self) -> None:
        self.ctrl = np.zeros(CTRL_WORDS, dtype=np.int64)
        self.job = np.zeros(JOB_WORDS, dtype=np.int64)
        self.lock = threading.Lock()  # one job at a time; other callers compute alone
        self.wanted = 0  # workers allowed to help this step
        self._events: list[threading.Event] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._max_idle_spins = 0
        self._local = threading.local()

    def begin(self, n_threads: int) -> None:
        """A step starts, computing on ``n_threads`` threads (this one and n - 1 workers)."""
        self.wanted = max(0, n_threads - 1)
        if self.wanted == 0:
            self.pause()

    def warm_up(self) -> None:
        """Load (or compile) the workers' loop now, not on a worker's first wake-up: a worker that
        compiles needs the GIL the computing thread holds, and would join seconds late."""
        ctrl, job = self._private()
        worker_loop(ctrl, job, 1)  # ctrl says SLEEP: returns at once
        self._max_idle_spins = self._max_idle_spins or _spins_for(self.IDLE_S)

    def pause(self) -> None:
        """Send spinning workers to sleep (BLAS is about to need the cores)."""
        self.ctrl[STATE] = SLEEP

    def run(
        self, x: np.ndarray, out: np.ndarray, tab: np.ndarray, tile: int, sums: tuple[bool, bool]
    ) -> None:
        """``out = x @ W.T`` for the matrix whose ``table()`` is ``tab``, on this thread and the
        workers the current step allows."""
        if not self.lock.acquire(blocking=False):  # another thread's job is running: compute alone
            ctrl, job = self._private()
            execute(ctrl, job, tab, x, out, tile, sums[0], sums[1])
            return
        try:
            if self.wanted and self.ctrl.item(ACTIVE) < self.wanted:
                self._wake()
            execute(self.ctrl, self.job, tab, x, out, tile, sums[0], sums[1])
        finally:
            self.lock.release()

    def _private(self) -> tuple[np.ndarray, np.ndarray]:
        mine = getattr(self._local, "arrays", None)
        if mine is None:
            mine = (np.zeros(CTRL_WORDS, dtype=np.int64), np.zeros(JOB_WORDS, dtype=np.int64))
            self._local.arrays = mine
        return mine

    def _wake(self) -> None:
        if not self._max_idle_spins:
            self._max_idle_spins = _spins_for(self.IDLE_S)
        while len(self._threads) < self.wanted:
            self._start_worker()
        self.ctrl[STATE] = RUN
        for event in self._events[: self.wanted]:
            event.set()

    def _start_worker(self) -> None:
        event = threading.Event()
        name = f"smallmind-kernels-{len(self._threads) + 1}"
        thread = threading.Thread(target=self._worker, args=(event,), name=name, daemon=True)
        self._events.append(event)
        self._threads.append(thread)
        thread.start()

    def _worker(self, event: threading.Event) -> None:
        while True:
            event.wait()
            event.clear()
            if self._closing:
                return
            worker_loop(self.ctrl, self.job, self._max_idle_spins)

    def close(self) -> None:
        """Stop the workers (at exit)."""
        self._closing = True
        self.pause()
        for event in self._events:
            event.set()
        for thread in self._threads:
            thread.join(timeout=1.0)
        self._threads, self._events = [], []
        self._closing = False

    @property
    def n_workers(self) -> int:
        return len(self._threads)

    @property
    def n_spinning(self) -> int:
        """Workers in their spin loop now."""
        return int(self.ctrl[ACTIVE])

    @property
    def chunks_helped(self) -> int:
        """Chunks the workers have computed so far (the calling threads' are not counted)."""
        return int(self.ctrl[HELPED])


def _spins_for(seconds: float) -> int:
    """How many ``pause`` spins take ``seconds`` on this CPU (a pause is 10-150 cycles): the fastest
    of several timings, as a timing that was descheduled midway would make the idle time too short."""
    _spin(1000)
    n = 20_000
    per_spin = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        _spin(n)
        per_spin = min(per_spin, (time.perf_counter() - started) / n)
    return max(1000, int(seconds / max(per_spin, 1e-9)))


_pool: Pool | None = None
_pool_lock = threading.Lock()


def pool() -> Pool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = Pool()
            atexit.register(_pool.close)
        return _pool


def _after_fork() -> None:  # a forked child has none of the parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
