"""SmallMind's side of the figures ``anchor.py`` compares; each ``measure_<name>(spec)`` runs in a
child process of its own (``anchor.py --child smallmind NAME``) and returns a JSON-ready dict.

Common spec keys: ``model`` (GGUF path), ``threads`` (the kernels' thread count, 0 = auto),
``kv_dtype`` (the KV cache's dtype), ``reps`` (timed repetitions after a warm-up; the best is kept).
Decoding is greedy; drafting (speculative decoding) is off unless a spec turns it on, so each step
computes one token per sequence, as llama.cpp does.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

FILLER = (
    "SmallMind runs a language model on your own computer. It keeps every conversation's keys and "
    "values in a cache so a follow-up message only computes its new tokens, and it serves several "
    "conversations at once in shared forward passes. "
)


def _load(spec: dict[str, Any]) -> tuple[Any, Any]:
    from engine import Model, Tokenizer, kernels
    from engine.gguf import GgufFile

    f = GgufFile(spec["model"])
    model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)
    kernels.set_threads(int(spec.get("threads", 0)))
    kernels.set_activations(str(spec.get("activations", "float32")))
    return model, tok


def measure_accuracy(spec: dict[str, Any]) -> dict[str, Any]:
    """How far decode steps are from the float32 reference: each reference prompt fed one token a
    step (decode-sized steps: the kernels' activations, float32 or 8-bit, as ``activations`` says),
    its last logits against the reference's; the worst max |diff| relative to max |logit|."""
    from engine import kernels

    model, _ = _load(spec)
    from anchor import reference

    prompts, logits = reference(spec)
    worst = 0.0
    for p in prompts:
        cache = model.new_cache(len(p["input_ids"]))
        for token in p["input_ids"]:
            last = model.forward([token], cache)[-1]
        ref = logits[p["key"]]
        worst = max(worst, float(np.abs(last - ref).max() / np.abs(ref).max()))
    return {"max_rel_diff": worst, "activations": kernels.activations()}


def measure_model_path(spec: dict[str, Any]) -> dict[str, Any]:
    """The default model's path (SmolLM2-135M as installed)."""
    from engine.download import resolve_model_path

    return {"path": str(resolve_model_path())}


def _dtype(spec: dict[str, Any]) -> str:
    return str(spec.get("kv_dtype", "float32"))


def measure_prompts(spec: dict[str, Any]) -> dict[str, Any]:
    """The prompt ids of every figure: filler text for decode/prefill/long context, the 8 chat
    requests of the batching table (chat template applied)."""
    from bench_batching import QUESTIONS

    from engine import Tokenizer
    from engine.gguf import GgufFile

    tok = Tokenizer.from_gguf(GgufFile(spec["model"]))
    n = max(256, int(spec.get("n_context", 6144)))
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(FILLER)
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return {
        "decode": ids[:32],
        "prefill": ids[:256],
        "long": ids[:n],
        "chat_messages": messages,
        "chat_ids": [tok.encode_messages(m) for m in messages],
    }


def _greedy(model: Any, cache: Any, token: int, n_new: int) -> tuple[list[int], float]:
    """``n_new`` decode steps from ``token`` (each one token in, logits out); (tokens, seconds)."""
    from engine.model import Row

    tokens = []
    started = time.perf_counter()
    for _ in range(n_new):
        logits = model.forward_last([Row(np.asarray([token]), cache)])[0]
        token = int(np.argmax(logits))
        tokens.append(token)
    return tokens, time.perf_counter() - started


def _prefill(model: Any, cache: Any, ids: list[int], chunk: int = 256) -> int:
    """Feed ``ids`` in chunks (as the engine does); the greedy next token."""
    from engine.model import Row

    logits = None
    for start in range(0, len(ids), chunk):
        logits = model.forward_last([Row(np.asarray(ids[start : start + chunk]), cache)])[0]
    return int(np.argmax(logits))


def measure_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Single-stream decode of ``n_new`` tokens after a short prompt (prefill not timed)."""
    model, _ = _load(spec)
    ids, n_new = list(spec["prompt_ids"]), int(spec.get("n_new", 128))
    best, tokens = 0.0, []
    for rep in range(1 + int(spec.get("reps", 2))):  # the first is the warm-up
        cache = model.new_cache(len(ids) + n_new + 1, dtype=_dtype(spec))
        first = _prefill(model, cache, ids)
        out, seconds = _greedy(model, cache, first, 8 if rep == 0 else n_new)
        if rep:
            best, tokens = max(best, n_new / seconds), [first, *out[:-1]]
    return {"tokens_per_s": best, "token_ids": tokens, "kernels": model.weights.kernels}


def measure_prefill(spec: dict[str, Any]) -> dict[str, Any]:
    """One prompt of ``len(prompt_ids)`` tokens in one forward into an empty cache."""
    from engine.model import Row

    model, _ = _load(spec)
    ids = np.asarray(spec["prompt_ids"])
    best = 0.0
    for rep in range(1 + int(spec.get("reps", 3))):
        cache = model.new_cache(len(ids), dtype=_dtype(spec))
        started = time.perf_counter()
        model.forward_last([Row(ids, cache)])
        if rep:
            best = max(best, len(ids) / (time.perf_counter() - started))
    return {"tokens_per_s": best}


def measure_long_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode ``n_new`` tokens with ``len(prompt_ids)`` tokens already cached: the cache is filled
    once (in 256-token chunks, timed apart), then trimmed back before each timed repetition."""
    model, _ = _load(spec)
    ids, n_new = list(spec["prompt_ids"]), int(spec.get("n_new", 16))
    cache = model.new_cache(len(ids) + n_new + 1, dtype=_dtype(spec))
    started = time.perf_counter()
    first = _prefill(model, cache, ids)
    prefill_s = time.perf_counter() - started
    best, tokens = 0.0, []
    for rep in range(1 + int(spec.get("reps", 3))):
        cache.trim(len(ids))
        out, seconds = _greedy(model, cache, first, 2 if rep == 0 else n_new)
        if rep:
            best, tokens = max(best, n_new / seconds), [first, *out[:-1]]
    return {"tokens_per_s": best, "prefill_tokens_per_s": len(ids) / prefill_s, "token_ids": tokens,
            "kv_mib": cache.used_bytes / 2**20}  # fmt: skip


def _serve(model: Any, tok: Any, spec: dict[str, Any], batched: bool) -> dict[str, Any]:
    from engine import (
        BatchedInferenceEngine,
        BatchingOptions,
        InferenceOptions,
        KvCacheOptions,
        LruKvCacheStore,
    )

    batching = BatchingOptions(enabled=batched, speculative=bool(spec.get("speculative", False)),
                               max_batch_wait_ms=0, cpu_threads=int(spec.get("threads", 0)),
                               activations=str(spec.get("activations", "float32")))  # fmt: skip
    store = LruKvCacheStore(KvCacheOptions(dtype=_dtype(spec)))
    engine = BatchedInferenceEngine(model, tok, batching, store, max_concurrent_sessions=1000)
    options = InferenceOptions(
        temperature=0.0,
        max_new_tokens=int(spec["n_new"]),
        repetition_penalty=1.0,
        stop_on_eos=bool(spec.get("stop_on_eos", False)),
    )  # plain argmax, as llama.cpp
    started = time.perf_counter()
    handles = [engine.submit(m, options) for m in spec["messages"]]
    while not all(h.done() for h in handles):
        engine.step()
    seconds = time.perf_counter() - started
    results = [h.result() for h in handles]
    n = sum(r.generated_tokens for r in results)
    return {"tokens_per_s": n / seconds, "tokens": n, "seconds": seconds,
            "decode_tokens_per_s": float(np.mean([r.decode_tokens_per_s for r in results])),
            "token_ids": [list(r.token_ids) for r in results]}  # fmt: skip


def _serve_best(spec: dict[str, Any], batched: bool) -> dict[str, Any]:
    model, tok = _load(spec)
    _serve(model, tok, {**spec, "messages": spec["messages"][:2], "n_new": 4}, batched)  # warm-up
    runs = [_serve(model, tok, spec, batched) for _ in range(int(spec.get("reps", 1)))]
    return max(runs, key=lambda r: r["tokens_per_s"])


def measure_batched(spec: dict[str, Any]) -> dict[str, Any]:
    """Every request of ``messages`` submitted at once to the continuous-batching engine, each
    ``n_new`` tokens (no EOS stop); aggregate tokens/s from the first submit to the last result."""
    return _serve_best(spec, batched=True)


def measure_sequential(spec: dict[str, Any]) -> dict[str, Any]:
    """The same requests served one after another (batching off)."""
    return _serve_best(spec, batched=False)


def measure_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """One request (``messages``) through the engine, drafting as ``speculative`` says."""
    return _serve_best(spec, batched=True)


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Resident memory once the model and its tokenizer are loaded (kernels ready), and over the
    process's start (``rss_start_mib``: before the engine was imported)."""
    import os

    from anchor import rss_mib

    start = float(spec["rss_start_mib"])
    model, _ = _load(spec)
    after = rss_mib()
    return {"rss_mib": after, "over_start_mib": after - start, "rss_start_mib": start,
            "file_mib": os.path.getsize(spec["model"]) / 2**20,
            "weights_mib": model.weights.nbytes / 2**20}  # fmt: skip


def measure_steps(spec: dict[str, Any]) -> dict[str, Any]:
    """Milliseconds of one decode step of 1, 8 and 16 sequences (each with 32 tokens cached), the
    best of ``reps`` steps after a warm-up step."""
    from engine.model import Row

    model, _ = _load(spec)
    ids = np.asarray(spec["prompt_ids"])
    out: dict[str, float] = {}
    for n in (1, 8, 16):
        caches = [model.new_cache(len(ids) + 16, dtype=_dtype(spec)) for _ in range(n)]
        for cache in caches:
            _prefill(model, cache, list(ids))
        times = []
        for _ in range(1 + int(spec.get("reps", 8))):
            started = time.perf_counter()
            model.forward_last([Row(ids[-1:], c) for c in caches])
            times.append(time.perf_counter() - started)
            for c in caches:
                c.trim(len(ids))
        out[str(n)] = min(times[1:]) * 1000.0
    return {"step_ms": out, "ratio_8": out["8"] / out["1"], "ratio_16": out["16"] / out["1"]}
