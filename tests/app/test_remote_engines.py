"""Remote engines in the real window: Settings → Engines adds a real ``smallmind serve`` (a subprocess
on 127.0.0.1), a tab picks it, sends, and shows the reply with its numbers; a restart restores the
tab's engine. The key lives in the 0600 fallback file (no keyring backend here), never in the
conversations database, the settings file or the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PySide6.QtCore import Qt

from smallmind_app import paths
from smallmind_app.engines.endpoints import KEY_FILE_NAME, Endpoint
from tests.fixtures.http_faults import STREAM_HEAD, delta, fault_server, sse_chunk
from tests.fixtures.served import REPO, STOP_TIMEOUT_S, smallmind_serve
from tests.fixtures.window import LONG, REPLY_TIMEOUT_MS, send, stored_messages, wait_idle, wait_text
from tests.server.test_serve_cli import free_port, wait_healthy

KEY = "sk-remote-test-4d1f9a"
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def server(app_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``smallmind serve`` of the app's tiny model, with an API key; yields its base URL (no /v1)."""
    with smallmind_serve(app_model_path, KEY, tmp_path_factory.mktemp("served")) as url:
        yield url


def served_chats(url: str, reason: str = "") -> float:
    """Chat requests the server has finished (with ``reason``, or any), from its /metrics."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("smallmind_server_requests_finished")
        and 'endpoint="chat"' in line
        and f'finish_reason="{reason}' in line
    )


def type_into(qtbot: Any, field: Any, text: str) -> None:
    field.setFocus()
    field.selectAll()
    qtbot.keyClicks(field, text)


def add_endpoint(qtbot: Any, window: Any, name: str, base_url: str, key: str) -> Any:
    """Settings → Engines → Add server, fill it in, Test connection, OK; returns the page."""
    dialog = window.open_settings()
    page = dialog.engines_page
    dialog.pages.setCurrentWidget(page)
    page.findChild(type(page.add_button), "addEngineButton").click()
    type_into(qtbot, page.name, name)
    type_into(qtbot, page.base_url, base_url)
    type_into(qtbot, page.api_key, key)
    page.test_button.click()
    qtbot.waitUntil(
        lambda: page.test_result.text().startswith(("Connected", "Not reachable")), timeout=30_000
    )
    return dialog


def pick(qtbot: Any, tab: Any, label: str) -> None:
    """Pick ``label`` in the tab's engine picker with the keyboard, as a user would."""
    picker = tab.engine_picker
    target = picker.findText(label)
    assert target >= 0, [picker.itemText(i) for i in range(picker.count())]
    picker.setFocus()
    while picker.currentIndex() != target:
        qtbot.keyClick(picker, Qt.Key.Key_Down if picker.currentIndex() < target else Qt.Key.Key_Up)


