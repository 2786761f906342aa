"""``smallmind serve`` as a user runs it: a subprocess that answers, stops on SIGTERM, guards its key."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
TIMEOUT_S = 30.0
KEY = "k3y-never-printed"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def smallmind(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "smallmind_cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_healthy(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail("smallmind serve did not become healthy")


@pytest.fixture
def served(long_context_model: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    proc = smallmind("serve", "--model", str(long_context_model), "--port", str(port), "--api-key", KEY, "-v")
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)


def test_serve_answers_and_sigterm_cancels_the_stream_and_exits(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = served
    wait_healthy(url, proc)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 3000, "stream": True}
    finish_reasons = []
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=TIMEOUT_S
    ) as response:
        assert response.status_code == 200
        for i, line in enumerate(response.iter_lines()):
            if i == 4:
                proc.send_signal(signal.SIGTERM)
            if '"finish_reason": "' in line:
                finish_reasons.append(line.split('"finish_reason": "')[1].split('"')[0])
            assert i < 10_000
    assert finish_reasons == ["cancelled"]
    assert proc.wait(TIMEOUT_S) == 0
    out, err = proc.communicate()
    assert f"http://127.0.0.1:{url.rsplit(':', 1)[1]}/v1" in out
    assert KEY not in out + err


def test_non_loopback_host_without_a_key_refuses_to_start(long_context_model: Path) -> None:
    proc = smallmind(
        "serve", "--model", str(long_context_model), "--host", "0.0.0.0", "--port", str(free_port())
    )
    _out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 1
    assert "API key" in err and "0.0.0.0" in err


def test_unknown_command_or_option_prints_usage_and_fails() -> None:
    for args in (("bogus", "--x", "1"), ("--x", "1"), ("serve", "--bogus")):
        proc = smallmind(*args)
        _out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 2, args
        assert "usage: smallmind" in err, args


def test_the_server_package_never_imports_qt() -> None:
    code = ("import sys, smallmind_server.serve, smallmind_cli, smallmind_cli.main; "
            "sys.exit(1 if any(m.startswith('PySide6') for m in sys.modules) else 0)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=TIMEOUT_S).returncode == 0


def test_the_activations_flag_and_its_environment_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], long_context_model: Path
) -> None:
    """``--activations`` through the real parser into the server's options; ``$SMALLMIND_ACTIVATIONS``
    is its default; a bad value from either is a usage error that names it."""
    from engine import BatchingOptions
    from smallmind_cli.main import build_parser, serve_options

    def parse(*args: str) -> Any:
        return build_parser().parse_args(["serve", "--model", str(long_context_model), *args])

    monkeypatch.delenv("SMALLMIND_ACTIVATIONS", raising=False)
    assert parse().activations == "float32"
    assert serve_options(parse("--activations", "int8")).batching == BatchingOptions(activations="int8")
    monkeypatch.setenv("SMALLMIND_ACTIVATIONS", "INT8")
    assert serve_options(parse()).batching == BatchingOptions(activations="int8")
    assert parse("--activations", "float32").activations == "float32"  # the flag beats the variable
    for args, env in ((("--activations", "fp16"), "int8"), ((), "fp16")):
        monkeypatch.setenv("SMALLMIND_ACTIVATIONS", env)
        with pytest.raises(SystemExit) as leaving:
            parse(*args)
        err = capsys.readouterr().err
        assert leaving.value.code == 2 and "argument --activations: expected float32 or int8" in err, err
        assert "got 'fp16'" in err and "$SMALLMIND_ACTIVATIONS" in err


def test_serve_help_documents_the_activations(capsys: pytest.CaptureFixture[str]) -> None:
    from smallmind_cli.main import main

    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--activations {float32,int8}" in text
    assert "(default: $SMALLMIND_ACTIVATIONS, else float32)" in text and "needs AVX-512 VNNI" in text


def test_serve_with_int8_activations_says_what_the_engine_runs(long_context_model: Path) -> None:
    """The flag reaches the loaded engine: its ready line says which activations it runs, and it
    answers."""
    from engine.batching import int8_activations_available

    port = free_port()
    args = ("--model", str(long_context_model), "--port", str(port), "--activations", "int8")
    proc = smallmind("serve", *args)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0
        out, _err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)
    expected = "int8 (8-bit" if int8_activations_available() else "float32 (int8 asked"
    assert f"loaded; activations: {expected}" in out, out
