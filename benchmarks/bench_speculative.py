"""Speculative decoding without a draft model (prompt lookup): drafting on vs off in one run.

SmolLM2-135M, greedy. Single stream on code-edit / quote tasks (the reply repeats most of the prompt)
and on open-ended chat prompts; 8 concurrent requests (aggregate); the code-edit task against
llama.cpp (llama-cpp-python, greedy, same prompt ids and token count) in the same run. For each task:
tokens/s end to end (submit -> last token, prefill included) and decode-only (after the first
token), the ratio on/off, tokens per step (mean accepted length), drafted and accepted tokens, and
whether the tokens are the same as without drafting. Also the measured cost of a decode step of
1..8 rows of one sequence relative to one row (what engine/speculative.py's ROW_COST assumes).

    python benchmarks/bench_speculative.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anchor
import numpy as np
from common import default_model_path, report

from engine import (
    BatchedInferenceEngine,
    BatchingOptions,
    InferenceOptions,
    LruKvCacheStore,
    Model,
    Tokenizer,
)
from engine.gguf import GgufFile
from engine.model import Row
from engine.speculative import ROW_COST, step_cost

FUNCTION = """def summarize_orders(orders, currency="EUR", min_total=0.0):
    totals = {}
    counts = {}
    skipped = []
    for order in orders:
        if order.get("status") == "cancelled":
            skipped.append(order["id"])
            continue
        customer = order["customer"]
        amount = 0.0
        for item in order["items"]:
            price = item["price"]
            quantity = item.get("quantity", 1)
            if item.get("discount"):
                price = price * (1 - item["discount"])
            amount += price * quantity
        if order.get("currency", currency) != currency:
            rate = order["rate"]
            amount = amount * rate
        totals[customer] = totals.get(customer, 0.0) + amount
        counts[customer] = counts.get(customer, 0) + 1
    report = []
    for customer, total in totals.items():
        if total < min_total:
            continue
        average = total / counts[customer]
        report.append(
            {
                "customer": customer,
                "total": round(total, 2),
                "orders": counts[customer],
                "average": round(average, 2),
            }
        )
    report.sort(key=lambda row: row["total"], reverse=True)
    return {
        "currency": currency,
        "customers": report,
        "skipped": skipped,
    }
