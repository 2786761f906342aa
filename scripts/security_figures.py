"""Print the API server's hostile-input figures (issue 23): what a 20,000-character stop string costs
the server's memory, and whether ``cached_tokens`` tells a right guess of another owner's text from a
wrong one. Loopback only; SmolLM2 (installed) unless ``--model PATH``.

    python scripts/security_figures.py
    python scripts/security_figures.py --model tests-tiny.gguf

1. RSS: a real ``smallmind serve`` on 127.0.0.1 in a subprocess; its VmRSS after a warm-up request,
   then its VmRSS and peak (VmHWM, reset just before) after one chat request whose ``stop`` is one
   20,000-character string (a 400 refusal counts: the server is not asked to hold the string).
2. The stop matcher alone (in this process, whatever the server's limits): tracemalloc's peak while
   ``StopStringMatcher`` takes a 20,000-character stop string and 20,000 characters of text.
3. Prefix oracle: an engine in this process (like the app's in-app server): a "tab" session holds
   "the pin is 4711"; an API client (the keyless local one) sends a warm-up guess, then the right
   guess and a wrong one, and reads ``usage.prompt_tokens_details.cached_tokens`` of each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import GenerationResult, InferenceOptions, SessionId  # noqa: E402
from tests.conftest import _INSTALLED_SMOLLM2  # noqa: E402
from tests.server.conftest import live_server, make_engine  # noqa: E402
from tests.server.test_serve_cli import free_port  # noqa: E402

STOP_CHARS = 20_000
SECRET = "Remember this for me: the pin is {}."


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def vm_mib(pid: int, field: str = "VmRSS") -> float:
    """VmRSS (resident now) or VmHWM (the peak resident size) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def stop_string_rss(model: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "smallmind_cli", "serve", "--model", str(model),
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("smallmind serve did not start")
            time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
        httpx.post(url + "/v1/chat/completions", json=body, timeout=120)  # warm-up
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # the peak from now on
        before = vm_mib(proc.pid)
        hostile = body | {"stop": ["x" * STOP_CHARS]}
        started = time.perf_counter()
        reply = httpx.post(url + "/v1/chat/completions", json=hostile, timeout=300)
        elapsed = time.perf_counter() - started
        after, peak = vm_mib(proc.pid), vm_mib(proc.pid, "VmHWM")
        print(f"stop string of {STOP_CHARS:,} chars: HTTP {reply.status_code} in {elapsed:.2f} s; "
              f"server RSS {before:.0f} MiB before, {after:.0f} after; its peak during the request "
              f"{peak:.0f} MiB (+{peak - before:.0f} MiB)")  # fmt: skip
        if reply.status_code != 200:
            print(f"  {reply.json()['error']['message'][:100]}")
    finally:
        proc.terminate()
        proc.wait(60)


def stop_matcher_peak() -> None:
    import tracemalloc

    from engine.sampling import StopStringMatcher

    tracemalloc.start()
    started = time.perf_counter()
    matcher = StopStringMatcher(["ab" * (STOP_CHARS // 2)])
    for _ in range(STOP_CHARS // 4):
        matcher.feed("abab")
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"StopStringMatcher, one {STOP_CHARS:,}-char stop string fed {STOP_CHARS:,} chars: "
          f"peak {peak / 2**20:.2f} MiB traced, {elapsed:.2f} s")  # fmt: skip


def prefix_oracle(model: Path) -> None:
    engine = make_engine(model)
    try:
        tab = [{"role": "user", "content": SECRET.format(4711)}]
        options = InferenceOptions(max_new_tokens=4, temperature=0.0)
        result = engine.submit(tab, options, SessionId("tab-1")).result(timeout=300)
        assert isinstance(result, GenerationResult)
        with live_server(engine, "m") as server, httpx.Client(timeout=300) as client:
            cached = {}
            for guess in ("0000", "4711", "9999"):  # the warm-up, the right guess, a wrong one
                body = {"messages": [{"role": "user", "content": SECRET.format(guess)}], "max_tokens": 1}
                reply = client.post(server.v1 + "/chat/completions", json=body).json()
                cached[guess] = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        print(
            f"prefix oracle (tab holds 4711; warm-up 0000 first): cached_tokens right 4711 -> "
            f"{cached['4711']}, wrong 9999 -> {cached['9999']} (warm-up 0000 -> {cached['0000']})"
        )
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_INSTALLED_SMOLLM2)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    print(f"{cpu_model()}; commit {commit}; model {args.model.name}")
    stop_string_rss(args.model)
    stop_matcher_peak()
    prefix_oracle(args.model)


if __name__ == "__main__":
    main()
