"""Structured output and n choices: what they cost, measured in one run on SmolLM2-135M.

1. Schema-constrained generation vs unconstrained, alone and 8 concurrent: each constrained request
   writes a JSON document (a list of people: names, ages, cities), then an unconstrained request with
   the same prompt generates exactly as many tokens (EOS ignored); runs alternate, median of several.
   tokens/s = generated tokens / wall time from submit to the last token (prefill included, the
   same prompt on both sides). With the engine's default drafting and with drafting off (the mask's
   own cost). Mask time per token: computing llguidance's bitmask and applying it to the logits.
2. n=4 choices (one prompt computation, four rows decoded together) vs four separate requests,
   run one after another and all at once; same prompt, seeds, token counts.

    python benchmarks/bench_structured.py [--quick] [--json out.json]

The machine may be shared: the load average is printed with the figures; ratios are what to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from typing import Any

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
from engine.constraints import Constraint
from engine.gguf import GgufFile

PEOPLE = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array", "minItems": 6, "maxItems": 6,
            "items": {"type": "object",
                      "properties": {"name": {"type": "string", "maxLength": 20},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "city": {"type": "string", "maxLength": 20}},
                      "required": ["name", "age", "city"], "additionalProperties": False},
        },
    },
    "required": ["people"], "additionalProperties": False,
}  # fmt: skip
QUESTIONS = ["List six people with their age and city.", "Invent six characters for a story: name, age, town.",
             "Give six example customers (name, age, city).", "Six friends: who are they, how old, where from?",
             "Make up six users with ages and home cities.", "Describe six travellers: name, age, city.",
             "Name six authors, their age and their city.", "Six athletes: names, ages, cities."]  # fmt: skip
LONG_PROMPT = ("You are a careful assistant. " * 40) + "Write one sentence about the sea."


def cpu_model() -> str:
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except OSError:
        return "unknown"
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?"
    )


def make_engine(model: Model, tok: Tokenizer, speculative: bool) -> BatchedInferenceEngine:
    engine = BatchedInferenceEngine(model, tok, BatchingOptions(max_batch_wait_ms=0, speculative=speculative),
                                    LruKvCacheStore())  # fmt: skip
    return engine


def run(
    engine: BatchedInferenceEngine, requests: list[tuple[Any, InferenceOptions]]
) -> tuple[list[Any], float]:
    """Submit all, step until done; (results, wall seconds)."""
    started = time.perf_counter()
    handles = [engine.submit(prompt, options) for prompt, options in requests]
    while not all(h.done() for h in handles):
        engine.step()
    return [h.result(0) for h in handles], time.perf_counter() - started


def constrained_vs_free(engine: BatchedInferenceEngine, n_concurrent: int, repeats: int) -> dict[str, float]:
    base = InferenceOptions(temperature=0.0, repetition_penalty=1.0, max_new_tokens=400)
    schema = Constraint.json_schema(PEOPLE)
    ratios, mask_us, c_rates, f_rates, tokens = [], [], [], [], []
    for r in range(repeats):
        prompts = [
            [{"role": "user", "content": QUESTIONS[(r + i) % len(QUESTIONS)]}] for i in range(n_concurrent)
        ]
        constrained, t_c = run(engine, [(p, dataclasses.replace(base, constraint=schema)) for p in prompts])
        assert all(res.finish_reason == "stop" for res in constrained), [
            res.text[-80:] for res in constrained
        ]
        for res in constrained:
            json.loads(res.text)
        counts = [len(res.token_ids) for res in constrained]
        free, t_f = run(engine, [(p, dataclasses.replace(base, max_new_tokens=n, stop_on_eos=False))
                                 for p, n in zip(prompts, counts, strict=True)])  # fmt: skip
        assert [len(res.token_ids) for res in free] == counts
        n = sum(counts)
        c_rates.append(n / t_c)
        f_rates.append(n / t_f)
        ratios.append(t_f / t_c)
        mask_us.append(sum(res.constraint_mask_ms for res in constrained) * 1000.0 / n)
        tokens.append(n)
    return {"constrained_tok_s": float(np.median(c_rates)), "free_tok_s": float(np.median(f_rates)),
            "ratio": float(np.median(ratios)), "mask_us_per_token": float(np.median(mask_us)),
            "tokens": float(np.median(tokens))}  # fmt: skip


def n_choices(engine: BatchedInferenceEngine, repeats: int, max_new: int) -> dict[str, float]:
    prompt = [{"role": "user", "content": LONG_PROMPT}]
    options = [InferenceOptions(temperature=1.0, seed=50 + i, max_new_tokens=max_new, stop_on_eos=False,
                                repetition_penalty=1.0) for i in range(4)]  # fmt: skip
    forked, sequential, concurrent = [], [], []
    for _ in range(repeats):
        engine.store.clear()  # no prompt cached from the previous round, for every mode
        started = time.perf_counter()
        first = engine.submit(prompt, options[0])
        handles = [first] + [engine.submit(prompt, o, fork_of=first) for o in options[1:]]
        while not all(h.done() for h in handles):
            engine.step()
        forked.append(time.perf_counter() - started)
        together = [h.result(0).token_ids for h in handles]
        engine.store.clear()
        started = time.perf_counter()
        apart = [run(engine, [(prompt, o)])[0][0].token_ids for o in options]
        sequential.append(time.perf_counter() - started)
        assert apart == together, "n choices must equal separately seeded requests"
        engine.store.clear()
        concurrent.append(run(engine, [(prompt, o) for o in options])[1])
    n_prompt = len(engine.tokenizer.encode_messages(prompt))
    return {"prompt_tokens": n_prompt, "tokens_per_choice": max_new, "n4_s": float(np.median(forked)),
            "sequential_s": float(np.median(sequential)), "concurrent_s": float(np.median(concurrent)),
            "vs_sequential": float(np.median(sequential) / np.median(forked)),
            "vs_concurrent": float(np.median(concurrent) / np.median(forked))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    path = args.model or default_model_path()
    f = GgufFile(path)
    model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)
    repeats = 2 if args.quick else 4
    load_before = os.getloadavg()[0]
    results: dict[str, Any] = {"cpu_model": cpu_model(), "model": os.path.basename(path)}
    rows = [("measurement", "constrained tok/s", "free tok/s", "ratio (target >= 0.85)", "mask µs/token",
             "tokens")]  # fmt: skip
    for speculative in (True, False):
        engine = make_engine(model, tok, speculative)
        run(engine, [([{"role": "user", "content": "warm up"}],
                      InferenceOptions(max_new_tokens=8, constraint=Constraint.json_object()))])  # fmt: skip
        for n_concurrent in (1, 8):
            key = f"{'drafting' if speculative else 'no_drafting'}_{n_concurrent}"
            figures = constrained_vs_free(engine, n_concurrent, repeats)
            results[key] = figures
            rows.append((f"{n_concurrent} request(s), drafting {'on' if speculative else 'off'}",
                         f"{figures['constrained_tok_s']:.1f}", f"{figures['free_tok_s']:.1f}",
                         f"{figures['ratio']:.2f}x", f"{figures['mask_us_per_token']:.0f}",
                         f"{figures['tokens']:.0f}"))  # fmt: skip
    engine = make_engine(model, tok, True)
    n4 = n_choices(engine, repeats, max_new=24 if args.quick else 32)
    results["n4"] = n4
    results["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    rows.append(("n=4 vs 4 requests one after another (target >= 2.5x)", "", "", f"{n4['vs_sequential']:.2f}x",
                 "", f"{n4['prompt_tokens']} prompt + 4 x {n4['tokens_per_choice']}"))  # fmt: skip
    rows.append(("n=4 vs 4 requests at once", "", "", f"{n4['vs_concurrent']:.2f}x", "", ""))
    print(
        f"CPU: {results['cpu_model']}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    report("structured", results, rows, args.json)


if __name__ == "__main__":
    main()