def test_a_tab_chats_with_a_server_added_in_settings_and_keeps_it_after_a_restart(
    qtbot: Any, make_window: Any, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    window = make_window()
    dialog = add_endpoint(qtbot, window, "Team box", server + "/v1", KEY)
    assert dialog.engines_page.test_result.text() == "Connected: 1 model (app-tiny)"
    assert dialog.engines_page.model.currentText() == "app-tiny"
    dialog.ok_button.click()
    (endpoint,) = window.settings.engines
    assert (endpoint.name, endpoint.base_url, endpoint.model) == ("Team box", server + "/v1", "app-tiny")

    tab = window.chat_tabs[0]
    assert tab.engine_picker.itemText(0).startswith("Local · ")  # the local engine first
    pick(qtbot, tab, "Team box · app-tiny")
    before = served_chats(server)
    send(tab, "Hello from the window")
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert reply.role == "assistant" and reply.status == "complete" and reply.content, reply.stats
    assert served_chats(server) == before + 1  # the server answered, not the local engine
    assert reply.stats["n_tokens"] > 0 and reply.stats["tokens_per_s"] > 0 and reply.stats["ttft_ms"] > 0
    assert reply.stats["prompt_tokens"] > 0  # from the server's usage
    dock = window.stats_dock.labels
    qtbot.waitUntil(lambda: "last reply" in dock["statTabTtft"].text(), timeout=10_000)
    assert "Team box" in dock["statTabEngine"].text() and "last reply" in dock["statTabTokensPerSec"].text()
    conversation_id = tab.conversation_id
    assert stored_messages(conversation_id)[-1].content == reply.content

    window.close()
    assert_key_only_in_the_key_file(caplog.text)

    again = make_window()
    tab = next(t for t in again.chat_tabs if t.conversation_id == conversation_id)
    assert tab.engine_picker.engine_id == endpoint.id
    assert tab.engine_picker.currentText() == "Team box · app-tiny"
    send(tab, "And again")
    wait_idle(qtbot, tab)
    assert tab.entries[-1].status == "complete" and served_chats(server) == before + 2
    new_tab = again.new_chat()  # the default engine is still the local one
    assert new_tab.engine_picker.engine_id == "local"


def assert_key_only_in_the_key_file(log_text: str) -> None:
    home = paths.config_dir().parent
    key_file = paths.config_dir() / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert KEY in key_file.read_text(encoding="utf-8")
    holders = [p for p in home.rglob("*") if p.is_file() and p != key_file and KEY.encode() in p.read_bytes()]
    assert holders == []  # not in the conversations database, the settings file or the log file
    assert paths.database_file().is_file() and paths.settings_file().is_file()
    assert KEY not in log_text


def test_a_new_tab_uses_the_default_engine_and_a_failing_server_is_an_answer(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    port = free_port()  # nothing listens there
    gone = Endpoint("e0ffee", "Offline box", f"http://127.0.0.1:{port}/v1", "big-model")
    write_settings(engines=(gone,), default_engine=gone.id)
    window = make_window()
    tab = window.new_chat()
    assert tab.engine_picker.currentText() == "Offline box · big-model"
    send(tab, "Anyone there?")
    wait_idle(qtbot, tab, timeout=REPLY_TIMEOUT_MS)
    assert tab.entries[-1].status == "error"
    status = tab.status_label.text()
    assert "The reply failed" in status and "refused" in status and f"127.0.0.1:{port}" in status
    assert tab.send_button.isEnabled()
    pick(qtbot, tab, tab.engine_picker.itemText(0))  # back to the local engine: it answers
    send(tab, "Then you, please")
    wait_idle(qtbot, tab)
    assert tab.entries[-1].status == "complete" and tab.entries[-1].content


def test_removing_an_endpoint_sends_its_tabs_to_the_local_engine(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    box = Endpoint("b0b0b0", "Old box", "http://127.0.0.1:9/v1", "m")
    write_settings(engines=(box,))
    window = make_window()
    tab = window.chat_tabs[0]
    pick(qtbot, tab, "Old box · m")
    assert tab.saved_engine == box.id
    dialog = window.open_settings()
    page = dialog.engines_page
    page.list.setCurrentRow(1)
    page.remove_button.click()
    assert page.list.count() == 1 and not page.remove_button.isEnabled()
    dialog.ok_button.click()
    assert window.settings.engines == ()
    assert tab.engine_picker.engine_id == "local" and "no longer" in tab.status_label.text()
    send(tab, "Local, then")
    wait_idle(qtbot, tab)
    assert tab.entries[-1].status == "complete"


def test_an_endpoint_with_a_bad_url_cannot_be_saved(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_settings()
    page = dialog.engines_page
    page.add_button.click()
    type_into(qtbot, page.base_url, "localhost:8080")
    assert not dialog.ok_button.isEnabled()
    assert "must start with http:// or https://" in dialog.error_label.text()
    page.test_button.click()
    assert "must start with http://" in page.test_result.text()
    type_into(qtbot, page.base_url, "http://localhost:8080/v1")
    assert dialog.ok_button.isEnabled()


def test_a_remote_reply_and_a_local_one_run_side_by_side(
    qtbot: Any, make_window: Any, write_settings: Any, server: str
) -> None:
    """The worker never waits on HTTP: a local tab keeps generating while a server answers another."""
    box = Endpoint("5e4e4e", "Box", server + "/v1", "app-tiny")
    write_settings(engines=(box,), sampling=LONG)
    window = make_window()
    window.api_keys.set(box.id, KEY)
    window.send_endpoints()  # the key was stored after the window started
    local_tab, remote_tab = window.chat_tabs[0], window.new_chat()
    pick(qtbot, remote_tab, "Box · app-tiny")
    before = served_chats(server)
    send(local_tab, "A long local story")
    wait_text(qtbot, local_tab)
    send(remote_tab, "A long remote story")
    qtbot.waitUntil(lambda: bool(remote_tab.entries[-1].content), timeout=REPLY_TIMEOUT_MS)
    assert local_tab.is_generating  # both at once
    wait_idle(qtbot, local_tab, remote_tab)
    for tab in (local_tab, remote_tab):
        assert (
            tab.entries[-1].status == "complete"
            and tab.entries[-1].stats["n_tokens"] == LONG["max_new_tokens"]
        )
    assert served_chats(server) == before + 1


def test_stop_ends_a_remote_reply_and_the_server_sees_it(
    qtbot: Any, make_window: Any, write_settings: Any, server: str
) -> None:
    box = Endpoint("5709aa", "Box", server + "/v1", "app-tiny")
    write_settings(engines=(box,), default_engine=box.id, sampling=LONG)
    window = make_window()
    window.api_keys.set(box.id, KEY)
    window.send_endpoints()
    tab = window.new_chat()
    assert tab.engine_picker.engine_id == box.id  # the default engine
    cancelled = served_chats(server, "cancelled")
    send(tab, "A long story, please")
    wait_text(qtbot, tab)
    tab.stop_button.click()
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert reply.status == "partial" and reply.content and tab.status_label.text() == "Stopped."
    qtbot.waitUntil(lambda: served_chats(server, "cancelled") == cancelled + 1, timeout=10_000)


@contextlib.contextmanager
def serve_to_stop(model: Path, workdir: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``smallmind serve`` of ``model`` (no key) that the test stops itself; yields (base URL, process)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SMALLMIND_HOME": str(workdir / "home")}
    command = [sys.executable, "-m", "smallmind_cli", "serve", "--model", str(model), "--port", str(port)]
    with (workdir / "serve.log").open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(STOP_TIMEOUT_S)


def remote_tab(qtbot: Any, make_window: Any, write_settings: Any, base_url: str) -> Any:
    box = Endpoint("5e7e7e", "Box", base_url, "app-tiny")
    write_settings(engines=(box,), default_engine=box.id, sampling=LONG)
    window = make_window()
    tab = window.new_chat()
    assert tab.engine_picker.engine_id == box.id
    return tab


def test_a_server_stopped_mid_reply_says_it_ended_the_reply_not_stopped(
    qtbot: Any, make_window: Any, write_settings: Any, app_model_path: Path, tmp_path: Path
) -> None:
    """Issue 28 item 2: SIGTERM to the server mid-reply showed "Stopped.", what the user's Stop shows."""
    with serve_to_stop(app_model_path, tmp_path) as (url, proc):
        tab = remote_tab(qtbot, make_window, write_settings, url + "/v1")
        send(tab, "A long story, please")
        wait_text(qtbot, tab)
        proc.send_signal(signal.SIGTERM)
        wait_idle(qtbot, tab)
        assert proc.wait(STOP_TIMEOUT_S) == 0  # it stopped cleanly, cancelling the reply
    reply, status = tab.entries[-1], tab.status_label.text()
    assert reply.status == "error" and reply.content  # the text so far is kept
    assert status != "Stopped." and status.startswith("The reply failed: Box")
    assert "the server ended the reply" in tab.status_label.toolTip() + status
    assert "the server ended the reply before it finished" in reply.stats["error"]
    assert "the server ended the reply" in tab.transcript.toPlainText()  # the reply's footer says it too


def test_a_connection_cut_mid_reply_is_said_without_library_jargon(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    def cut(conn: socket.socket, n: int) -> None:
        conn.sendall(STREAM_HEAD + sse_chunk(delta("Once upon")) + sse_chunk(delta(" a time")))
        conn.shutdown(socket.SHUT_RDWR)

    with fault_server(cut) as server:
        tab = remote_tab(qtbot, make_window, write_settings, server.base_url)
        send(tab, "A story")
        wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    shown = tab.status_label.text() + tab.status_label.toolTip() + tab.transcript.toPlainText()
    assert reply.status == "error" and reply.content == "Once upon a time"
    assert "the connection was cut in the middle of the reply, after 16 characters" in shown
    for jargon in ("peer closed", "incomplete chunked read", "httpx", "RemoteProtocolError"):
        assert jargon not in shown
