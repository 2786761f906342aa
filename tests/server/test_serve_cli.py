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
