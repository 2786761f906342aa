"""The seed's "ProductionInference" example in Python: KV cache + batching together.

Ten prompts are generated concurrently in shared forward passes, then a two-turn conversation
reuses its cached context on the second turn.

    python examples/production_inference.py [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio

from engine import (
    BatchedInferenceEngine,
    BatchingOptions,
    InferenceOptions,
    KvCacheOptions,
    LruKvCacheStore,
    Model,
    SessionId,
    Tokenizer,
)
from engine.download import resolve_model_path
from engine.gguf import GgufFile


async def run(engine: BatchedInferenceEngine) -> None:
    options = InferenceOptions(max_new_tokens=50)

    # Submit requests (automatically batched)
    prompts = [[{"role": "user", "content": f"Give me fun fact number {i} about space."}] for i in range(10)]
    results = await asyncio.gather(*(engine.generate(p, options) for p in prompts))
    for i, result in enumerate(results):
        print(f"[{i}] {result.text[:70]!r}... ({result.generated_tokens} tokens)")
    metrics = engine.metrics.snapshot()
    print(f"Avg Batch Size: {metrics.average_batch_size:.2f}")
    print(f"Avg Wait Time: {metrics.average_batch_wait_ms:.1f}ms")
    print(f"Avg Queue Depth: {metrics.average_queue_depth:.2f}")

    # Streaming with batching
    async for event in engine.generate_streaming([{"role": "user", "content": "Tell me a story"}], options):
        print(event.text, end="", flush=True)
    print()

    # Multi-turn conversation with batching + caching
    session = SessionId.new_id()
    turn1 = [{"role": "user", "content": "What is machine learning?"}]
    response1 = await engine.generate(turn1, options, session_id=session)  # populates the cache
    turn2 = [*turn1, {"role": "assistant", "content": response1.text},
             {"role": "user", "content": "Can you give an example?"}]  # fmt: skip
    response2 = await engine.generate(turn2, options, session_id=session)  # cache hit
    print(f"turn 1: {response1.reused_tokens}/{response1.prompt_tokens} prompt tokens reused")
    print(f"turn 2: {response2.reused_tokens}/{response2.prompt_tokens} prompt tokens reused")
    print(response2.text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    f = GgufFile(resolve_model_path(args.model))
    model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)
    engine = BatchedInferenceEngine(
        model,
        tok,
        BatchingOptions(enabled=True),
        LruKvCacheStore(KvCacheOptions()),
        max_concurrent_sessions=100,
    )
    engine.start()  # a background thread drives engine.step()
    try:
        asyncio.run(run(engine))
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
