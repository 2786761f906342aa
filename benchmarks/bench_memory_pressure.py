"""Memory pressure: 8 concurrent greedy requests under a KV budget that holds only 4 of them at
once, against the same 8 with an unconstrained budget, in one run.

    python benchmarks/bench_memory_pressure.py [--model PATH] [--quick] [--skip-tiny] [--runs N] [--json out.json]

The budget is the sum of the 4 largest requests' needs (prompt + max_new_tokens tokens of K/V), so
at most 4 can hold their whole K/V together; every request fits alone. Requests that cannot grow
preempt the most recently admitted one (requeued, recomputed later) and new ones wait for memory.
Reported per mode (medians over runs): aggregate tokens/s from the first submit to the last result,
preemptions, the most requests seen waiting for memory, peak KV bytes, finish reasons, and whether
the tokens equal the unconstrained run's (greedy: they should). Never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench_batching import QUESTIONS, load
from common import default_model_path, report  # common puts the repository root on sys.path

from engine import (
    BatchedInferenceEngine,
    BatchingOptions,
    InferenceOptions,
    KvCacheOptions,
    LruKvCacheStore,
    Model,
    Tokenizer,
)


def serve(model: Model, tok: Tokenizer, cache: KvCacheOptions, n_new: int) -> dict[str, Any]:
    """The 8 requests submitted at once, the engine stepped until all end."""
    engine = BatchedInferenceEngine(model, tok, BatchingOptions(max_batch_wait_ms=0), LruKvCacheStore(cache))
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new, stop_on_eos=False)
    started = time.perf_counter()
    handles = [engine.submit([{"role": "user", "content": q}], options) for q in QUESTIONS]
    most_waiting = 0
    while not all(h.done() for h in handles):
        engine.step()
        most_waiting = max(most_waiting, engine.metrics.snapshot().waiting_for_memory)
    seconds = time.perf_counter() - started
    results = [h.result() for h in handles]
    return {
        "seconds": seconds,
        "tokens_per_s": sum(r.generated_tokens for r in results) / seconds,
        "preemptions": engine.metrics.snapshot().preemptions,
        "most_waiting_for_memory": most_waiting,
        "peak_kv_bytes": engine.store.get_stats().peak_bytes,
        "finish_reasons": dict(Counter(r.finish_reason for r in results)),
        "tokens": [r.token_ids for r in results],
    }


def compare(model: Model, tok: Tokenizer, n_new: int, runs: int) -> dict[str, Any]:
    shape = model.kv_shape()
    needs = sorted(
        (len(tok.encode_messages([{"role": "user", "content": q}])) + n_new) * shape.bytes_per_token
        for q in QUESTIONS
    )
    budget = sum(needs[-4:])  # the 4 largest together: never more than 4 at once
    modes = {
        "unconstrained": KvCacheOptions(),
        "budget for 4 of 8": KvCacheOptions(max_bytes_total=budget, max_bytes_per_session=budget),
    }
    out: dict[str, Any] = {"budget_bytes": budget, "needs_bytes": needs}
    serve(model, tok, modes["unconstrained"], min(n_new, 8))  # warm-up (JIT, caches)
    for name, cache in modes.items():
        samples = [serve(model, tok, cache, n_new) for _ in range(runs)]
        middle = sorted(samples, key=lambda s: s["tokens_per_s"])[len(samples) // 2]
        out[name] = {k: v for k, v in middle.items() if k != "tokens"}
        out[name]["tokens_per_s_runs"] = [s["tokens_per_s"] for s in samples]
        out[name]["tokens_per_s"] = statistics.median(s["tokens_per_s"] for s in samples)
        out[name]["_tokens"] = middle["tokens"]
    reference = out["unconstrained"].pop("_tokens")
    constrained = out["budget for 4 of 8"].pop("_tokens")
    out["budget for 4 of 8"]["same_tokens_as_unconstrained"] = constrained == reference
    out["throughput_ratio"] = out["budget for 4 of 8"]["tokens_per_s"] / out["unconstrained"]["tokens_per_s"]
    return out


def rows_for(label: str, r: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name in ("unconstrained", "budget for 4 of 8"):
        m = r[name]
        rows.append((
            label, name, f"{m['tokens_per_s']:.1f}", f"{m['tokens_per_s'] / r['unconstrained']['tokens_per_s']:.2f}x",
            str(m["preemptions"]), str(m["most_waiting_for_memory"]), f"{m['peak_kv_bytes'] / 2**20:.2f}",
            ", ".join(f"{k} {v}" for k, v in m["finish_reasons"].items()),
            str(m.get("same_tokens_as_unconstrained", "")),
        ))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n_new = 24 if args.quick else 100
    runs = 1 if args.quick else args.runs
    results: dict[str, Any] = {"requests": len(QUESTIONS), "new_tokens_per_request": n_new, "runs": runs}
    table = [("model", "KV budget", "aggregate tok/s", "vs unconstrained", "preemptions",
              "most waiting for memory", "peak KV MiB", "finished", "same tokens")]  # fmt: skip
    if not args.skip_tiny:
        from tests.fixtures.tiny_model import write_tiny_gguf

        with tempfile.TemporaryDirectory() as tmp:
            path = write_tiny_gguf(Path(tmp) / "seed.gguf", n_layers=4, hidden_size=128, n_heads=4,
                                   n_kv_heads=4, ffn_size=512, context_length=1024)  # fmt: skip
            tiny, tiny_tok = load(str(path))
        results["seed_config"] = compare(tiny, tiny_tok, n_new, runs)
        table += rows_for("seed config (4 layers, 128 dims)", results["seed_config"])
    if not args.skip_smollm2:
        model, tok = load(args.model or default_model_path())
        results["smollm2"] = compare(model, tok, n_new, runs)
        table += rows_for("SmolLM2-135M", results["smollm2"])
    report("memory_pressure", results, table, args.json)


if __name__ == "__main__":
    main()
