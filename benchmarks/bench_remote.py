"""Remote engines: what a tab gets through ``RemoteEngine`` against the engine itself (SmolLM2, greedy).

    python benchmarks/bench_remote.py [--model PATH] [--quick] [--runs N] [--json out.json]

1. SmallMind server: one engine, served by the real API server (uvicorn on 127.0.0.1, as the app's
   Local server and ``smallmind serve`` run it). The same prompts submitted to the engine directly
   and through ``RemoteEngine`` (SSE over HTTP): time to first token and decode tokens/s of one
   stream (medians over the runs), and the aggregate tokens/s of 4 concurrent streams; ratios remote
   / direct, and whether the greedy texts are the same (they must be).
2. llama.cpp's server (``llama-cpp-python[server]``, when installed): the same model behind the
   reference implementation of the API, through ``RemoteEngine``: TTFT, tokens/s, and the optional
   test suite (``pytest -m llamacpp_server``) run here, its pass count reported.

Prints JSON and a table; never asserts.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from anchor import USER_ENV
from common import ROOT, default_model_path, report

from engine import BatchedInferenceEngine, GenerationResult, InferenceOptions, SessionId
from engine.remote import RemoteEngine
from smallmind_server.background import BackgroundServer
from smallmind_server.serve import load_engine

QUESTIONS = ["Tell me about the sea.", "What is a good breakfast?", "Explain rain to a child.",
             "Name three rivers."]  # fmt: skip
LLAMA_KEY = "bench-key"
_NONCES = itertools.count(1000)


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def one_stream(submit: Any, n_new: int, runs: int, session: Any = str) -> dict[str, Any]:
    """Median TTFT and decode tokens/s of one request at a time. Each run is a new conversation (its
    own session, its own first words), so no side reuses more of a cached prompt than the template's
    common start (direct and remote share one engine, hence one KV store)."""
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new)
    results: list[GenerationResult] = []
    for i in range(runs):
        nonce = f"{next(_NONCES)}"
        prompt = [{"role": "user", "content": f"Note {nonce}. {QUESTIONS[i % 4]}"}]
        results.append(submit(prompt, options, session(f"bench-{nonce}")).result(600))
    return {
        "ttft_ms": statistics.median(r.ttft_ms or 0.0 for r in results),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in results),
        "texts": [r.text for r in results],
        "tokens": [r.generated_tokens for r in results],
    }


def concurrent(submit: Any, n_new: int) -> dict[str, Any]:
    """4 streams at once: generated tokens / wall time from the first submit to the last result."""
    options = InferenceOptions(temperature=0.0, max_new_tokens=n_new)
    started = time.perf_counter()
    handles = [submit(messages(q), options) for q in QUESTIONS]
    results = [h.result(600) for h in handles]
    seconds = time.perf_counter() - started
    return {
        "tokens_per_s": sum(r.generated_tokens for r in results) / seconds,
        "texts": [r.text for r in results],
    }


def smallmind_server(engine: BatchedInferenceEngine, n_new: int, runs: int) -> dict[str, Any]:
    server = BackgroundServer(engine, "smollm2")
    url = server.start(port=0)
    remote = RemoteEngine(url, model="smollm2", timeout_s=600)
    try:
        for submit in (engine.submit, remote.submit):  # warm-up: kernels, the connection
            submit(messages("Hello"), InferenceOptions(temperature=0.0, max_new_tokens=4)).result(600)
        direct = one_stream(engine.submit, n_new, runs, SessionId)
        over_http = one_stream(remote.submit, n_new, runs)  # the id goes as X-Session-Id
        direct_4, over_http_4 = concurrent(engine.submit, n_new), concurrent(remote.submit, n_new)
    finally:
        remote.stop()
        server.stop()
    return {
        "new_tokens": n_new,
        "runs": runs,
        "direct": {k: v for k, v in direct.items() if k != "texts"},
        "remote": {k: v for k, v in over_http.items() if k != "texts"},
        "ttft_ratio": over_http["ttft_ms"] / direct["ttft_ms"] if direct["ttft_ms"] else 0.0,
        "decode_ratio": over_http["decode_tokens_per_s"] / direct["decode_tokens_per_s"],
        "concurrent_direct_tokens_per_s": direct_4["tokens_per_s"],
        "concurrent_remote_tokens_per_s": over_http_4["tokens_per_s"],
        "concurrent_ratio": over_http_4["tokens_per_s"] / direct_4["tokens_per_s"],
        "same_text": direct_4["texts"] == over_http_4["texts"],  # the same 4 prompts both ways
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def llama_server(model: Path, log: Path) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--api_key", LLAMA_KEY, "--n_ctx", "2048", "--n_threads", "1"]  # fmt: skip
    with log.open("w") as out:
        # the user's environment, not this process's (nothing the engine set here reaches llama.cpp)
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=USER_ENV)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(
                    url + "/models", headers={"Authorization": f"Bearer {LLAMA_KEY}"}, timeout=2
                ).is_success:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def llama_cpp(model: Path, n_new: int, runs: int) -> dict[str, Any]:
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"llama-cpp-python[server] is not installed ({exc})"}
    with tempfile.TemporaryDirectory() as tmp, llama_server(model, Path(tmp) / "server.log") as url:
        remote = RemoteEngine(url, api_key=LLAMA_KEY, timeout_s=600)
        try:
            remote.submit(messages("Hello"), InferenceOptions(temperature=0.0, max_new_tokens=4)).result(600)
            stream = one_stream(remote.submit, n_new, runs)
        finally:
            remote.stop()
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "llamacpp_server", "tests/server/test_remote_llamacpp.py"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ},
    )  # fmt: skip
    summary = (suite.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {k: v for k, v in stream.items() if k != "texts"} | {
        "suite": summary,
        "suite_exit": suite.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 2 runs")
    parser.add_argument(
        "--runs", type=int, default=None, help="single-stream repetitions (default 5, quick 2)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    n_new = 16 if args.quick else 64
    model = Path(args.model or default_model_path())
    engine = load_engine(model)
    try:
        results: dict[str, Any] = {"smallmind": smallmind_server(engine, n_new, runs)}
    finally:
        engine.stop()
    results["llama_cpp"] = llama_cpp(model, n_new, runs)
    s, ll = results["smallmind"], results["llama_cpp"]
    rows = [("measure", "engine (direct)", "RemoteEngine -> smallmind server", "remote / direct")]
    rows.append(("TTFT, one stream (median)", f"{s['direct']['ttft_ms']:.0f} ms", f"{s['remote']['ttft_ms']:.0f} ms",
                 f"{s['ttft_ratio']:.2f}x"))  # fmt: skip
    rows.append((f"decode tok/s, one stream x {n_new}", f"{s['direct']['decode_tokens_per_s']:.1f}",
                 f"{s['remote']['decode_tokens_per_s']:.1f}", f"{s['decode_ratio'] * 100:.0f}%"))  # fmt: skip
    rows.append(("4 concurrent streams, tok/s", f"{s['concurrent_direct_tokens_per_s']:.1f}",
                 f"{s['concurrent_remote_tokens_per_s']:.1f}", f"{s['concurrent_ratio'] * 100:.0f}%"))  # fmt: skip
    rows.append(("greedy texts identical", "", "", "yes" if s["same_text"] else "NO"))
    if "skipped" in ll:
        rows.append(("llama.cpp server", ll["skipped"], "", ""))
    else:
        rows.append(("RemoteEngine -> llama.cpp server: TTFT / decode tok/s", "",
                     f"{ll['ttft_ms']:.0f} ms / {ll['decode_tokens_per_s']:.1f}", ""))  # fmt: skip
        rows.append(("llama.cpp server suite (pytest -m llamacpp_server)", "", ll["suite"], ""))
    report("remote", results, rows, args.json)


if __name__ == "__main__":
    main()
