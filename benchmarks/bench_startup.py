"""Time from starting the app to a window with the model loaded and ready, cold and warm.

    python benchmarks/bench_startup.py [--model PATH] [--runs 3]

Each start is a fresh Python process (offscreen Qt) with its own SMALLMIND_HOME. "First start" has
no compiled kernels on disk (an empty NUMBA_CACHE_DIR), so it includes compiling them; "warm start"
reuses that cache, as every later start of the app does. Measured from process start (before any
import) to the window's model being ready, on both kernel paths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, default_model_path, report

CHILD = """
import time
started = time.perf_counter()
import json, sys
from PySide6.QtCore import QTimer
from smallmind_app import create_window
from smallmind_app.app import ensure_application
app = ensure_application()
window = create_window(sys.argv[1])
window.show()
deadline = time.perf_counter() + 600

def check():
    if window.model_info or time.perf_counter() > deadline:
        print(json.dumps({"ready_s": time.perf_counter() - started, "ok": bool(window.model_info)}))
        window.close()
        app.quit()
    else:
        QTimer.singleShot(20, check)

QTimer.singleShot(0, check)
app.exec()
"""


def start_once(model: str, home: Path, cache: Path, kernels: str) -> dict[str, Any]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "SMALLMIND_HOME": str(home),
           "NUMBA_CACHE_DIR": str(cache), "SMALLMIND_KERNELS": kernels}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", CHILD, model], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900, check=True)  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = args.model or default_model_path()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "numba"
        for kernels in ("numba", "numpy"):
            runs = []
            for i in range(args.runs + (1 if kernels == "numba" else 0)):
                runs.append(start_once(model, Path(tmp) / f"home-{kernels}-{i}", cache, kernels)["ready_s"])
            if kernels == "numba":
                results["numba_first_start_s"] = runs.pop(0)
            results[f"{kernels}_warm_start_s"] = sorted(runs)[len(runs) // 2]
    rows = [("start", "seconds to a ready window", "target"),
            ("first start, numba kernels (compiles them)", f"{results['numba_first_start_s']:.1f}", ""),
            ("warm start, numba kernels", f"{results['numba_warm_start_s']:.1f}", "< 3 s"),
            ("warm start, NumPy kernels", f"{results['numpy_warm_start_s']:.1f}", "")]  # fmt: skip
    report("startup", results, rows, args.json)


if __name__ == "__main__":
    main()
