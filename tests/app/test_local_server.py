"""Tools → Local server…: the OpenAI-compatible API served from inside the app, on the app's engine.
A real server on 127.0.0.1 (a free port), a real HTTP client, the real window offscreen."""

from __future__ import annotations

import socket
import threading
from typing import Any

import httpx

from tests.fixtures.window import send, wait_idle


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_in_app_server_answers_beside_the_tabs_and_stops(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_local_server()
    assert dialog.objectName() == "localServerDialog" and dialog.address.text() == "not running"
    port = free_port()
    dialog.port.setValue(port)
    dialog.enabled.setChecked(True)
    qtbot.waitUntil(lambda: dialog.address.text().startswith("http://127.0.0.1:"), timeout=30_000)
    base = dialog.address.text()  # ends in /v1
    assert base.endswith("/v1") and base in dialog.example.toPlainText().replace("/chat/completions", "")
    models = httpx.get(base + "/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["app-tiny"]

    replies: dict[str, Any] = {}

    def ask() -> None:  # a client program, while a tab generates
        body = {"model": "app-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12,
                "temperature": 0}  # fmt: skip
        replies["api"] = httpx.post(base + "/chat/completions", json=body, timeout=60)

    tab = window.chat_tabs[0]
    send(tab, "Tell me about the sea")
    client = threading.Thread(target=ask)
    client.start()
    qtbot.waitUntil(lambda: not client.is_alive(), timeout=60_000)  # the worker steps the API request
    wait_idle(qtbot, tab)
    response = replies["api"]
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["content"] and answer["usage"]["completion_tokens"] >= 1
    assert tab.entries[-1].status == "complete"
    client = threading.Thread(target=ask)  # no tab generating: the API request alone wakes the engine
    client.start()
    qtbot.waitUntil(lambda: not client.is_alive(), timeout=60_000)
    assert replies["api"].status_code == 200 and replies["api"].json()["choices"][0]["message"]["content"]
    api_label = window.stats_dock.labels["statApiServer"]  # the dock counts the API's requests
    qtbot.waitUntil(lambda: "2 served, 0 in flight" in api_label.text(), timeout=10_000)
    assert api_label.text().startswith(base.removesuffix("/v1"))

    dialog.enabled.setChecked(False)
    qtbot.waitUntil(lambda: dialog.address.text() == "not running", timeout=30_000)
    qtbot.waitUntil(lambda: api_label.text() == "off", timeout=10_000)
    try:
        httpx.get(base + "/models", timeout=5)
    except httpx.TransportError:
        pass  # nothing listens any more
    else:
        raise AssertionError("the server still answers after it was stopped")
    assert window.settings.server_port == port  # saved: the next start offers the same port
    window.close()
    assert make_window().open_local_server().port.value() == port