"""
LIST = "- apples\n- bread\n- butter\n- cheese\n- eggs\n- milk\n- onions\n- pasta\n- rice\n- tomatoes\n"
TASKS: dict[str, tuple[str, str]] = {
    "code_edit_type_hints": ("quote", "Rewrite this function with type hints. Reply with the code only.\n\n"
                             + FUNCTION),
    "code_edit_rename": ("quote", "Rename the variable `totals` to `sums` in this function and show the "
                         "whole function.\n\n" + FUNCTION),
    "repeat_list_add_item": ("quote", "Here is my shopping list:\n" + LIST + "\nRepeat the list exactly, "
                             "one item per line, and add one more item at the end."),
    "chat_relax": ("chat", "What are some good ways to relax after a long day at work?"),
    "chat_history": ("chat", "Tell me about the history of the bicycle."),
    "chat_garden": ("chat", "How do I start a small vegetable garden on a balcony?"),
    "chat_email": ("chat", "Write a short email asking my landlord to fix the heating."),
}  # fmt: skip


def engine(model: Model, tok: Tokenizer, speculative: bool) -> BatchedInferenceEngine:
    options = BatchingOptions(max_batch_wait_ms=0, speculative=speculative)
    return BatchedInferenceEngine(model, tok, options, LruKvCacheStore())


def serve(model: Model, tok: Tokenizer, speculative: bool, prompts: list[str], n_new: int) -> dict[str, Any]:
    """Every prompt submitted at once to a fresh engine (no cached prefix), stepped to the end."""
    eng = engine(model, tok, speculative)
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new, repetition_penalty=1.0)
    started, cpu_started = time.perf_counter(), time.process_time()
    handles = [eng.submit([{"role": "user", "content": p}], options) for p in prompts]
    while not all(h.done() for h in handles):
        eng.step()
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    results = [h.result(0) for h in handles]
    metrics = eng.metrics.snapshot()
    return {
        "tokens": sum(r.generated_tokens for r in results),
        "tokens_per_s": sum(r.generated_tokens for r in results) / elapsed,
        "tokens_per_cpu_s": sum(r.generated_tokens for r in results) / cpu_s,
        "decode_tokens_per_s": float(np.mean([r.decode_tokens_per_s for r in results])),
        "tokens_per_step": metrics.mean_accepted_length,
        "drafted": metrics.drafted_tokens,
        "accepted": metrics.accepted_tokens,
        "token_ids": [r.token_ids for r in results],
        "text": results[0].text,
    }


def compare(model: Model, tok: Tokenizer, prompts: list[str], n_new: int, runs: int) -> dict[str, Any]:
    """Drafting off and on, interleaved (the machine's load drifts), medians over ``runs``."""
    serve(model, tok, True, prompts, 8)  # warm-up: kernels for every row count compiled
    off, on = [], []
    for _ in range(runs):
        off.append(serve(model, tok, False, prompts, n_new))
        on.append(serve(model, tok, True, prompts, n_new))

    def median(rs: list[dict[str, Any]], key: str) -> float:
        return float(np.median([r[key] for r in rs]))

    return {
        "tokens": on[0]["tokens"],
        "off_tokens_per_s": median(off, "tokens_per_s"),
        "on_tokens_per_s": median(on, "tokens_per_s"),
        "speedup": median(on, "tokens_per_s") / median(off, "tokens_per_s"),
        "off_decode_tokens_per_s": median(off, "decode_tokens_per_s"),
        "on_decode_tokens_per_s": median(on, "decode_tokens_per_s"),
        "decode_speedup": median(on, "decode_tokens_per_s") / median(off, "decode_tokens_per_s"),
        "cpu_speedup": median(on, "tokens_per_cpu_s") / median(off, "tokens_per_cpu_s"),
        "tokens_per_step": on[0]["tokens_per_step"],
        "drafted": on[0]["drafted"],
        "accepted": on[0]["accepted"],
        "same_tokens": all(a["token_ids"] == b["token_ids"] for a, b in zip(off, on, strict=True)),
        "reply_start": on[0]["text"][:160],
    }


def row_costs(model: Model, n_context: int = 300, runs: int = 15) -> dict[int, float]:
    """A decode step of n rows of one sequence (the newest token + n - 1 drafts), ms, median."""
    ids = np.arange(100, 100 + n_context) % model.config.vocab_size
    cache = model.new_cache(n_context + 16)
    model.forward(ids, cache)
    out = {}
    for n in (1, 2, 3, 4, 6, 8):
        times = []
        for _ in range(runs):
            cache.trim(n_context)
            started = time.perf_counter()
            model.forward_last([Row(ids[:n], cache)])
            times.append(time.perf_counter() - started)
        out[n] = float(np.median(times[2:])) * 1000.0
    return out


def llama_cpp_single(path: str, messages: list[Any], n_new: int, ids: list[int]) -> dict[str, float] | None:
    """The code edit with drafting on (ours) and greedy llama.cpp on the same prompt ids and token
    count, each in its own process with the user's environment, alternating (``anchor.py``)."""
    if anchor.llama_cpp_version() is None:
        return None
    spec = {"model": path, "messages": [messages], "prompt_ids": [ids], "n_new": n_new,
            "threads": anchor.physical_cores(), "speculative": True, "stop_on_eos": True}  # fmt: skip
    r = anchor.compare("generate", spec, rounds=2)
    ours, theirs = r["smallmind"], r["llama.cpp"]
    return {"tokens_per_s": theirs["tokens_per_s"], "decode_tokens_per_s": theirs["decode_tokens_per_s"],
            "ours_tokens_per_s": ours["tokens_per_s"], "ours_decode_tokens_per_s": ours["decode_tokens_per_s"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="one run per mode, shorter replies")
    parser.add_argument("--json", default=None)
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (medians)")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    path = args.model or default_model_path()
    f = GgufFile(path)
    model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)
    results: dict[str, Any] = {"kernels": model.weights.kernels, "runs": runs}
    rows = [("task", "kind", "off tok/s", "on tok/s", "on/off", "decode on/off", "CPU time off/on",
             "tokens/step", "accepted/drafted", "same tokens")]  # fmt: skip
    costs = row_costs(model)
    results["row_cost_ms"] = costs
    results["row_cost_relative"] = {n: ms / costs[1] for n, ms in costs.items()}
    results["row_cost_assumed"] = {n: step_cost(n) for n in costs} | {"table": ROW_COST}
    for name, (kind, prompt) in TASKS.items():
        n_new = (120 if kind == "chat" else 400) // (2 if args.quick else 1)
        r = compare(model, tok, [prompt], n_new, runs)
        results[name] = r
        print(f"{name}: on/off {r['speedup']:.2f}x, {r['tokens_per_step']:.2f} tokens/step", flush=True)
        rows.append((name, kind, f"{r['off_tokens_per_s']:.1f}", f"{r['on_tokens_per_s']:.1f}",
                     f"{r['speedup']:.2f}x", f"{r['decode_speedup']:.2f}x", f"{r['cpu_speedup']:.2f}x",
                     f"{r['tokens_per_step']:.2f}", f"{r['accepted']}/{r['drafted']}", str(r["same_tokens"])))  # fmt: skip
    mixed = [*(p for _, p in TASKS.values()), TASKS["chat_relax"][1]]  # 8 requests at once
    r = compare(model, tok, mixed, 60 if args.quick else 120, runs)
    results["concurrent_8"] = r
    rows.append(("8 concurrent (3 quote + 5 chat)", "aggregate", f"{r['off_tokens_per_s']:.1f}",
                 f"{r['on_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x", "-", f"{r['cpu_speedup']:.2f}x",
                 f"{r['tokens_per_step']:.2f}", f"{r['accepted']}/{r['drafted']}", str(r["same_tokens"])))  # fmt: skip
    code = results["code_edit_type_hints"]
    messages = [{"role": "user", "content": TASKS["code_edit_type_hints"][1]}]
    lcpp = llama_cpp_single(path, messages, code["tokens"], list(tok.encode_messages(messages)))
    results["llama_cpp_code_edit"] = lcpp
    if lcpp:
        rows.append(("code_edit_type_hints vs llama.cpp", "llama.cpp greedy", f"{lcpp['tokens_per_s']:.1f}",
                     f"{lcpp['ours_tokens_per_s']:.1f}", f"{lcpp['ours_tokens_per_s'] / lcpp['tokens_per_s']:.2f}x",
                     f"{lcpp['ours_decode_tokens_per_s'] / lcpp['decode_tokens_per_s']:.2f}x", "-", "-", "-", "-"))  # fmt: skip
    rows.append(("decode step of 1/2/3/4/6/8 rows vs 1 row", "measured",
                 " / ".join(f"{v:.2f}" for v in results["row_cost_relative"].values()), "-",
                 "assumed " + " / ".join(f"{step_cost(n):.2f}" for n in costs), "-", "-", "-", "-", "-"))  # fmt: skip
    report("speculative", results, rows, args.json)


if __name__ == "__main__":
    main()
