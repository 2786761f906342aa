"""``linear()``: the one entry point for every projection of the model, and the weights it reads.

Two paths, chosen when a model is loaded (``backend()``):

- ``"numba"``: quantized weights stay in the file's bits (``PackedWeight``); decode-sized steps (up
  to 16 rows, and as many more as the CPU's calibration found faster, ``calibration.py``) run the
  register-tiled kernel of ``quant.py`` on the engine's worker pool (``pool.py``), reading each
  weight once for all rows; larger steps (prefill chunks) expand one tile of weights at a time to
  float32 and use BLAS.
- ``"numpy"``: every weight dequantized to float32 at load and multiplied by BLAS: the reference
  path and the fallback where numba is not installed. ``SMALLMIND_KERNELS=numpy`` selects it.

Both give the same results up to float32 summation order (tests hold them together).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np

from .. import paths
from . import cpu
from .cpu import MAX_THREADS, available_cpus, compute, requested_threads, set_threads, threads
from .weights import BLOCK_TYPES, LANES, BlockWeight, DenseWeight, PackedWeight, Panels, Weight, embed

log = logging.getLogger(__name__)

F32 = np.float32
KERNELS_ENV = "SMALLMIND_KERNELS"
ACTIVATIONS_ENV = "SMALLMIND_ACTIVATIONS"
ACTIVATIONS = ("float32", "int8")
BACKENDS = ("numba", "numpy")
SMALL_ROWS = 16  # up to this many rows a step always runs the JIT kernel (beyond: see calibration.py)
BLAS_ATTENTION_ROWS = 16  # a chunk this long after as many cached tokens: attention() by BLAS, not fused
TILE_VALUES = 1 << 20  # weights expanded per BLAS tile and thread (4 MiB of float32: stays in cache)

__all__ = [
    "BLOCK_TYPES",
    "MAX_THREADS",
    "BlockWeight",
    "DenseWeight",
    "PackedWeight",
    "Weight",
    "available_cpus",
    "backend",
    "calibrate_later",
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
    try:
        with _kernels_cache_dir():  # the kernels' modules: their functions are decorated now
            from . import attention, quant  # noqa: F401  (compiled lazily, on first call)
    except ImportError as exc:
        log.warning("numba is not available (%s): using the NumPy kernels", exc)
        return False
    return True


@contextmanager
def _kernels_cache_dir() -> Iterator[None]:
    """numba's cache directory for the engine's kernels only. numba picks a function's cache directory
    when the function is decorated (``cache=True``), from ``numba.config.CACHE_DIR``: it is set here
    while the kernel modules are imported and put back after, so other numba code in the process
    keeps its own, and no environment variable is set."""
    from numba.core import config

    before = config.CACHE_DIR  # type: ignore[attr-defined]
    config.CACHE_DIR = str(cache_dir())  # type: ignore[attr-defined]
    try:
        yield
    finally:
        config.CACHE_DIR = before  # type: ignore[attr-defined]


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
    """Where numba keeps the compiled kernels: NUMBA_CACHE_DIR if set, else a directory of the app's
    cache named after the kernels' sources. numba checks a cached function against its own file only,
    not the files of what it inlined (a kernel compiled with an older ``pool.dispatch`` would load
    as valid): a change to any kernel file starts a fresh directory."""
    return Path(os.environ.get("NUMBA_CACHE_DIR") or paths.cache_dir() / "numba" / _sources_digest())


@cache
def _sources_digest() -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return f"kernels-{digest.hexdigest()[:12]}"


def compiled_on_disk() -> bool:
    """Whether compiled kernels are on disk already (else the next ``warm_up()`` compiles them)."""
    return any(cache_dir().rglob("quant.*.nbi"))


def warm_up() -> float:
    """Compile every kernel (the first start, ~10-30 s) or load it from the disk cache (well under a
    second), by running each once on a tiny matrix; once per process (a second model's load does not
    wait for it). Returns the seconds it took."""
    started = time.perf_counter()
    with _warm_lock:
        if _numba_available() and not _warm_done:
            _warm_up_now()
    return time.perf_counter() - started


_warm_lock = threading.Lock()
_warm_done = False


def _warm_up_now() -> None:
    global _warm_done
    from .pool import pool

    pool().warm_up()
    for w in _warm_up_weights():
        for n in (1, 2, 4, 8, SMALL_ROWS + 1):
            linear(np.ones((n, w.shape[1]), dtype=F32), w)  # with the activations in effect
        embed(w, np.array([1]))
    from .attention import warm_up as warm_attention

    warm_attention()  # the fused attention kernel for the default (float32) cache
    from .blocks import warm_up as warm_blocks

    warm_blocks()  # a decode step's blocks in one call
    _warm_done = True


def _warm_up_weights() -> list[PackedWeight]:
    """One small matrix of each layout the kernels are compiled for: nibbles with float16 scales and
    minimums (Q4_1) or none (Q4_0), with high bits (Q5_0), int8 (Q8_0), float32 sub-block scales
    (Q4_K), 16-value blocks with two high bits (Q6_K)."""
    from . import weights as kw

    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (16, 256), dtype=np.int8)
    d = np.ones((16, 8), dtype=F32)
    d16 = np.ones((16, 16), dtype=F32)
    layouts = [
        BlockWeight(q, d, d, 4, 0),
        BlockWeight(q, d, None, 4, -8),
        BlockWeight(q, d, None, 5, -16),
        BlockWeight(q, d, None, 8, 0),
        BlockWeight(q, d * F32(0.3), d * F32(0.3), 4, 0),
        BlockWeight(q, d16 * F32(0.3), None, 6, -32),
    ]
    return [kw.finish(w) for w in layouts]  # type: ignore[misc]


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
    if x.shape[0] <= w.kernel_rows:
        return _small(x, w)
    if w.calibration is not None and w.calibration.pending:  # the model's first step beyond 16 rows
        w.calibration.run(_small_alone, _large_alone, cache_dir() / "calibration.json")
        if x.shape[0] <= w.kernel_rows:
            return _small(x, w)
    return _large(x, w)


def calibrate_later(sample: Weight, matrices: list[Weight]) -> None:
    """At the first step of more than 16 rows on any of ``matrices``, find (once per CPU, cached)
    where the kernel stops beating expand + BLAS on matrices like ``sample`` (``calibration.py``)."""
    from .calibration import Calibration

    if not isinstance(sample, PackedWeight):
        return
    packed = [w for w in matrices if isinstance(w, PackedWeight)]
    group = Calibration(sample, packed)
    for w in packed:
        w.calibrate_with(group)


def _small_alone(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    """``_small`` on the calling thread only (a private job no worker sees)."""
    from .pool import CTRL_WORDS, JOB_WORDS
    from .quant import project, project_chunk

    out = np.empty((x.shape[0], w.padded_rows), dtype=F32)
    ctrl, job = np.zeros(CTRL_WORDS, dtype=np.int64), np.zeros(JOB_WORDS, dtype=np.int64)
    project(ctrl, job, w.kernel_table(), np.ascontiguousarray(x, dtype=F32), out, _max_tile(),
            *w.block_sizes, project_chunk())  # fmt: skip
    return out


def _large_alone(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    """``_large`` on the calling thread only, BLAS on one thread."""
    out = np.empty((x.shape[0], w.padded_rows), dtype=F32)
    with cpu.blas_threads(1):
        col = 0
        for part in w.parts:
            _expand_and_multiply(x, part, 0, part.n_panels, col, out)
            col += part.n_panels * LANES
    return out


def set_activations(mode: str) -> str:
    """The activations' precision in the numba kernels' projections: "float32" (the default: greedy
    output equal to the float32 reference) or "int8" (``vnni.py``: llama.cpp's way, faster for
    batched steps, not exact); "int8" needs AVX-512 VNNI and stays float32 where the CPU lacks it.
    Returns the mode in effect. ``$SMALLMIND_ACTIVATIONS`` sets the default."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations={mode!r}: expected one of {', '.join(ACTIVATIONS)}")
    from . import vnni

    _activations["mode"] = "int8" if mode == "int8" and vnni.available() else "float32"
    return _activations["mode"]


