"""BackgroundServer (the API on a thread beside an engine the caller drives) and the Local server dialog."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine import BatchedInferenceEngine
from smallmind_server.background import BackgroundServer
from smallmind_server.serve import ServeOptions
from tests.server.conftest import TINY_NAME, wait_until

TIMEOUT_S = 60.0


def test_background_server_starts_serves_and_stops(tiny_engine: BatchedInferenceEngine) -> None:
    server = BackgroundServer(tiny_engine, TINY_NAME)
    url = server.start(port=0)
    try:
        assert server.running and url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        reply = client.chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3)  # fmt: skip
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        with pytest.raises(RuntimeError):
            server.start(port=0)
    finally:
        server.stop()
    assert not server.running and server.url is None
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2.0)


def test_background_server_refuses_network_without_key(
    tiny_engine: BatchedInferenceEngine, tmp_path: Path
) -> None:
    """The in-app server and `smallmind serve` refuse with the same words (one rule, in access.py)."""
    with pytest.raises(ValueError, match="API key") as in_app:
        BackgroundServer(tiny_engine, TINY_NAME).start(port=0, host="0.0.0.0")
    with pytest.raises(ValueError) as serve:
        ServeOptions(tmp_path / "m.gguf", host="0.0.0.0")
    assert str(in_app.value) == str(serve.value)
    assert "refusing to listen on 0.0.0.0 without an API key" in str(serve.value)


def test_local_server_dialog_starts_and_stops_a_server(
    qtbot: Any, tiny_engine: BatchedInferenceEngine
) -> None:
    from smallmind_app.server.server_dialog import LocalServerDialog

    server = BackgroundServer(tiny_engine, TINY_NAME)
    dialog = LocalServerDialog(port=8080, api_key="")
    qtbot.addWidget(dialog)

    def start(port: int, api_key: str) -> None:
        assert (port, api_key) == (1024, "k")
        dialog.show_running(server.start(port=0, api_key=api_key))  # port 0: any free port in a test

    def stop() -> None:
        server.stop()
        dialog.show_stopped()

    dialog.start_requested.connect(start)
    dialog.stop_requested.connect(stop)
    dialog.show()
    assert dialog.findChild(object, "serverAddress").text() == "not running"
    dialog.findChild(object, "serverPort").setValue(1024)
    dialog.findChild(object, "serverApiKey").setText("k")
    dialog.findChild(object, "serverEnabled").setChecked(True)
    try:
        address = dialog.findChild(object, "serverAddress").text()
        assert address == f"{server.url}/v1"
        example = dialog.findChild(object, "serverCurlExample").toPlainText()
        assert f"curl {server.url}/v1/chat/completions" in example and "Bearer k" in example
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(address + "/models", headers=headers, timeout=TIMEOUT_S).status_code == 200
        assert not dialog.findChild(object, "serverPort").isEnabled()
        dialog.findChild(object, "serverEnabled").setChecked(False)
        wait_until(lambda: not server.running, what="the server to stop")
        assert dialog.findChild(object, "serverAddress").text() == "not running"
    finally:
        server.stop()
