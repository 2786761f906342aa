"""The API server against the engine's own figures, in one run (SmolLM2-135M, greedy).

    python benchmarks/bench_server.py [--model PATH] [--quick] [--runs N] [--json out.json]

1. Throughput: 8 concurrent streaming clients (the official ``openai`` client, one thread each) vs
   the same 8 requests submitted to the engine directly; aggregate tokens/s = generated tokens /
   wall time from the first request to the last token. Target: the API reaches >= 90% of the engine.
2. Reuse: a 5-turn conversation (bench_kv_cache's system prompt and questions) sent through the
   ``openai`` client as every chat client sends it: the whole conversation each turn, with the
   model's own greedy replies (160 tokens at most), no session id. Time to the first streamed token
   of each turn with the KV cache on, vs the same prompts with the cache off
   (``KvCacheOptions.enabled=False``), and the engine's own TTFT of the same prompts submitted
   directly with one session. Target: turn 5 >= 10x faster with the cache.

The server is the real one (uvicorn on 127.0.0.1, a free port) around one engine driven by its own
thread, as ``smallmind serve`` runs it. Prints JSON and a table; never asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
from bench_batching import QUESTIONS
from bench_kv_cache import SYSTEM, USERS
from common import default_model_path, report

from engine import BatchedInferenceEngine, GenerationEvent, InferenceOptions, SessionId
from smallmind_server.background import BackgroundServer
from smallmind_server.serve import load_engine

NAME = "smollm2"
TARGETS = {"throughput_ratio": 0.9, "turn5_ttft": 10.0}


@contextmanager
def running_server(engine: BatchedInferenceEngine) -> Iterator[str]:
    server = BackgroundServer(engine, NAME)
    url = server.start(port=0)  # a free port on 127.0.0.1
    try:
        yield url + "/v1"
    finally:
        server.stop()


# 1: throughput ------------------------------------------------------------------------------------
def engine_throughput(engine: BatchedInferenceEngine, n_new: int) -> tuple[float, list[str]]:
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new)
    started = time.perf_counter()
    handles = [engine.submit([{"role": "user", "content": q}], options) for q in QUESTIONS]
    results = [h.result(timeout=600) for h in handles]
    seconds = time.perf_counter() - started
    return sum(r.generated_tokens for r in results) / seconds, [r.text for r in results]


def api_throughput(client: openai.OpenAI, n_new: int) -> tuple[float, list[str]]:
    def ask(question: str) -> tuple[int, str]:
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                max_tokens=n_new, temperature=0, stream=True,
                                                stream_options={"include_usage": True})  # fmt: skip
        text, n = [], 0
        for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        return n, "".join(text)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS))
    seconds = time.perf_counter() - started
    return sum(n for n, _ in answers) / seconds, [text for _, text in answers]


def throughput(
    engine: BatchedInferenceEngine, client: openai.OpenAI, n_new: int, runs: int
) -> dict[str, Any]:
    engine_tps, api_tps, same = [], [], True
    for _ in range(runs):  # alternate the modes so that load on the machine hits both alike
        engine.store.clear()
        tps, engine_texts = engine_throughput(engine, n_new)
        engine_tps.append(tps)
        engine.store.clear()
        tps, api_texts = api_throughput(client, n_new)
        api_tps.append(tps)
        same = same and api_texts == engine_texts
    e, a = statistics.median(engine_tps), statistics.median(api_tps)
    return {"clients": len(QUESTIONS), "new_tokens": n_new, "engine_tokens_per_s": e, "api_tokens_per_s": a,
            "ratio": a / e, "same_text": same, "runs": runs}  # fmt: skip


# 2: five-turn reuse -------------------------------------------------------------------------------
def api_turn(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed turn: seconds to the first token, prompt and cached tokens, the reply's text."""
    started = time.perf_counter()
    first, text, prompt, cached = None, [], 0, 0
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
                                            temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details else 0
    ttft = first if first is not None else time.perf_counter() - started
    return {"ttft_s": ttft, "prompt_tokens": prompt, "cached_tokens": cached, "text": "".join(text)}


def engine_ttft(
    engine: BatchedInferenceEngine, messages: list[dict[str, str]], session: SessionId, max_tokens: int
) -> float:
    first: list[float] = []
    started = time.perf_counter()

    def on_event(event: GenerationEvent) -> None:
        if event.kind != "prefill" and not first:
            first.append(time.perf_counter() - started)

    options = InferenceOptions(max_new_tokens=max_tokens, temperature=0.0)
    engine.submit(messages, options, session, on_event).result(600)
    return first[0]


