"""Single-stream speed of the engine against what NumPy allows on this machine.

    python benchmarks/bench_engine.py [--model PATH] [--quick] [--json out.json]

Reports: load time; prefill tokens/s of a 256-token prompt; decode tokens/s over 128 tokens (the
bare model loop, and the same request through the batched engine's step()); peak RSS; and, in the
same run, the NumPy roofline: the same chain of float32 matmuls (every layer's fused qkv, output,
gate/up and down projections, then the LM head) with no attention and no norms, at batch 1 (decode)
and batch 256 (prefill). The engine's speeds are reported as fractions of those ceilings.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import default_model_path, median_time, peak_rss_mb, report

from engine import BatchedInferenceEngine, BatchingOptions, InferenceOptions, Model, Tokenizer
from engine.gguf import GgufFile
from engine.model import Row

PROMPT_TOKENS = 256
DECODE_TOKENS = 128


def matmul_chain(model: Model, n_rows: int) -> float:
    """Seconds for one pass of the model's matmuls on (n_rows, D) activations (the roofline)."""
    weights = [
        w for layer in model.weights.layers for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
    ]
    rng = np.random.default_rng(0)
    inputs = {w.shape[0]: rng.standard_normal((n_rows, w.shape[0]), dtype=np.float32) for w in weights}
    lm_in = rng.standard_normal((n_rows, model.weights.lm_head.shape[0]), dtype=np.float32)

    def run() -> None:
        for w in weights:
            inputs[w.shape[0]] @ w
        lm_in @ model.weights.lm_head

    return median_time(run, runs=5 if n_rows > 1 else 30, warmup=2)


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


def engine_decode(model: Model, tok: Tokenizer, ids: list[int], n_new: int) -> float:
    """Decode tokens/s of one request through the batched engine (scheduler, sampling, detokenizer)."""
    engine = BatchedInferenceEngine(model, tok, BatchingOptions(max_batch_wait_ms=0))
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new, stop_on_eos=False)
    handle = engine.submit(tok.decode(ids), options)
    while not handle.done():
        engine.step()
    return handle.result().decode_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer runs and tokens")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    path = args.model or default_model_path()
    runs = 1 if args.quick else 3
    n_decode = 32 if args.quick else DECODE_TOKENS

    load_times = []
    for _ in range(1 if args.quick else 2):
        started = time.perf_counter()
        f = GgufFile(path)
        model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)
        load_times.append(time.perf_counter() - started)
    ids = prompt_ids(tok, PROMPT_TOKENS)

    prefill_s = median_time(
        lambda: model.forward_last([Row(np.asarray(ids), model.new_cache(PROMPT_TOKENS))]), runs
    )
    decode_tps = float(np.median([decode_loop(model, ids[:32], n_decode) for _ in range(runs)]))
    engine_tps = float(np.median([engine_decode(model, tok, ids[:32], n_decode) for _ in range(runs)]))
    roof_decode_s = matmul_chain(model, 1)
    roof_prefill_s = matmul_chain(model, PROMPT_TOKENS)

    results = {
        "model": str(path),
        "load_s": min(load_times),
        "prefill_tokens": PROMPT_TOKENS,
        "prefill_tokens_per_s": PROMPT_TOKENS / prefill_s,
        "decode_tokens": n_decode,
        "decode_tokens_per_s": decode_tps,
        "engine_decode_tokens_per_s": engine_tps,
        "roofline_decode_tokens_per_s": 1.0 / roof_decode_s,
        "roofline_decode_ms_per_token": roof_decode_s * 1000.0,
        "roofline_prefill_tokens_per_s": PROMPT_TOKENS / roof_prefill_s,
        "decode_fraction_of_roofline": decode_tps * roof_decode_s,
        "engine_decode_fraction_of_roofline": engine_tps * roof_decode_s,
        "prefill_fraction_of_roofline": (PROMPT_TOKENS / prefill_s) * roof_prefill_s / PROMPT_TOKENS,
        "peak_rss_mb": peak_rss_mb(),
    }
    r = results
    table = [
        ("measure", "value", "NumPy roofline", "fraction", "target"),
        ("load", f"{r['load_s']:.2f} s", "", "", "< 5 s"),
        ("prefill, 256-token prompt", f"{r['prefill_tokens_per_s']:.0f} tok/s",
         f"{r['roofline_prefill_tokens_per_s']:.0f} tok/s", f"{r['prefill_fraction_of_roofline']:.0%}", "≥ 50%"),
        (f"decode, {n_decode} tokens (model loop)", f"{decode_tps:.1f} tok/s",
         f"{r['roofline_decode_tokens_per_s']:.1f} tok/s", f"{r['decode_fraction_of_roofline']:.0%}", "≥ 75%"),
        (f"decode, {n_decode} tokens (batched engine, 1 request)", f"{engine_tps:.1f} tok/s",
         f"{r['roofline_decode_tokens_per_s']:.1f} tok/s", f"{r['engine_decode_fraction_of_roofline']:.0%}", "≥ 75%"),
        ("peak RSS", f"{r['peak_rss_mb']:.0f} MiB", "", "", ""),
    ]  # fmt: skip
    report("engine", results, table, args.json)


if __name__ == "__main__":
    main()
