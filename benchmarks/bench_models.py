"""The model families side by side: SmolLM2-135M and Gemma 3 270M, prefill and decode, with llama.cpp on
the same files in the same run, and where a decode step's time goes (the LM head's share). Then both
models at once in one model pool (engine/model_pool.py), measured alternating in the same run:

    python benchmarks/bench_models.py [--quick] [--json out.json] [--pool-only]

Gemma 3 270M has a 262,144-token vocabulary: its tied output head is 168M of its 268M parameters,
so it dominates a decode step. Models not installed are skipped (`smallmind models pull gemma3-270m`).

The pool part: each model's decode tokens/s alone and while the other streams at once (tokens in the
window where both stream), rounds alternating alone/alone/both; whether both replies equal each
model's own greedy reply; a load on demand against the bare load of the same file; resident memory
after loading each alone and both (each in a fresh subprocess). The machine may be shared: the load
average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from bench_engine import decode_loop, llama_cpp_decode, prompt_ids
from common import median_time, report

from engine import Model, Tokenizer, download
from engine.gguf import GgufFile
from engine.kernels import linear
from engine.model import Row


def lm_head_share(model: Model, n: int = 20) -> float:
    """Fraction of a 1-row decode step spent in the output head (timed alone vs a whole step)."""
    h = np.random.default_rng(0).standard_normal((1, model.config.hidden_size), dtype=np.float32)

    def head() -> None:
        with model._threads():
            linear(h, model.weights.lm_head)

    head_s = median_time(head, runs=n, warmup=2)
    cache = model.new_cache(64)
    model.forward_last([Row(np.arange(1, 17), cache)])
    step_s = median_time(lambda: model.forward_last([Row(np.asarray([5]), cache)]), runs=n, warmup=2)
    return head_s / step_s


def measure(spec: download.ModelSpec, quick: bool) -> dict[str, Any] | None:
    path = download.default_model_path(spec)
    if not path.is_file():
        return None
    started = time.perf_counter()
    f = GgufFile(path)
    model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)
    load_s = time.perf_counter() - started
    ids = prompt_ids(tok, 256)
    prefill_s = median_time(
        lambda: model.forward_last([Row(np.asarray(ids), model.new_cache(256))]), 1 if quick else 3
    )
    n_new = 32 if quick else 64
    return {
        "model": spec.name,
        "parameters_m": sum(int(np.prod(f.tensor_shape(n))) for n in f.tensor_names()) / 1e6,
        "vocab": model.config.vocab_size,
        "weights_mib": model.weights.nbytes / 2**20,
        "load_s": load_s,
        "prefill_tokens_per_s": 256 / prefill_s,
        "decode_tokens_per_s": decode_loop(model, ids[:32], n_new),
        "lm_head_share_of_decode_step": lm_head_share(model),
        "llama_cpp_decode": llama_cpp_decode(str(path), ids[:32], n_new),  # both in their own processes
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--pool-only", action="store_true", help="only the two-models-at-once figures")
    args = parser.parse_args()
    if not args.pool_only:
        families(args)
    from models_pool import pool_report

    pool_report(args.quick, args.json and args.json.replace(".json", "-pool.json"))


def families(args: argparse.Namespace) -> None:
    results = {key: measure(spec, args.quick) for key, spec in download.CATALOG.items()}
    rows = [("model", "params", "weights in memory", "load", "prefill 256", "decode", "LM head share",
             "llama.cpp decode, own processes (ours / theirs)")]  # fmt: skip
    for r in results.values():
        if r is None:
            continue
        lcpp = r["llama_cpp_decode"]
        rows.append((r["model"], f"{r['parameters_m']:.0f}M", f"{r['weights_mib']:.0f} MiB", f"{r['load_s']:.1f} s",
                     f"{r['prefill_tokens_per_s']:.0f} tok/s", f"{r['decode_tokens_per_s']:.1f} tok/s",
                     f"{r['lm_head_share_of_decode_step']:.0%}",
                     f"{lcpp['llama_cpp']:.1f} tok/s (ours {lcpp['smallmind']:.1f}: {lcpp['smallmind'] / lcpp['llama_cpp']:.2f}x)"
                     if lcpp else "not installed"))  # fmt: skip
    report("models", results, rows, args.json)


if __name__ == "__main__":
    main()
