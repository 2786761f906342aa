"""Optional: RemoteEngine against llama.cpp's server (``llama-cpp-python[server]``, the reference
implementation of the API) running the real SmolLM2 on 127.0.0.1. Skipped, with the reason, when the
server extra is not installed (``pip install 'llama-cpp-python[server]'`` or ``.[bench]``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine import GenerationEvent, InferenceOptions
from engine.errors import RemoteEngineError
from engine.remote import RemoteEngine
from tests.server.test_serve_cli import free_port

KEY = "llama-k3y"
START_TIMEOUT_S = 120.0
TIMEOUT_S = 120.0
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def llama_server_missing() -> str:
    """Why llama.cpp's server cannot run here ("" when it can)."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python[server] is not installed ({exc})"
    return ""


pytestmark = [
    pytest.mark.llamacpp_server,
    pytest.mark.skipif(bool(llama_server_missing()), reason=llama_server_missing() or "installed"),
]


def start_llama_server(model: Path, port: int, log: Path) -> subprocess.Popen[str]:
    """Its (verbose) output goes to ``log``: a pipe nobody reads would fill and stop the server."""
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port),
               "--host", "127.0.0.1", "--api_key", KEY, "--n_ctx", "2048", "--n_threads", "1"]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ})


@pytest.fixture(scope="module")
def llama_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's server of SmolLM2 on a free loopback port; yields its base URL (with /v1)."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    proc = start_llama_server(smollm2_path, port, log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(
                    url + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2
                ).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"llama.cpp's server did not start: {log.read_text()[-2000:]}"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.fixture
def remote(llama_server: str) -> Iterator[RemoteEngine]:
    engine = RemoteEngine(llama_server, api_key=KEY, timeout_s=60, name="llama.cpp")
    yield engine
    engine.stop()


def test_models_and_a_refused_key(llama_server: str) -> None:
    (model,) = RemoteEngine(llama_server, api_key=KEY).list_models()
    assert model.endswith(".gguf")
    with pytest.raises(
        RemoteEngineError, match=r"llama\.cpp \(http://127\.0\.0\.1:\d+/v1\).*refused the API key"
    ):
        RemoteEngine(llama_server, api_key="wrong", name="llama.cpp").list_models()


def test_greedy_stream_equals_the_servers_own_non_streamed_reply(
    remote: RemoteEngine, llama_server: str
) -> None:
    options = InferenceOptions(temperature=0.0, max_new_tokens=24, repetition_penalty=1.0)
    body = {"messages": MESSAGES, "max_tokens": 24, "temperature": 0.0, "repeat_penalty": 1.0}
    direct = httpx.post(llama_server + "/chat/completions", json=body, timeout=TIMEOUT_S,
                        headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    events: list[GenerationEvent] = []
    result = remote.submit(MESSAGES, options, on_event=events.append).result(TIMEOUT_S)
    assert result.error is None and result.text == direct["choices"][0]["message"]["content"]
    assert "".join(e.text for e in events if e.kind == "token") == result.text
    assert result.finish_reason == direct["choices"][0]["finish_reason"]
    assert result.generated_tokens == direct["usage"]["completion_tokens"]
    assert result.ttft_ms is not None and result.ttft_ms > 0


def test_cancel_mid_stream(remote: RemoteEngine) -> None:
    started = threading.Event()
    handle = remote.submit(MESSAGES, InferenceOptions(max_new_tokens=1500, stop_on_eos=True),
                           on_event=lambda e: started.set() if e.kind == "token" else None)  # fmt: skip
    assert started.wait(TIMEOUT_S)
    handle.cancel()
    result = handle.result(10)
    assert result.finish_reason == "cancelled" and result.text
    after = remote.submit(MESSAGES, InferenceOptions(temperature=0.0, max_new_tokens=4)).result(TIMEOUT_S)
    assert after.finish_reason == "length" and after.text  # the server serves the next request
