"""The seed's batching table, in one run: 8 concurrent requests x 100 new tokens, served
sequentially (batching off), in the seed's mode (prefill batched, decode per request) and with
continuous batching; streaming latency while a long prompt arrives; bigger batches.

    python benchmarks/bench_batching.py [--model PATH] [--quick] [--skip-tiny] [--json out.json]

Every mode runs the same greedy requests (temperature 0, no EOS stop) so each produces exactly the
same tokens; aggregate tokens/s = generated tokens / wall time from the first submit to the last
result. The NumPy ceiling for batching is the same chain of float32 matmuls at batch 1 and batch 8,
measured in the same run. If llama-cpp-python is installed, llama.cpp serves the same 8 requests with
its batch API and one after another, each in its own process with the user's environment,
alternating with ours in its own process (``anchor.py``; optional, never needed by tests).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from anchor import compare, llama_cpp_version, physical_cores
from bench_engine import matmul_chain
from common import ROOT, default_model_path, report

from engine import (
    BatchedInferenceEngine,
    BatchingOptions,
    GenerationEvent,
    InferenceOptions,
    KvCacheOptions,
    LruKvCacheStore,
    Model,
    Tokenizer,
)
from engine.gguf import GgufFile

QUESTIONS = [
    "What is a large language model, in one sentence?",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "Write a Python function that checks whether a number is prime.",
    "I'm planning a trip to Japan in April. Where should I go?",
    "Translate to French: 'The weather is nice today, let's go for a walk.'",
    "Give me three tips for writing clear emails, with a short example for each one of them.",
    "Explain how a refrigerator keeps food cold. Mention the compressor, the condenser and the evaporator.",
]

MODES = {
    "sequential": BatchingOptions(enabled=False),
    "seed (prefill_only)": BatchingOptions(prefill_only=True),
    "continuous": BatchingOptions(),
}


def load(path: str, kernel_path: str | None = None) -> tuple[Model, Tokenizer]:
    f = GgufFile(path)
    return Model.from_gguf(f, kernel_path=kernel_path), Tokenizer.from_gguf(f)


def numpy_path_baseline(path: str, requests: list[Any], n_new: int, reference: list[Any]) -> dict[str, Any]:
    """Continuous batching on the NumPy kernel path (float32 weights, BLAS): the engine as it was
    before the numba kernels, as the baseline of the same run."""
    model, tok = load(path, "numpy")
    seconds, results = serve(model, tok, MODES["continuous"], requests, n_new)
    tokens = [r.token_ids for r in results]
    return {"tokens_per_s": sum(len(t) for t in tokens) / seconds, "same_tokens": tokens == reference}


def serve(model: Model, tok: Tokenizer, batching: BatchingOptions, requests: list[Any], n_new: int,
          on_event: Any = None) -> tuple[float, list[Any]]:  # fmt: skip
    """Submit every request at once, drive the engine until all finish; (seconds, results)."""
    engine = BatchedInferenceEngine(model, tok, batching, LruKvCacheStore(KvCacheOptions()),
                                    max_concurrent_sessions=1000)  # fmt: skip
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new, stop_on_eos=False)
    started = time.perf_counter()
    handles = [engine.submit(r, options, on_event=on_event) for r in requests]
    while not all(h.done() for h in handles):
        engine.step()
    return time.perf_counter() - started, [h.result() for h in handles]


def batching_table(model: Model, tok: Tokenizer, requests: list[Any], n_new: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    reference = None
    for name, batching in MODES.items():
        seconds, results = serve(model, tok, batching, requests, n_new)
        tokens = [r.token_ids for r in results]
        if reference is None:
            reference = tokens
        out[name] = {
            "seconds": seconds,
            "tokens_per_s": sum(len(t) for t in tokens) / seconds,
            "same_tokens_as_sequential": tokens == reference,
        }
    base = out["sequential"]["tokens_per_s"]
    for name in MODES:
        out[name]["speedup_vs_sequential"] = out[name]["tokens_per_s"] / base
    return out


def streaming_latency(
    model: Model, tok: Tokenizer, n_new: int, chunk: int, long_tokens: int
) -> dict[str, Any]:
    """p95 gap between tokens of 4 streaming requests while a 5th brings a long prompt."""
    last: dict[int, float] = {}
    gaps: list[float] = []
    streaming: set[int] = set()

    def on_event(ev: GenerationEvent) -> None:
        if ev.request_id in streaming and ev.kind == "token":
            now = time.perf_counter()
            if ev.request_id in last:
                gaps.append((now - last[ev.request_id]) * 1000.0)
            last[ev.request_id] = now

    batching = BatchingOptions(max_prefill_chunk_tokens=chunk, max_batch_wait_ms=0)
    engine = BatchedInferenceEngine(model, tok, batching, LruKvCacheStore(KvCacheOptions()))
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new, stop_on_eos=False)
    handles = [
        engine.submit([{"role": "user", "content": q}], options, on_event=on_event) for q in QUESTIONS[:4]
    ]
    streaming.update(h.request_id for h in handles)
    while len(last) < len(handles):  # the four are decoding when the long prompt arrives
        engine.step()
    text = " ".join(QUESTIONS * 40)
    long_ids = tok.encode(text)[:long_tokens]
    long = engine.submit(tok.decode(long_ids), InferenceOptions(temperature=0.0, max_new_tokens=4))
    while not all(h.done() for h in [*handles, long]):
        engine.step()
    return {"chunk_tokens": chunk, "long_prompt_tokens": len(long_ids), "p95_ms": float(np.percentile(gaps, 95)),
            "p50_ms": float(np.percentile(gaps, 50)), "max_ms": float(max(gaps))}  # fmt: skip


def bigger_batches(model: Model, tok: Tokenizer, n_new: int) -> dict[str, Any]:
    requests = [[{"role": "user", "content": QUESTIONS[i % 8] + f" (request {i})"}] for i in range(32)]
    out = {}
    for size in (8, 16, 32):
        seconds, results = serve(model, tok, BatchingOptions(max_batch_size=size), requests, n_new)
        out[f"max_batch_size={size}, 32 requests"] = sum(r.generated_tokens for r in results) / seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n_new = 20 if args.quick else 100
    requests = [[{"role": "user", "content": q}] for q in QUESTIONS]
    results: dict[str, Any] = {"new_tokens_per_request": n_new, "requests": len(requests)}
    rows = [("model", "mode", "aggregate tok/s", "vs sequential", "same tokens")]

    if not args.skip_tiny:
        import sys

        sys.path.insert(0, str(ROOT))
        from tests.fixtures.tiny_model import write_tiny_gguf

        with tempfile.TemporaryDirectory() as tmp:
            tiny_path = write_tiny_gguf(Path(tmp) / "seed.gguf", n_layers=4, hidden_size=128, n_heads=4,
                                        n_kv_heads=4, ffn_size=512, context_length=1024)  # fmt: skip
            tiny, tiny_tok = load(str(tiny_path))
        results["seed_config"] = batching_table(tiny, tiny_tok, requests, n_new)
        for name, r in results["seed_config"].items():
            rows.append(("seed config (4 layers, 128 dims)", name, f"{r['tokens_per_s']:.0f}",
                         f"{r['speedup_vs_sequential']:.2f}x", str(r["same_tokens_as_sequential"])))  # fmt: skip

    path = args.model or default_model_path()
    model, tok = load(path)
    results["kernels"] = model.weights.kernels
    results["smollm2"] = batching_table(model, tok, requests, n_new)
    for name, r in results["smollm2"].items():
        rows.append(("SmolLM2-135M", f"{name} ({model.weights.kernels} kernels)", f"{r['tokens_per_s']:.1f}",
                     f"{r['speedup_vs_sequential']:.2f}x", str(r["same_tokens_as_sequential"])))  # fmt: skip
    if model.weights.kernels != "numpy":
        _, reference = serve(model, tok, MODES["sequential"], requests, n_new)
        base = numpy_path_baseline(path, requests, n_new, [r.token_ids for r in reference])
        results["numpy_path_continuous"] = base
        ours = results["smollm2"]["continuous"]["tokens_per_s"]
        rows.append(("SmolLM2-135M", "continuous (NumPy kernels, float32 weights)", f"{base['tokens_per_s']:.1f}",
                     f"numba path {ours / base['tokens_per_s']:.2f}x", str(base["same_tokens"])))  # fmt: skip
    roof1, roof8 = matmul_chain(model, 1), matmul_chain(model, 8)
    results["numpy_ceiling"] = {
        "batch1_ms": roof1 * 1000,
        "batch8_ms": roof8 * 1000,
        "batch8_speedup": 8 * roof1 / roof8,
    }
    rows.append(("SmolLM2-135M", f"ceiling at batch 8: projections only ({model.weights.kernels})", f"{8 / roof8:.1f}",
                 f"{8 * roof1 / roof8:.2f}x", "-"))  # fmt: skip
    if llama_cpp_version() is None:
        rows.append(("SmolLM2-135M", "llama.cpp", "llama-cpp-python not installed", "-", "-"))
    else:  # both engines in their own processes with the user's environment, alternating (anchor.py)
        spec = {"model": path, "messages": requests, "prompt_ids": [tok.encode_messages(m) for m in requests],
                "n_new": n_new, "threads": physical_cores()}  # fmt: skip
        batched = compare("batched", spec, rounds=1 if args.quick else 2)
        ours, lcpp_batched = batched["smallmind"]["tokens_per_s"], batched["llama.cpp"]["tokens_per_s"]
        results["vs_llama_cpp_batched"] = {"smallmind": ours, "llama_cpp": lcpp_batched}
        if not args.quick:
            seq = compare("sequential", spec, rounds=1, engines={"llama.cpp": {"engine": "llama.cpp"}})
            lcpp = seq["llama.cpp"]["tokens_per_s"]
            results["llama_cpp_sequential_tokens_per_s"] = lcpp
            rows.append(("SmolLM2-135M", "llama.cpp, one after another (own process)", f"{lcpp:.1f}",
                         f"ours (own process, drafting off) {ours / lcpp:.2f}x", "-"))  # fmt: skip
        rows.append(("SmolLM2-135M", "llama.cpp batched decoding (8 sequences per llama_decode, own process)",
                     f"{lcpp_batched:.1f}", f"ours (own process, drafting off) {ours:.1f}: {ours / lcpp_batched:.2f}x",
                     "-"))  # fmt: skip

    long_tokens = 500 if args.quick else 2000
    results["streaming_latency"] = [streaming_latency(model, tok, 40 if args.quick else 100, chunk, long_tokens)
                                    for chunk in (64, 256, 4096)]  # fmt: skip
    for r in results["streaming_latency"]:
        rows.append(("SmolLM2-135M", f"4 streams + a {r['long_prompt_tokens']}-token prompt, chunk {r['chunk_tokens']}",
                     f"p95 gap {r['p95_ms']:.0f} ms", f"max {r['max_ms']:.0f} ms", "-"))  # fmt: skip
    if not args.quick:
        results["bigger_batches"] = bigger_batches(model, tok, n_new)
        for name, tps in results["bigger_batches"].items():
            rows.append(("SmolLM2-135M", name, f"{tps:.1f}", "-", "-"))
    report("batching", results, rows, args.json)


if __name__ == "__main__":
    main()
