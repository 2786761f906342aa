"""The seed's KV-cache table, in one run: generation without and with the cache, and multi-turn
time to first token (TTFT) cold vs warm.

    python benchmarks/bench_kv_cache.py [--model PATH] [--quick] [--runs N] [--json out.json]

1. The seed's config: a random-weight Llama of 4 layers, 128 dims (4 heads, FFN 512), 50 new tokens,
   for a short and a 256-token prompt. Target: >= 8x at 256 tokens.
2. SmolLM2-135M, a ~256-token chat prompt, 50 new tokens. Target: >= 14x.
3. A 5-turn SmolLM2 conversation growing to ~1,500 tokens: TTFT of each turn's prompt with a fresh
   store (cold) and with the store holding the earlier turns (warm: ``LruKvCacheStore.prepare`` + a
   forward of the tokens not reused). A second tab (a new session, the same system prompt, its own
   first question) runs alongside: its first turn copies the system prompt from tab 1. Target: turn-5
   warm TTFT >= 10x lower than cold.

"Without cache" is the engine's ``enabled=False`` mode: every step recomputes the whole sequence.
"With cache" prefills once, then runs one token per step. Greedy argmax, so both modes must produce
the same tokens (checked: a mismatch stops the benchmark). Each assistant reply enters the warm
cache untimed, as decoding would leave it. Medians of ``--runs`` runs after a warm-up; ratios are
printed next to their targets, never asserted.

On a busy machine, OpenBLAS's worker threads wait for a core at every matmul, which can make a
60-token prefill 10x slower; ``OPENBLAS_NUM_THREADS=1`` gives steadier numbers (the value in effect
is recorded in the JSON).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, default_model_path, report

from engine import KvCacheEntry, LruKvCacheStore, Model, SessionId, Tokenizer
from engine.gguf import GgufFile
from engine.model import Row

NEW_TOKENS = 50
TARGETS = {"seed_256": 8.0, "smollm2_256": 14.0, "turn5_ttft": 10.0}

SYSTEM = (
    "You are SmallMind, a friendly and careful assistant that runs entirely on the user's own computer. "
    "Answer in clear, plain English. When the user asks for a plan, give numbered steps and explain the "
    "reason behind each step. When you are not sure about a fact, say so instead of guessing, and suggest "
    "how the user could check it. Keep a warm and encouraging tone, avoid jargon unless the user uses it "
    "first, and prefer practical advice that a beginner can follow with simple tools and a small budget. "
    "If a question is ambiguous, state the assumption you make before you answer it."
)
USERS = (
    "I just moved into a house with a small back garden, about six by eight metres, that gets sun most of "
    "the afternoon. I have never grown vegetables before. Where should I start, and what should I do in "
    "the first month so that I do not waste money or lose my enthusiasm?",
    "That helps a lot, thank you. The soil looks heavy and sticky after rain, and it cracks when it dries "
    "out in summer. A neighbour told me it is clay. How do I improve it without digging the whole garden "
    "by hand, and how long will it take before I can plant?",
    "Great. Which vegetables would you suggest for a first year in raised beds like that? My family eats "
    "a lot of salads, tomatoes and beans, but we do not like cabbage very much. I would also like "
    "something that the children can sow and harvest themselves.",
    "We get slugs everywhere, especially after warm rain in the evening, and last week something ate "
    "half of the lettuce seedlings in one night. What can I do about slugs and snails without using "
    "poison, since we have a dog and a cat that walk through the garden?",
    "Thank you for all the advice. Could you now put everything together into a simple month by month "
    "calendar for the whole first year, from preparing the beds to the last harvest, so that I can print "
    "it and stick it on the fridge?",
)
TAB2_FIRST_USER = (
    "We have a tiny garden behind our new flat and my partner wants to grow our own food this year. "
    "Neither of us has ever done it. What are the first things we should do, and which mistakes do "
    "beginners usually make in their first month that we could avoid?"
)
REPLIES = (
    "Welcome to vegetable growing! A small garden is actually the best place to start, because you can "
    "learn a lot without being overwhelmed. Here is a plan for your first month.\n\n"
    "1. Watch the light for a week. Note which parts of the garden get at least six hours of direct sun. "
    "Most vegetables need that much, so this decides where your beds will go.\n"
    "2. Start small. Choose one area of about two by three metres for this year. A small bed that you look "
    "after well gives more food and more joy than a large one full of weeds.\n"
    "3. Check the soil. Dig a hole the depth of a spade and look at the colour and texture. Squeeze a "
    "handful: sandy soil falls apart, clay soil stays in a sticky ball.\n"
    "4. Clear the area. Remove grass and weeds, or cover the area with cardboard and a thick layer of "
    "compost, which kills the grass slowly and feeds the soil at the same time.\n"
    "5. Buy only a few tools: a spade, a hand trowel, a watering can and gloves. You can add more later.\n"
    "6. Keep a notebook. Write down what you sow and when, and what worked. By next spring it will be the "
    "most useful gardening book you own.\n\n"
    "If you tell me more about your soil, I can suggest how to prepare it.",
    "Clay soil has a bad reputation, but it is rich in nutrients and holds water well, so it can become "
    "very productive. The trick is to improve its structure rather than to fight it.\n\n"
    "1. Do not dig when it is wet. Walking on or digging wet clay squeezes out the air and makes it even "
    "harder. Wait until a handful crumbles instead of smearing.\n"
    "2. Build raised beds. Simple frames of wooden boards, about twenty to thirty centimetres high, let "
    "you add good soil on top of the clay. The beds drain better and warm up earlier in spring.\n"
    "3. Add organic matter every year. Spread five to ten centimetres of compost or well rotted manure on "
    "the surface. Worms will carry it down and open up the clay for you, with no digging needed.\n"
    "4. Mulch the surface. A layer of straw, leaves or compost stops the clay from baking hard and "
    "cracking in summer, and it keeps weeds down.\n"
    "5. Avoid sand in small amounts. Mixing a little sand into clay can make it set like concrete.\n\n"
    "If you build the beds and fill them with a mix of topsoil and compost, you can plant within a few "
    "weeks. The clay underneath will keep improving over the next two or three years.",
    "Raised beds are perfect for salads, tomatoes and beans, and all three are easy for a beginner. Here "
    "is a simple selection for your first year.\n\n"
    "1. Lettuce and salad leaves. Sow a short row every two or three weeks from spring to late summer, so "
    "that you always have young leaves to pick. Loose leaf varieties are the easiest.\n"
    "2. Tomatoes. Buy young plants rather than seeds in the first year. Cherry tomatoes are forgiving, "
    "crop heavily and the children will love picking them straight from the plant.\n"
    "3. Climbing beans. Grow them up a wigwam of canes at the north side of a bed so that they do not "
    "shade the other plants. They are fast, pretty and very productive.\n"
    "4. Radishes. They are ready in about four weeks, which makes them ideal for children who want to "
    "see results quickly.\n"
    "5. Courgettes. One or two plants are enough for a family, because they produce for months.\n"
    "6. Herbs such as parsley, chives and basil, which you can use every day in the kitchen.\n\n"
    "For the children, give them their own small square of a bed with radishes, sunflowers and "
    "nasturtiums. Owning a patch keeps them interested all summer.",
    "Slugs and snails are the most common problem in a young vegetable garden, and they love tender "
    "lettuce seedlings. The good news is that you can keep them under control without poison.\n\n"
    "1. Go on evening patrols. Slugs come out after dark and after rain. Walk round with a torch for a "
    "week or two and collect them in a bucket; you will remove most of the local population.\n"
    "2. Use beer traps. Sink a small container into the soil so that its rim is a little above the "
    "surface and half fill it with cheap beer. Slugs are attracted to it and fall in. Empty it often.\n"
    "3. Protect seedlings. Raise young plants in pots until they are bigger and tougher before you plant "
    "them out, and put a ring cut from a plastic bottle round each one.\n"
    "4. Water in the morning, not in the evening, so that the soil surface is dry by night.\n"
    "5. Encourage natural predators. Frogs, toads, hedgehogs and birds all eat slugs. A small pond or a "
    "pile of logs in a corner gives them a home.\n"
    "6. Keep the edges of the beds tidy, because slugs hide under boards, stones and long grass during "
    "the day.\n\n"
    "None of these methods harms your dog or your cat, and together they work well.",
)


def load(path: str | Path) -> tuple[Model, Tokenizer]:
    f = GgufFile(path)
    return Model.from_gguf(f), Tokenizer.from_gguf(f)


def blas_config() -> str:
    """The BLAS build line of ``numpy.show_config`` (threads, target), where NumPy offers it."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]  # type: ignore[index,unused-ignore]
        return str(blas.get("openblas configuration", blas.get("name", "?"))).replace("\n", " ")
    except Exception:  # older NumPy: no dict mode
        return "unknown"


