"""``smallmind chat``: a multi-turn chat in the terminal, streaming replies from the batched engine.

Commands: ``/reset`` starts a new conversation, ``/quit`` (or Ctrl+D) leaves, ``/help``. Ctrl+C
stops a reply early (what was said so far is kept in the conversation).
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from typing import TextIO

from engine.batching import BatchedInferenceEngine, BatchingOptions
from engine.errors import EngineError
from engine.generation import GenerationEvent, GenerationResult
from engine.gguf import GgufFile
from engine.kv_store import SessionId
from engine.model import Model
from engine.sampling import InferenceOptions
from engine.tokenizer import Tokenizer

HELP = "Commands: /reset (new conversation), /quit (or Ctrl+D), /help. Ctrl+C stops a reply."


def load_engine(model_path: str, out: TextIO) -> BatchedInferenceEngine:
    started = time.perf_counter()
    out.write(f"Loading {model_path} ...\n")
    out.flush()
    gguf_file = GgufFile(model_path)
    model = Model.from_gguf(gguf_file)
    tokenizer = Tokenizer.from_gguf(gguf_file)
    c = model.config
    out.write(
        f"Loaded {c.name or 'model'}: {c.n_layers} layers, {c.hidden_size} dims, "
        f"vocabulary {c.vocab_size:,}, context {c.context_length:,} tokens, "
        f"in {time.perf_counter() - started:.1f} s\n"
    )
    # One user at a time: no reason to wait for other requests to batch with.
    return BatchedInferenceEngine(model, tokenizer, BatchingOptions(max_batch_wait_ms=0))


def options_from_args(args: argparse.Namespace) -> InferenceOptions:
    overrides = {
        name: getattr(args, name)
        for name in ("temperature", "max_new_tokens", "seed")
        if getattr(args, name, None) is not None
    }
    return InferenceOptions(**overrides)


def stream_reply(
    engine: BatchedInferenceEngine,
    messages: list[dict[str, str]],
    options: InferenceOptions,
    session: SessionId,
    out: TextIO,
) -> GenerationResult:
    """Submit, print the reply as it streams, return the result (Ctrl+C cancels, keeping the text)."""
    events: queue.Queue[GenerationEvent] = queue.Queue()
    handle = engine.submit(messages, options, session, on_event=events.put)
    while True:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            handle.cancel()
            continue
        out.write(event.text)
        out.flush()
        if event.result is not None:
            return event.result


def describe(result: GenerationResult) -> str:
    ttft = f"{result.ttft_ms:.0f} ms" if result.ttft_ms is not None else "-"
    parts = [
        f"{result.generated_tokens} tokens",
        f"{result.decode_tokens_per_s:.1f} tokens/s",
        f"time to first token {ttft}",
        f"{result.reused_tokens} of {result.prompt_tokens} prompt tokens reused from cache",
    ]
    if result.context_trimmed:
        parts.append("oldest turns dropped to fit the context")
    if result.finish_reason not in ("stop",):
        parts.append(f"ended: {result.finish_reason}" + (f" ({result.error})" if result.error else ""))
    return "[" + ", ".join(parts) + "]"


def run_chat(args: argparse.Namespace, inp: TextIO | None = None, out: TextIO | None = None) -> int:
    inp, out = inp or sys.stdin, out or sys.stdout
    options = options_from_args(args)
    engine = load_engine(str(args.model), out)
    engine.start()
    system = [{"role": "system", "content": args.system}] if getattr(args, "system", None) else []
    messages, session = list(system), SessionId.new_id()
    out.write(HELP + "\n")
    try:
        while True:
            out.write("\nyou> ")
            out.flush()
            line = inp.readline()
            if not line or line.strip() == "/quit":
                out.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text == "/help":
                out.write(HELP + "\n")
                continue
            if text == "/reset":
                engine.store.remove(session)
                messages, session = list(system), SessionId.new_id()
                out.write("(new conversation)\n")
                continue
            out.write("assistant> ")
            try:
                result = stream_reply(
                    engine, [*messages, {"role": "user", "content": text}], options, session, out
                )
            except EngineError as exc:
                out.write(f"\n(error: {exc})\n")
                continue
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
            out.write("\n" + describe(result) + "\n")
    finally:
        engine.stop()
