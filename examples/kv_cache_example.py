"""The seed's "KVCacheExample" in Python: a session's cache kept between calls, so the second call
only computes its new tokens.

    python examples/kv_cache_example.py [--model PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from engine import KvCacheOptions, LruKvCacheStore, Model, SessionId, Tokenizer
from engine.download import resolve_model_path
from engine.gguf import GgufFile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    f = GgufFile(resolve_model_path(args.model))
    model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)

    # Create the cache store (the spec's defaults: 4096 tokens per session, 1,000 sessions, 1 GiB)
    store = LruKvCacheStore(KvCacheOptions())
    session = SessionId.new_id()
    shape = model.kv_shape()  # layers, KV heads, head dim: 45 KiB per token for SmolLM2 in float32
    print(f"K/V bytes per token: {shape.bytes_per_token:,}")

    conversation = [{"role": "user", "content": "What is machine learning?"}]
    for turn in range(2):
        prompt = tok.encode_messages(conversation)
        started = time.perf_counter()
        entry, n_reused = store.prepare(session, shape, prompt, model.config.context_length)
        logits = model.forward(prompt[n_reused:], entry)[-1]  # only the tokens not cached yet
        ttft = (time.perf_counter() - started) * 1000
        reply = []
        for _ in range(40):  # greedy decoding, one token's work per step
            token = int(np.argmax(logits))
            if token in tok.eos_ids:
                break
            reply.append(token)
            logits = model.forward([token], entry)[-1]
        text = tok.decode(reply)
        print(f"\nturn {turn + 1}: {len(prompt)} prompt tokens, {n_reused} reused from the cache, "
              f"first token after {ttft:.0f} ms\n{text}")  # fmt: skip
        conversation += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": "Can you give an example?"},
        ]

    stats = store.get_stats()
    print(f"\nSessions: {stats.current_sessions}")
    mib = 1024 * 1024
    print(f"Memory: {stats.current_bytes / mib:.1f} MB reserved, {stats.used_bytes / mib:.1f} MB used")
    print(f"Hit Rate: {stats.hit_rate:.2%}")
    print(f"Evictions: {stats.evictions}")
    print(f"Reused Tokens: {stats.reused_tokens}")


if __name__ == "__main__":
    main()