# ---------------------------------------------------------------------------------------------
# 1 and 2: generation without and with the cache
# ---------------------------------------------------------------------------------------------
def generate_without_cache(model: Model, prompt: Sequence[int], n_new: int) -> list[int]:
    """The engine's ``enabled=False`` mode: every step recomputes the whole sequence."""
    ids = list(prompt)
    cache = KvCacheEntry(model.kv_shape(), model.config.context_length)  # one buffer, emptied each step
    for _ in range(n_new):
        cache.trim(0)
        logits = model.forward_last([Row(np.asarray(ids), cache)])  # (1, V)
        ids.append(int(logits[0].argmax()))
    return ids[len(prompt) :]


def generate_with_cache(model: Model, prompt: Sequence[int], n_new: int) -> list[int]:
    """Prefill once into a store's entry, then one token per step."""
    store = LruKvCacheStore()
    entry, _ = store.prepare(SessionId("bench"), model.kv_shape(), prompt, model.config.context_length)
    chunk, out = np.asarray(prompt), []
    for _ in range(n_new):
        logits = model.forward_last([Row(chunk, entry)])  # (1, V)
        out.append(int(logits[0].argmax()))
        chunk = np.asarray(out[-1:])
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def cache_off_vs_on(model: Model, prompt: Sequence[int], n_new: int, runs: int) -> dict[str, Any]:
    """Median seconds for ``n_new`` tokens (prompt processing included) in both modes, interleaved."""
    generate_with_cache(model, prompt[:8], 2)  # warm-up
    off: list[float] = []
    on: list[float] = []
    outputs: set[tuple[int, ...]] = set()
    for _ in range(runs):
        for times, fn in ((off, generate_without_cache), (on, generate_with_cache)):
            elapsed, tokens = timed(partial(fn, model, prompt, n_new))
            times.append(elapsed)
            outputs.add(tuple(tokens))
    if len(outputs) != 1:
        raise SystemExit(f"cached and uncached greedy decoding disagree: {sorted(outputs)}")
    t_off, t_on = statistics.median(off), statistics.median(on)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": n_new,
        "runs": runs,
        "without_cache_s": t_off,
        "with_cache_s": t_on,
        "without_cache_tok_s": n_new / t_off,
        "with_cache_tok_s": n_new / t_on,
        "speedup": t_off / t_on,
        "same_tokens": True,
    }