def activations() -> str:
    """The activations' precision in effect ("float32" or "int8")."""
    if "mode" not in _activations:
        set_activations(default_activations())
    return _activations["mode"]


def default_activations() -> str:
    """``$SMALLMIND_ACTIVATIONS``, else "float32"; a value that is neither is logged and float32 kept
    (a bad variable must not fail the first projection; settings and the command line check theirs
    and say so)."""
    value = os.environ.get(ACTIVATIONS_ENV, "").strip().lower() or "float32"
    if value not in ACTIVATIONS:
        log.warning(
            "%s=%r is not one of %s: float32 activations", ACTIVATIONS_ENV, value, ", ".join(ACTIVATIONS)
        )
        return "float32"
    return value


_activations: dict[str, str] = {}


def projection() -> tuple[object, int]:
    """(the compiled projection job, its chunk function's address) for the activations in effect."""
    if activations() == "int8":
        from . import vnni

        return vnni.project, vnni.project_chunk()
    from . import quant

    return quant.project, quant.project_chunk()


def _small(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    """The register-tiled kernel over every panel, on the engine's threads (``pool.py``)."""
    from .pool import pool

    if x.dtype != F32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty((x.shape[0], w.padded_rows), dtype=F32)
    table = w._table if w._table is not None else w.kernel_table()
    sums32, sums16 = w.block_sizes
    project, chunk = projection()
    pool().run(project, table, x, out, _max_tile(), sums32, sums16, chunk)
    return out if w.padded_rows == w.shape[0] else out[:, : w.shape[0]]


@cache
def _max_tile() -> int:
    """Activation rows per register tile: 8 needs AVX-512's 32 vector registers, else 4. Read from
    the features numba compiles for (the host's, unless NUMBA_CPU_FEATURES names others, as the
    tests do to build and run the AVX2 code on an AVX-512 machine)."""
    import llvmlite.binding as llvm
    from numba.core import config

    features = getattr(config, "CPU_FEATURES", None)  # set by numba's config at run time
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return 8 if "+avx512f" in features.split(",") else 4


def _large(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    """Panels split over the engine's threads; each expands tiles of its panels to float32 and runs
    BLAS (the kernels' spinning workers sleep meanwhile: BLAS needs their cores)."""
    from .pool import pool

    pool().pause()
    out = np.empty((x.shape[0], w.padded_rows), dtype=F32)
    jobs = []
    col = 0
    for part in w.parts:
        n = min(cpu.threads(), part.n_panels)
        bounds = np.linspace(0, part.n_panels, n + 1).astype(int)
        jobs += [(part, int(a), int(b), col) for a, b in itertools.pairwise(bounds) if b > a]
        col += part.n_panels * LANES
    cpu.run_split([functools.partial(_expand_and_multiply, x, *job, out) for job in jobs])
    return out if w.padded_rows == w.shape[0] else out[:, : w.shape[0]]


def _expand_and_multiply(x: np.ndarray, part: Panels, p0: int, p1: int, col: int, out: np.ndarray) -> None:
    from .quant import dequantize

    K = x.shape[1]
    step = max(1, TILE_VALUES // (K * LANES))  # panels per tile
    buf = _tile_buffer(step * LANES * K)
    for a in range(p0, p1, step):
        b = min(a + step, p1)
        tile = buf[: (b - a) * LANES * K].reshape(K, (b - a) * LANES)  # (K, 16 panels)
        dequantize(*part.arrays(), a, b, tile)
        out[:, col + a * LANES : col + b * LANES] = x @ tile
