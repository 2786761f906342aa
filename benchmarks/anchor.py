"""The fair harness for every figure compared with llama.cpp: each figure runs in its own subprocess.

    from anchor import compare, prompts
    ids = prompts(model_path)                      # the prompts as our tokenizer encodes them
    figure = compare("decode", {"model": path, "prompt_ids": ids["decode"], "n_new": 128}, rounds=3)
    figure["smallmind"]["tokens_per_s"], figure["llama.cpp"]["tokens_per_s"]

Rules (docs/kernels.md, "Benchmarks against llama.cpp"):
- every figure, ours and llama.cpp's, is measured in a fresh child process (``python anchor.py
  --child ENGINE MEASURE``, the spec on stdin, one JSON line out);
- each child gets the user's environment as it was when the benchmark started (``USER_ENV``: on
  Linux read from /proc/self/environ, which no later ``os.environ`` change alters), so nothing the
  engine sets in a process (numba's cache folder, a thread setting) reaches llama.cpp, and nothing
  one child sets reaches the next;
- the two engines alternate (ours first in even rounds, llama.cpp first in odd ones) and the best
  round of each is kept: on a shared machine the best is the figure least disturbed by others;
- both get the same thread count (the machine's physical cores unless told otherwise), the same
  prompt ids (encoded once by our tokenizer) and greedy decoding.

The parent process imports neither the engine nor llama.cpp. Children: ``anchor_smallmind.py`` and
``anchor_llamacpp.py`` (one ``measure_<name>(spec)`` per figure each).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("smallmind", "llama.cpp")


def _user_environment() -> dict[str, str]:
    """The environment this process started with: /proc/self/environ holds the block the process was
    started with (``os.environ`` changes made since do not alter it); elsewhere a copy taken now."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {os.fsdecode(k): os.fsdecode(v) for k, v in pairs}


USER_ENV = _user_environment()


def cpu_model() -> str:
    """``lscpu``'s model name (the CPU every figure is reported with)."""
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**USER_ENV, "LC_ALL": "C"})
        for line in out.stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_flags() -> str:
    """The vector extensions that matter to the kernels (AVX2, AVX-512, VNNI), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_fp16")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512"


def physical_cores() -> int:
    """Cores this process may run on, SMT siblings counted once (both engines get this many threads)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        sibling = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(sibling.read_text().strip() if sibling.exists() else str(cpu))
    return max(1, len(cores))


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version if it is installed (read from its metadata: not imported here)."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class ChildError(RuntimeError):
    """A child process failed; the message carries its stderr's tail."""


def reference(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The reference prompts and their float32 last-position logits (``spec["reference_dir"]``), for
    the engines' ``measure_accuracy``."""
    import numpy as np

    folder = Path(spec["reference_dir"])
    prompts = json.loads((folder / "prompts.json").read_text("utf-8"))["prompts"]
    with np.load(folder / "logits.npz") as data:
        return prompts, {key: data[key] for key in data.files}


def run_child(engine: str, measure: str, spec: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Run one figure in a fresh process with the user's environment; its result dict."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: expected one of {ENGINES}")
    command = [sys.executable, str(HERE / "anchor.py"), "--child", engine, measure]
    out = subprocess.run(command, input=json.dumps(spec), capture_output=True, text=True, cwd=ROOT,
                         env=USER_ENV, timeout=timeout_s)  # fmt: skip
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise ChildError(f"{engine} {measure} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    result = dict(json.loads(lines[-1]))
    result["load_average"] = load_average()
    return result


_LLAMA_DEFAULTS: dict[str, dict[str, Any]] = {}


def llama_cpp_defaults(model: str, threads: int) -> dict[str, Any]:
    """Settings llama.cpp needs to run here: its defaults, unless a probe child crashes with them.
    Seen on an Intel Xeon (Emerald Rapids) VM: llama-cpp-python 0.3.36's AMX matmul
    (``ggml_backend_amx_mul_mat``) segfaults on the first decode; then llama.cpp runs without its extra
    buffer types (``use_extra_bufts=False``: no AMX, no weight repacking) and the note says so."""
    key = f"{model}:{threads}"
    if key not in _LLAMA_DEFAULTS:
        spec = {"model": model, "threads": threads}
        try:
            run_child("llama.cpp", "probe", spec, timeout_s=300)
            _LLAMA_DEFAULTS[key] = {}
        except ChildError as exc:
            run_child("llama.cpp", "probe", {**spec, "extra_bufts": False}, timeout_s=300)
            note = "llama.cpp crashed with its defaults here; it runs with use_extra_bufts=False (no AMX, no repacking)"
            print(f"note: {note} ({str(exc)[:120]})", file=sys.stderr, flush=True)
            _LLAMA_DEFAULTS[key] = {"extra_bufts": False, "note": note}
    return _LLAMA_DEFAULTS[key]


def compare(
    measure: str,
    spec: dict[str, Any],
    rounds: int = 3,
    key: str = "tokens_per_s",
    engines: dict[str, dict[str, Any]] | None = None,
    lower_is_better: bool = False,
) -> dict[str, Any]:
    """``measure`` for each engine in its own process, alternating, ``rounds`` rounds; the best round
    of each (by ``key``). ``engines`` maps a label to (engine, extra spec): default ours and
    llama.cpp with ``spec`` as it is. llama.cpp is skipped (its entry None) when not installed."""
    engines = engines or {name: {"engine": name} for name in ENGINES}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in engines}
    labels = [label for label, e in engines.items() if e["engine"] != "llama.cpp" or llama_cpp_version()]
    llama = {}
    if any(engines[label]["engine"] == "llama.cpp" for label in labels):
        llama = {k: v for k, v in llama_cpp_defaults(spec["model"], int(spec.get("threads", 0))).items()
                 if k != "note"}  # fmt: skip
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            extra = {k: v for k, v in engines[label].items() if k != "engine"}
            if engines[label]["engine"] == "llama.cpp":
                extra = {**llama, **extra}
            result = run_child(engines[label]["engine"], measure, {**spec, **extra})
            runs[label].append(result)
            print(f"  {measure} {label}: {result.get(key)}", file=sys.stderr, flush=True)
    pick = min if lower_is_better else max
    out: dict[str, Any] = {
        label: (pick(runs[label], key=lambda x: x[key]) if runs[label] else None) for label in engines
    }
    out["runs"] = runs
    return out


def prompts(model: str, n_context: int = 6144) -> dict[str, Any]:
    """The prompt ids every figure uses, encoded once by our tokenizer (in a child process)."""
    return run_child("smallmind", "prompts", {"model": model, "n_context": n_context})


def child_main(engine: str, measure: str) -> None:
    """Entry of a child: read the spec from stdin, run ``measure_<measure>``, print one JSON line."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    spec = json.loads(sys.stdin.read() or "{}")
    spec.setdefault("rss_start_mib", rss_mib())  # before the engine or llama.cpp is imported
    module = __import__("anchor_smallmind" if engine == "smallmind" else "anchor_llamacpp")
    fn = getattr(module, f"measure_{measure}", None)
    if fn is None:
        raise SystemExit(f"{engine} has no measure {measure!r}")
    started = time.perf_counter()
    result = fn(spec)
    result["child_s"] = time.perf_counter() - started
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: anchor.py --child ENGINE MEASURE  (the spec as JSON on stdin)")
