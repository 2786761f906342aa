"""Shared by the benchmark scripts: machine facts, the commit, medians, JSON + a Markdown table.

Benchmarks print ratios measured in one run; they never assert on speed (the machine is shared).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = "unknown"
    try:
        config = np.show_config(mode="dicts")  # type: ignore[call-arg]
        lapack = config.get("Build Dependencies", {}).get("blas", {})
        blas = f"{lapack.get('name', '?')} {lapack.get('version', '')}".strip()
    except Exception:  # older NumPy: no dict mode
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def median_time(fn: Callable[[], object], runs: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds over ``runs`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def default_model_path() -> str:
    from engine.download import resolve_model_path

    return str(resolve_model_path())


def report(name: str, results: dict[str, Any], table: list[tuple[str, ...]], json_path: str | None) -> None:
    """Print the JSON document and the Markdown table (first row = header)."""
    document = {"benchmark": name, "machine": machine_info(), "results": results}
    print(json.dumps(document, indent=2, default=float))
    if json_path:
        Path(json_path).write_text(json.dumps(document, indent=2, default=float))
    print()
    header, *rows = table
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