def seed_config(n_new: int, runs: int) -> dict[str, Any]:
    """The seed's 4-layer, 128-dim model with random weights (the tiny test model, bigger)."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.tiny_model import SAMPLE_TEXT, write_tiny_gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_gguf(
            Path(tmp) / "seed.gguf", n_layers=4, hidden_size=128, n_heads=4, n_kv_heads=4,
            ffn_size=512, context_length=1024, seed=0,
        )  # fmt: skip
        model, tok = load(path)
    text_ids = tok.encode(SAMPLE_TEXT * 4)
    prompts = {"short": tok.encode("Hello! How are you today?"), "256": text_ids[:256]}
    return {name: cache_off_vs_on(model, ids, n_new, runs) for name, ids in prompts.items()}


def smollm2_prompt(tok: Tokenizer, target: int = 256) -> list[int]:
    """The system prompt and as much of the first two questions as keeps the chat near ``target``."""
    words = f"{USERS[0]} {USERS[1]}".split()
    best: list[int] = []
    for n in range(1, len(words) + 1):
        ids = tok.encode_messages(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": " ".join(words[:n])}]
        )
        if len(ids) > target:
            break
        best = ids
    return best


# ---------------------------------------------------------------------------------------------
# 3: multi-turn time to first token
# ---------------------------------------------------------------------------------------------
def conversation(tok: Tokenizer, first_user: str, n_turns: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each turn's prompt ids, and each reply's ids as they follow that prompt in the next one."""
    messages = [{"role": "system", "content": SYSTEM}]
    prompts = []
    for k, user in enumerate((first_user, *USERS[1:n_turns])):
        messages.append({"role": "user", "content": user})
        prompts.append(tok.encode_messages(messages))
        if k < len(REPLIES):
            messages.append({"role": "assistant", "content": REPLIES[k]})
    im_end = tok.encode("<|im_end|>")[0]
    replies = [nxt[len(prev) : nxt.index(im_end, len(prev))] for prev, nxt in pairwise(prompts)]
    return prompts, replies


def time_to_first_token(
    model: Model, store: LruKvCacheStore, session: SessionId, prompt: Sequence[int]
) -> tuple[float, int, KvCacheEntry]:
    """Seconds from the request to the first token: prepare, prefill what is not reused, argmax."""
    started = time.perf_counter()
    entry, n_reused = store.prepare(session, model.kv_shape(), prompt, model.config.context_length)
    logits = model.forward_last([Row(np.asarray(prompt[n_reused:]), entry)])  # (1, V)
    int(logits[0].argmax())
    return time.perf_counter() - started, n_reused, entry


