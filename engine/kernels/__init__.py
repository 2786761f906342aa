"""``linear()``: the one entry point for every projection of the model, and the weights it reads.

Two paths, chosen when a model is loaded (``backend()``):

- ``"numba"``: quantized weights stay quantized in memory (``BlockWeight``); decode-sized steps (up
  to ``SMALL_ROWS`` rows) run JIT kernels that read each weight once for all rows (``jit.py``);
  larger steps (prefill chunks) expand one tile of weights at a time to float32 and use BLAS.
- ``"numpy"``: every weight dequantized to float32 at load and multiplied by BLAS: the reference
  path and the fallback where numba is not installed. ``SMALLMIND_KERNELS=numpy`` selects it.

Both give the same results up to float32 summation order (tests hold them together).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from functools import cache
from pathlib import Path

import numpy as np

from .. import paths
from . import cpu
from .cpu import MAX_THREADS, available_cpus, compute, requested_threads, set_threads, threads
from .weights import BLOCK_TYPES, BlockWeight, DenseWeight, Weight, embed

log = logging.getLogger(__name__)

F32 = np.float32
KERNELS_ENV = "SMALLMIND_KERNELS"
BACKENDS = ("numba", "numpy")
SMALL_ROWS = 16  # up to this many rows a step runs the JIT kernel; above, BLAS on expanded tiles
BLAS_ATTENTION_ROWS = 16  # a chunk this long after as many cached tokens: attention() by BLAS, not fused
TILE_VALUES = 1 << 20  # weights expanded per BLAS tile and thread (4 MiB of float32: stays in cache)

__all__ = [
    "BLOCK_TYPES",
    "MAX_THREADS",
    "BlockWeight",
    "DenseWeight",
    "Weight",
    "available_cpus",
    "backend",
    "compiled_on_disk",
    "compute",
    "embed",
    "linear",
    "requested_threads",
    "set_threads",
    "threads",
    "warm_up",
]


@cache
def _numba_available() -> bool:
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir()))
    # numba's OpenMP workers sleep between kernels instead of spinning: spinning workers starve BLAS
    # and, on a busy machine, a descheduled worker stalls the others at every barrier
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from . import jit  # noqa: F401  (compiles lazily, on first call)
    except ImportError as exc:
        log.warning("numba is not available (%s): using the NumPy kernels", exc)
        return False
    return True


def backend(requested: str | None = None) -> str:
    """The kernel path a model loaded now would use: ``requested``, else ``$SMALLMIND_KERNELS``, else
    numba when it imports."""
    choice = (requested or os.environ.get(KERNELS_ENV, "") or "auto").strip().lower()
    if choice not in (*BACKENDS, "auto"):
        raise ValueError(f"{KERNELS_ENV}={choice!r}: expected one of numba, numpy, auto")
    if choice == "numpy":
        return "numpy"
    if _numba_available():
        return "numba"
    if choice == "numba":
        raise ValueError(f"{KERNELS_ENV}=numba but numba cannot be imported")
    return "numpy"


def cache_dir() -> Path:
    """Where numba keeps the compiled kernels (the app's cache directory unless NUMBA_CACHE_DIR is set)."""
    return Path(os.environ.get("NUMBA_CACHE_DIR") or paths.cache_dir() / "numba")


def compiled_on_disk() -> bool:
    """Whether compiled kernels are on disk already (else the next ``warm_up()`` compiles them)."""
    return any(cache_dir().rglob("jit.*.nbi"))


def warm_up() -> float:
    """Compile every kernel (the first start, ~10-30 s) or load it from the disk cache (well under a
    second), by running each once on a tiny matrix. Returns the seconds it took."""
    started = time.perf_counter()
    if _numba_available():
        rng = np.random.default_rng(0)
        q = rng.integers(-8, 8, (4, 64), dtype=np.int8)
        d = np.ones((4, 2), dtype=F32)
        for m in (None, d):
            w = BlockWeight(q, d, m)
            for n in (1, 2, 4, 8, SMALL_ROWS + 1):
                linear(np.ones((n, 64), dtype=F32), w)
        from .attention import warm_up as warm_attention

        warm_attention()  # the fused attention kernel for the default (float32) cache
    return time.perf_counter() - started


_EMPTY = np.empty((0, 0), dtype=F32)
_scratch = threading.local()


def _tile_buffer(n_values: int) -> np.ndarray:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n_values:
        buf = _scratch.buf = np.empty(n_values, dtype=F32)
    return buf[:n_values]


def linear(x: np.ndarray, w: Weight) -> np.ndarray:
    """x @ W.T for W stored (out, in): (N, in) float32 -> (N, out) float32."""
    if isinstance(w, DenseWeight):
        return x @ w.wt
    if x.shape[0] <= SMALL_ROWS:
        return _small(x, w)
    return _large(x, w)


def _small(x: np.ndarray, w: BlockWeight) -> np.ndarray:
    from .jit import MATVEC

    N, K = x.shape
    group = 1 if N == 1 else 2 if N == 2 else 4 if N <= 4 else 8
    padded = -(-N // group) * group
    if padded != N or not x.flags.c_contiguous or x.dtype != F32:
        xp = np.zeros((padded, K), dtype=F32)
        xp[:N] = x
        x = xp
    if w.m is None:
        xs, m = _EMPTY, _EMPTY
    else:
        nb = w.d.shape[1]
        xs, m = x.reshape(padded, nb, K // nb).sum(axis=2), w.m  # (padded, nb) per-block sums of x
    out = np.empty((padded, w.q.shape[0]), dtype=F32)
    MATVEC[group](x, xs, w.q, w.d, m, out)
    return out[:N] if padded != N else out


def _large(x: np.ndarray, w: BlockWeight) -> np.ndarray:
    """Rows of W split over the engine's threads; each expands tiles of its rows and runs BLAS."""
    O = w.q.shape[0]
    out = np.empty((x.shape[0], O), dtype=F32)
    n = cpu.threads()
    bounds = np.linspace(0, O, n + 1).astype(int)
    jobs = [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]
    cpu.run_split([functools.partial(_expand_and_multiply, x, w, a, b, out) for a, b in jobs])
    return out


def _expand_and_multiply(x: np.ndarray, w: BlockWeight, row0: int, row1: int, out: np.ndarray) -> None:
    from .jit import dequantize_rows

    K = w.q.shape[1]
    m = _EMPTY if w.m is None else w.m
    rows = max(1, min(row1 - row0, TILE_VALUES // K))
    buf = _tile_buffer(rows * K)
    for r0 in range(row0, row1, rows):
        n = min(rows, row1 - r0)
        tile = buf[: n * K].reshape(n, K)
        dequantize_rows(w.q, w.d, m, r0, tile)
        out[:, r0 : r0 + n] = x @ tile.T
