"""Single-stream speed and memory of the engine on both kernel paths, in one run.

    python benchmarks/bench_engine.py [--model PATH] [--quick] [--json out.json] [--skip-busy]

For each kernel path ("numba": weights kept quantized, JIT kernels for small steps; "numpy": float32
weights and BLAS, the reference path) it reports: load time; resident memory after loading and the
peak during the load (each path loaded in a fresh subprocess); prefill tokens/s of a 256-token
prompt; decode tokens/s over 128 tokens (the bare model loop, and one request through the batched
engine); the cost of one decode step of B sequences against the 1-sequence step (B = 1..32); the
chain of the model's projections alone at the same row counts; decode tokens/s at 256, 2,048 and
6,144 tokens of context. Then, on the numba path, decode beside one busy process (`python -c "while
True: pass"`) against the quiet single-thread figure, with the engine's automatic thread count and
with two threads fixed. If llama-cpp-python is installed, single-stream decode of ours and of llama.cpp
on the same file, each in its own process with the user's environment (``anchor.py``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
from anchor import compare, llama_cpp_version, physical_cores
from common import ROOT, default_model_path, median_time, report

from engine import BatchedInferenceEngine, BatchingOptions, InferenceOptions, Model, Tokenizer, kernels
from engine.gguf import GgufFile
from engine.kernels import linear
from engine.model import Row

PATHS = ("numba", "numpy")
PROMPT_TOKENS = 256
DECODE_TOKENS = 128
STEP_ROWS = (1, 2, 4, 8, 16, 32)
CONTEXTS = (256, 2048, 6144)

RSS_SCRIPT = """
import json, resource, sys
from engine import Model
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mb()
model = Model.from_gguf(sys.argv[1], kernel_path=sys.argv[2])
print(json.dumps({"rss_before_mb": before, "rss_after_load_mb": rss_mb(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "weights_mb": model.weights.nbytes / 2**20}))
"""


def memory(path: str, kernel_path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, path, kernel_path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def matmul_chain(model: Model, n_rows: int, runs: int | None = None) -> float:
    """Seconds for one pass of the model's projections (every layer's fused qkv, output, gate/up and
    down, then the LM head) on (n_rows, in) activations: no attention, norms or sampling."""
    w = model.weights
    mats = [m for layer in w.layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)]
    mats.append(w.lm_head)
    rng = np.random.default_rng(0)
    inputs = {m.shape[1]: rng.standard_normal((n_rows, m.shape[1]), dtype=np.float32) for m in mats}

    def run() -> None:
        with model._threads():
            for m in mats:
                linear(inputs[m.shape[1]], m)

    return median_time(run, runs=runs or (15 if n_rows <= 32 else 5), warmup=2)


def prompt_ids(tok: Tokenizer, n: int) -> list[int]:
    text = (
        "SmallMind runs a language model on your own computer. It keeps every conversation's keys and "
        "values in a cache so a follow-up message only computes its new tokens, and it serves several "
        "conversations at once in shared forward passes. "
    )
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(text)
    return ids[:n]


def decode_loop(model: Model, ids: list[int], n_new: int) -> float:
    """Tokens/s of greedy decoding with the bare model (prefill excluded)."""
    cache = model.new_cache(len(ids) + n_new + 1)
    logits = model.forward_last([Row(np.asarray(ids), cache)])[0]
    started = time.perf_counter()
    for _ in range(n_new):
        token = int(np.argmax(logits))
        logits = model.forward_last([Row(np.asarray([token]), cache)])[0]
    return n_new / (time.perf_counter() - started)


def decode_step_ms(model: Model, ids: list[int], n_rows: int, n_steps: int = 12) -> float:
    """Median ms of one decode step of ``n_rows`` sequences (each with ``ids`` cached)."""
    caches = [model.new_cache(len(ids) + n_steps + 2) for _ in range(n_rows)]
    for cache in caches:
        model.forward_last([Row(np.asarray(ids), cache)])
    tokens = [int(ids[-1])] * n_rows
    times = []
    for _ in range(n_steps):
        started = time.perf_counter()
        logits = model.forward_last([Row(np.asarray([t]), c) for t, c in zip(tokens, caches, strict=True)])
        times.append(time.perf_counter() - started)
        tokens = [int(t) for t in logits.argmax(axis=1)]
    return float(np.median(times)) * 1000.0


def engine_decode(model: Model, tok: Tokenizer, ids: list[int], n_new: int) -> float:
    """Decode tokens/s of one request through the batched engine (scheduler, sampling, detokenizer)."""
    engine = BatchedInferenceEngine(model, tok, BatchingOptions(max_batch_wait_ms=0))
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new, stop_on_eos=False)
    handle = engine.submit(tok.decode(ids), options)
    while not handle.done():
        engine.step()
    return handle.result().decode_tokens_per_s


def long_context_decode(model: Model, tok: Tokenizer, n_context: int, n_new: int = 16) -> float:
    """Decode tokens/s with ``n_context`` tokens already cached (prefill excluded)."""
    return decode_loop(model, prompt_ids(tok, n_context), n_new)


def busy_decode(model: Model, ids: list[int], n_new: int) -> dict[str, float]:
    """Decode tokens/s quiet (1 thread, the baseline) and beside one busy process (auto threads, and 2
    threads fixed)."""
    out: dict[str, float] = {}
    kernels.set_threads(1)
    out["quiet_1_thread"] = decode_loop(model, ids, n_new)
    kernels.set_threads(0)
    out["quiet_auto"] = decode_loop(model, ids, n_new)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)  # the load monitor sees it within its interval
        out["busy_auto"] = decode_loop(model, ids, n_new)
        out["busy_auto_threads"] = kernels.threads()
        kernels.set_threads(2)
        out["busy_2_threads"] = decode_loop(model, ids, n_new)
    finally:
        hog.kill()
        hog.wait(timeout=10)
        kernels.set_threads(0)
    return out


def llama_cpp_decode(path: str, ids: list[int], n_new: int, rounds: int = 2) -> dict[str, float] | None:
    """Single-stream decode of ours and of llama.cpp, each in its own process with the user's
    environment, alternating, best of ``rounds`` (``anchor.py``); None without llama-cpp-python."""
    if llama_cpp_version() is None:
        return None
    spec = {"model": path, "prompt_ids": ids, "n_new": n_new, "threads": physical_cores()}
    r = compare("decode", spec, rounds)
    return {"smallmind": r["smallmind"]["tokens_per_s"], "llama_cpp": r["llama.cpp"]["tokens_per_s"],
            "threads": physical_cores()}  # fmt: skip


def measure_path(path: str, kernel_path: str, quick: bool) -> dict[str, Any]:
    started = time.perf_counter()
    f = GgufFile(path)
    model, tok = Model.from_gguf(f, kernel_path=kernel_path), Tokenizer.from_gguf(f)
    r: dict[str, Any] = {"load_s": time.perf_counter() - started}
    r.update(memory(path, kernel_path))
    ids = prompt_ids(tok, PROMPT_TOKENS)
    runs = 1 if quick else 3
    n_decode = 32 if quick else DECODE_TOKENS
    prefill_s = median_time(
        lambda: model.forward_last([Row(np.asarray(ids), model.new_cache(PROMPT_TOKENS))]), runs
    )
    r["prefill_tokens_per_s"] = PROMPT_TOKENS / prefill_s
    r["decode_tokens_per_s"] = float(np.median([decode_loop(model, ids[:32], n_decode) for _ in range(runs)]))
    r["engine_decode_tokens_per_s"] = float(
        np.median([engine_decode(model, tok, ids[:32], n_decode) for _ in range(runs)])
    )
    r["step_ms"] = {n: decode_step_ms(model, ids[:32], n) for n in STEP_ROWS}
    r["chain_ms"] = {n: matmul_chain(model, n) * 1000.0 for n in (*STEP_ROWS, PROMPT_TOKENS)}
    contexts = CONTEXTS[:2] if quick else CONTEXTS
    r["context_decode_tokens_per_s"] = {n: long_context_decode(model, tok, n) for n in contexts}
    return r


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer runs and tokens")
    parser.add_argument("--skip-busy", action="store_true", help="skip the run beside a busy process")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    path = args.model or default_model_path()
    results: dict[str, Any] = {"model": str(path), "gguf_mb": __import__("os").path.getsize(path) / 2**20}
    for kernel_path in PATHS:
        if kernels.backend("auto") != "numba" and kernel_path == "numba":
            continue
        results[kernel_path] = measure_path(path, kernel_path, args.quick)
    n_decode = 32 if args.quick else DECODE_TOKENS
    if "numba" in results and not args.skip_busy:
        f = GgufFile(path)
        model, tok = Model.from_gguf(f, kernel_path="numba"), Tokenizer.from_gguf(f)
        results["busy"] = busy_decode(model, prompt_ids(tok, 32), n_decode)
        results["llama_cpp_decode"] = llama_cpp_decode(path, prompt_ids(tok, 32), n_decode)
    report("engine", results, table(results), args.json)


def table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    fast, ref = results.get("numba"), results["numpy"]
    gguf_mb = results["gguf_mb"]

    def pair(key: str, fmt: str, scale: float = 1.0) -> tuple[str, str, str]:
        a = fast[key] * scale if fast else float("nan")
        b = ref[key] * scale
        return fmt.format(a), fmt.format(b), f"{a / b:.2f}x"

    rows: list[tuple[str, ...]] = [("measure", "numba path", "NumPy path", "numba / NumPy")]
    rows.append(("load", *pair("load_s", "{:.2f} s")))
    rows.append(("weights in memory", *pair("weights_mb", "{:.0f} MiB")))
    rows.append((f"RSS after load (GGUF {gguf_mb:.0f} MiB)", *pair("rss_after_load_mb", "{:.0f} MiB")))
    rows.append(("peak RSS during load", *pair("peak_rss_mb", "{:.0f} MiB")))
    rows.append(("prefill, 256-token prompt", *pair("prefill_tokens_per_s", "{:.0f} tok/s")))
    rows.append(("decode (model loop)", *pair("decode_tokens_per_s", "{:.1f} tok/s")))
    rows.append(("decode (batched engine, 1 request)", *pair("engine_decode_tokens_per_s", "{:.1f} tok/s")))
    for n in STEP_ROWS:
        a = fast["step_ms"][n] if fast else float("nan")
        b = ref["step_ms"][n]
        rel_a = a / fast["step_ms"][1] if fast else float("nan")
        rows.append((f"decode step, {n} rows (x 1-row step)", f"{a:.1f} ms ({rel_a:.2f}x)",
                     f"{b:.1f} ms ({b / ref['step_ms'][1]:.2f}x)", f"{a / b:.2f}x"))  # fmt: skip
    for n in (*STEP_ROWS, PROMPT_TOKENS):
        a = fast["chain_ms"][n] if fast else float("nan")
        b = ref["chain_ms"][n]
        rows.append((f"projections only, {n} rows", f"{a:.1f} ms", f"{b:.1f} ms", f"{a / b:.2f}x"))
    for n, b in ref["context_decode_tokens_per_s"].items():
        a = fast["context_decode_tokens_per_s"][n] if fast else float("nan")
        rows.append(
            (f"decode at {n:,} tokens of context", f"{a:.1f} tok/s", f"{b:.1f} tok/s", f"{a / b:.2f}x")
        )
    busy = results.get("busy")
    if busy:
        base = busy["quiet_1_thread"]
        rows.append(("decode quiet, 1 thread / auto", f"{base:.1f} / {busy['quiet_auto']:.1f} tok/s", "", ""))
        rows.append(
            (
                f"decode beside a busy process, auto ({busy['busy_auto_threads']} thread)",
                f"{busy['busy_auto']:.1f} tok/s ({busy['busy_auto'] / base:.0%} of quiet 1-thread)",
                "",
                "",
            )
        )
        rows.append(("decode beside a busy process, 2 threads",
                     f"{busy['busy_2_threads']:.1f} tok/s ({busy['busy_2_threads'] / base:.0%})", "", ""))  # fmt: skip
    lcpp = results.get("llama_cpp_decode")
    if lcpp:
        rows.append((f"decode, ours vs llama.cpp, each in its own process ({lcpp['threads']} threads)",
                     f"{lcpp['smallmind']:.1f} tok/s", f"llama.cpp {lcpp['llama_cpp']:.1f} tok/s",
                     f"ours {lcpp['smallmind'] / lcpp['llama_cpp']:.2f}x"))  # fmt: skip
    else:
        rows.append(("llama.cpp decode", "llama-cpp-python not installed", "", ""))
    return rows


if __name__ == "__main__":
    main()