def multi_turn(model: Model, tok: Tokenizer, n_turns: int, runs: int) -> dict[str, Any]:
    tabs = {
        "tab1": conversation(tok, USERS[0], n_turns),
        "tab2": conversation(tok, TAB2_FIRST_USER, n_turns),
    }
    time_to_first_token(model, LruKvCacheStore(), SessionId("warm-up"), tabs["tab1"][0][0][:32])
    times: dict[tuple[str, int, str], list[float]] = {}
    reused: dict[tuple[str, int], int] = {}
    for _ in range(runs):
        store = LruKvCacheStore()
        for k in range(n_turns):
            for tab, (prompts, replies) in tabs.items():  # tab 2's turn k right after tab 1's
                cold, _, _ = time_to_first_token(model, LruKvCacheStore(), SessionId("cold"), prompts[k])
                warm, n_reused, entry = time_to_first_token(model, store, SessionId(tab), prompts[k])
                if k < len(replies):  # the reply, as decoding leaves it in the cache (untimed)
                    model.forward_last([Row(np.asarray(replies[k]), entry)])
                times.setdefault((tab, k, "cold"), []).append(cold)
                times.setdefault((tab, k, "warm"), []).append(warm)
                reused[tab, k] = n_reused
    stats = store.get_stats()
    turns: list[dict[str, Any]] = [
        {
            "tab": tab,
            "turn": k + 1,
            "prompt_tokens": len(prompts[k]),
            "reused_tokens": reused[tab, k],
            "cold_ttft_s": statistics.median(times[tab, k, "cold"]),
            "warm_ttft_s": statistics.median(times[tab, k, "warm"]),
        }
        for tab, (prompts, _) in tabs.items()
        for k in range(n_turns)
    ]
    for row in turns:
        row["ratio"] = row["cold_ttft_s"] / row["warm_ttft_s"]
    return {
        "runs": runs,
        "turns": turns,
        "store": {
            "hit_rate": stats.hit_rate,
            "token_reuse_ratio": stats.token_reuse_ratio,
            "shared_prefix_tokens": stats.shared_prefix_tokens,
            "current_bytes": stats.current_bytes,
            "peak_bytes": stats.peak_bytes,
        },
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def generation_rows(label: str, result: dict[str, Any], target: float | None) -> tuple[str, ...]:
    return (
        label,
        str(result["prompt_tokens"]),
        f"{result['without_cache_tok_s']:.2f} tok/s ({result['without_cache_s'] * 1e3:.0f} ms)",
        f"{result['with_cache_tok_s']:.2f} tok/s ({result['with_cache_s'] * 1e3:.0f} ms)",
        f"{result['speedup']:.1f}x" + (f" (target >= {target:.0f}x)" if target else ""),
    )


def tables(results: dict[str, Any]) -> list[tuple[str, ...]]:
    n_new = results["new_tokens"]
    rows: list[tuple[str, ...]] = [
        ("case", "prompt tokens", f"without cache ({n_new} tokens)", "with cache", "speedup")
    ]
    seed = results["seed_config"]
    rows.append(generation_rows("seed config (4 layers, 128 dims), short", seed["short"], None))
    rows.append(generation_rows("seed config (4 layers, 128 dims), 256", seed["256"], TARGETS["seed_256"]))
    rows.append(generation_rows("SmolLM2-135M Q4_1", results["smollm2"], TARGETS["smollm2_256"]))
    rows.append(("", "", "", "", ""))
    rows.append(("TTFT: tab / turn", "prompt tokens (reused)", "cold", "warm", "cold / warm"))
    last = max(row["turn"] for row in results["multi_turn"]["turns"])
    for row in results["multi_turn"]["turns"]:
        target = f" (target >= {TARGETS['turn5_ttft']:.0f}x)" if row["turn"] == last == 5 else ""
        rows.append(
            (
                f"{row['tab']} turn {row['turn']}",
                f"{row['prompt_tokens']} ({row['reused_tokens']})",
                f"{row['cold_ttft_s'] * 1e3:.0f} ms",
                f"{row['warm_ttft_s'] * 1e3:.0f} ms",
                f"{row['ratio']:.1f}x{target}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="SmolLM2 GGUF (default: the installed model)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run, 10 tokens, 2 turns")
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (default 3)")
    parser.add_argument("--json", default=None, help="also write the JSON document here")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    n_new, n_turns = (10, 2) if args.quick else (NEW_TOKENS, len(USERS))
    results: dict[str, Any] = {
        "new_tokens": n_new,
        "blas_config": blas_config(),
        "blas_threads": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
    }
    results["seed_config"] = seed_config(n_new, runs)
    model, tok = load(args.model or default_model_path())
    results["smollm2"] = cache_off_vs_on(model, smollm2_prompt(tok), n_new, runs)
    results["multi_turn"] = multi_turn(model, tok, n_turns, runs)
    report("kv_cache", results, tables(results), args.json)


if __name__ == "__main__":
    main()
