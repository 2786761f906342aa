"""The engine's own worker threads for its parallel kernels: woken once per step, spinning (not
sleeping) between the step's kernels, back to sleep when the engine is idle.

A decode step runs ~121 projections (4 per layer and the LM head), each a few tens of microseconds
to a millisecond, with NumPy work (norms, RoPE, attention) between them. Handing each projection to
a thread pool that sleeps between calls costs a wake-up per call and per thread; OpenMP's passive
wait policy made SmolLM2's decode 1.6x slower than spinning. Here:

- A parallel call is a *job*: ``job`` words naming a chunk function (a numba ``cfunc`` taking the
  job's address and a chunk number, ``CHUNK_SIGNATURE``), the chunk count and the caller's own words
  (``J_USER`` on: addresses and shapes). ``dispatch`` (compiled, called by the caller's compiled
  code once it has filled the words) publishes it and takes chunks itself; each worker, spinning in
  compiled code without the GIL, takes chunks too, through a counter tagged with the job's number (a
  late worker can never take a chunk of the next job). A slow or descheduled worker only takes fewer
  chunks: the call waits for at most the chunk in its hands.
- Workers spin only while the engine computes: ``Pool.begin(n)`` (at the start of each step, from
  ``cpu.compute()``) sets how many may help; they are woken (a ``threading.Event``) at the first job;
  after ``IDLE_S`` without a job they return to Python and sleep on their event. Steps that run BLAS
  (prefill) put them to sleep at once (``Pool.pause``): OpenBLAS needs those cores.
- Nothing here sets an environment variable or changes another library's threads.

The projections' jobs are built in ``quant.py`` (``project``). Another kernel joins the same pool
by writing a chunk ``cfunc`` and a compiled function ``f(ctrl, job, ...)`` that fills the words and
calls ``dispatch``, run as ``pool().run(f, ...)``. Every array a job's words point to must stay
alive until ``dispatch`` returns.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types

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
# a job's words: its chunk function, its chunk count, then the caller's own
J_FUNC, J_CHUNKS, J_USER = 0, 1, 2
JOB_WORDS = 64
CHUNK_SIGNATURE = types.void(types.CPointer(types.int64), types.int64)  # chunk(job words, chunk)


@_intrinsic
def call_chunk(typingctx, fn, job, c):  # pragma: no cover - compiled
    """Call the chunk function at address ``fn`` with the job's words and chunk ``c``."""
    if not _is_words(job):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i64.as_pointer(), i64])
        target = builder.inttoptr(args[0], fnty.as_pointer())
        words = context.make_array(sig.args[1])(context, builder, args[1]).data
        builder.call(target, [words, context.cast(builder, args[2], sig.args[2], types.int64)])
        return context.get_dummy_value()

    return types.none(fn, job, c), codegen


kernel = njit(boundscheck=False, cache=True, nogil=True)


@kernel
def _work(ctrl, job, gen):  # pragma: no cover - compiled
    """Take chunks of job ``gen`` until none is left or a newer job replaced it; returns how many.
    The words are read for real only once a chunk is owned: the next job cannot be published before
    that chunk is done."""
    taken = 0
    while True:
        cur = atomic_load(ctrl, NEXT)
        c = cur & 0xFFFFFFFF
        if (cur >> 32) != gen or c >= atomic_load(job, J_CHUNKS):
            return taken
        if compare_and_swap(ctrl, NEXT, cur, cur + 1) == cur:
            call_chunk(job[J_FUNC], job, c)
            atomic_add(ctrl, DONE, 1)
            taken += 1


@njit(boundscheck=False, cache=True, nogil=True, inline="always")
def dispatch(ctrl, job):  # pragma: no cover - compiled
    """Run the job whose words the caller has filled: publish it, take chunks, wait for the chunks
    the workers took."""
    gen = (atomic_load(ctrl, GEN) + 1) & 0x7FFFFFFF  # 31 bits: the tag in NEXT's high half stays positive
    atomic_store(ctrl, DONE, 0)
    atomic_store(ctrl, NEXT, gen << 32)
    atomic_store(ctrl, GEN, gen)  # published: workers may start
    _work(ctrl, job, gen)
    n_chunks = job[J_CHUNKS]
    while atomic_load(ctrl, DONE) < n_chunks:
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

    def run(self, fn: Any, *args: Any) -> None:
        """``fn(ctrl, job, *args)``: a compiled function that fills a job's words and calls
        ``dispatch``, on this thread and the workers the current step allows."""
        ctrl, job, held = self._take()
        try:
            fn(ctrl, job, *args)
        finally:
            if held:
                self.lock.release()

    @contextmanager
    def words(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Within: the (ctrl, job) words a compiled function dispatches its jobs through (as many
        as it likes), as ``run`` gives one."""
        ctrl, job, held = self._take()
        try:
            yield ctrl, job
        finally:
            if held:
                self.lock.release()

    def _take(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(ctrl, job, held): the pool's words with its lock held and the workers the current step
        allows awake; or, while another thread's job runs, private words no worker sees (this thread
        computes alone)."""
        if not self.lock.acquire(blocking=False):
            return (*self._private(), False)
        try:
            if self.wanted and self.ctrl.item(ACTIVE) < self.wanted:
                self._wake()
        except BaseException:
            self.lock.release()
            raise
        return self.ctrl, self.job, True

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
