"""What re-ranking a question's BM25 candidates by the chat model's embeddings would cost (issue 29):
the time to embed 20 passages of ~300 tokens with the loaded model, as /v1/embeddings does.

    python scripts/embedding_rerank_cost.py [--model PATH] [--passages 20]
"""

from __future__ import annotations

import argparse
import subprocess
import time

from engine import BatchedInferenceEngine, BatchingOptions, GgufFile, Model, Tokenizer
from engine.download import resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--passages", type=int, default=20)
    args = parser.parse_args()
    f = GgufFile(resolve_model_path(args.model))
    model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)
    engine = BatchedInferenceEngine(model, tok, BatchingOptions(max_batch_wait_ms=0))
    engine.start()
    words = "The bridge over the river was built in 1887 by the city's engineers after the old ferry sank."
    base = words.split()
    passages = [" ".join(base[i % len(base) :] + base * 16)[:1200] for i in range(args.passages)]
    n_tokens = sum(len(tok.encode(p)) for p in passages)
    engine.submit_embedding("warm up").result(300)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    try:
        for _ in range(2):
            started = time.perf_counter()
            for handle in [engine.submit_embedding(p) for p in passages]:
                handle.result(600)
            seconds = time.perf_counter() - started
            print(f"{name}: {len(passages)} passages, {n_tokens} tokens embedded in {seconds:.2f} s "
                  f"({n_tokens / seconds:.0f} tok/s)")  # fmt: skip
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