def reuse(
    engine: BatchedInferenceEngine, client: openai.OpenAI, n_turns: int, reply_tokens: int, runs: int
) -> dict[str, Any]:
    """Cache on: the client resends the conversation with the model's own (greedy) replies, as chat
    clients do; cache off: the same prompts (one token each, only the first one is timed); the
    engine's own: the same prompts submitted directly with one session, cache on."""
    cache_on = engine.cache_options
    times: dict[tuple[str, int], list[float]] = {}
    tokens: dict[int, tuple[int, int]] = {}
    try:
        for _ in range(runs):
            engine.store.clear()
            messages, prompts = [{"role": "system", "content": SYSTEM}], []
            for k in range(n_turns):
                messages.append({"role": "user", "content": USERS[k]})
                prompts.append(list(messages))
                turn = api_turn(client, messages, reply_tokens)
                times.setdefault(("on", k), []).append(turn["ttft_s"])
                tokens[k] = (turn["prompt_tokens"], turn["cached_tokens"])
                messages.append({"role": "assistant", "content": turn["text"]})
            engine.update_options(cache=dataclasses.replace(cache_on, enabled=False))
            for k, prompt in enumerate(prompts):
                times.setdefault(("off", k), []).append(api_turn(client, prompt, 1)["ttft_s"])
            engine.update_options(cache=cache_on)
            engine.store.clear()
            session = SessionId.new_id()
            for k, prompt in enumerate(prompts):
                times.setdefault(("engine", k), []).append(engine_ttft(engine, prompt, session, reply_tokens))
    finally:
        engine.update_options(cache=cache_on)
    rows = []
    for k in range(n_turns):
        on, off, own = (statistics.median(times[mode, k]) for mode in ("on", "off", "engine"))
        rows.append({"turn": k + 1, "prompt_tokens": tokens[k][0], "cached_tokens": tokens[k][1],
                     "api_cache_off_s": off, "api_cache_on_s": on, "engine_cache_on_s": own,
                     "ratio_off_on": off / on, "api_vs_engine": on / own})  # fmt: skip
    return {"runs": runs, "reply_tokens": reply_tokens, "turns": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 2 turns, 1 run")
    parser.add_argument("--runs", type=int, default=None,
                        help="repetitions (medians); default: throughput 2 (quick 1), reuse 1")  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 2)
    n_new, n_turns, reply_tokens = (16, 2, 16) if args.quick else (64, 5, 160)
    engine = load_engine(Path(args.model or default_model_path()))
    engine.update_options(batching=dataclasses.replace(engine.batching_options, max_batch_size=8))
    try:
        with running_server(engine) as url:
            client = openai.OpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)
            api_turn(client, [{"role": "user", "content": "Hello"}], 2)  # warm-up: kernels, connections
            results: dict[str, Any] = {"throughput": throughput(engine, client, n_new, runs)}
            results["reuse"] = reuse(engine, client, n_turns, reply_tokens, args.runs or 1)
    finally:
        engine.stop()
    t = results["throughput"]
    rows = [("measure", "engine (direct)", "API (openai client)", "API / engine", "target")]
    rows.append((f"{t['clients']} concurrent streams x {t['new_tokens']} tokens, tok/s",
                 f"{t['engine_tokens_per_s']:.1f}", f"{t['api_tokens_per_s']:.1f}", f"{t['ratio'] * 100:.0f}%"
                 + ("" if t["same_text"] else " (texts differ!)"), f">= {TARGETS['throughput_ratio']:.0%}"))  # fmt: skip
    rows.append(
        ("TTFT: turn (prompt tokens, cached)", "engine, cache on", "API cache off -> on", "off / on", "")
    )
    for r in results["reuse"]["turns"]:
        target = f">= {TARGETS['turn5_ttft']:.0f}x" if r["turn"] == 5 else ""
        rows.append((f"turn {r['turn']} ({r['prompt_tokens']}, {r['cached_tokens']})",
                     f"{r['engine_cache_on_s'] * 1e3:.0f} ms",
                     f"{r['api_cache_off_s'] * 1e3:.0f} -> {r['api_cache_on_s'] * 1e3:.0f} ms",
                     f"{r['ratio_off_on']:.1f}x", target))  # fmt: skip
    report("server", results, rows, args.json)


if __name__ == "__main__":
    main()
