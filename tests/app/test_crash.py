"""Crash safety: the real app is SIGKILLed mid-generation in a subprocess, then started again.

``crash_child.py`` generates in three tabs and says which messages the database holds as finished,
and when all three long replies are streaming with some text saved. The test kills it then, restarts
the app with ``create_window()`` on the same ``SMALLMIND_HOME``, and checks that every finished
message is there unchanged, the database passes ``PRAGMA integrity_check``, and each interrupted
reply is shown and stored as partial, with the text saved before the kill.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from smallmind_app import paths
from smallmind_app.history.store import ConversationStore
from tests.fixtures.tiny_model import write_tiny_gguf

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().with_name("crash_child.py")
# Bigger than the app tests' model, so that a 1,500-token reply of three tabs lasts several seconds.
CRASH_MODEL = {"n_layers": 8, "hidden_size": 256, "ffn_size": 512, "context_length": 2048}
CHILD_TIMEOUT_S = 120.0  # start, load the model, a short turn, a second of streaming; on a busy machine


def read_lines_until(child: subprocess.Popen[str], last: str, timeout_s: float) -> list[str]:
    """The child's stdout lines up to the first starting with ``last``; fails past the timeout."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line.strip())
        lines.put(None)  # end of output: the child died

    threading.Thread(target=pump, name="crash-child-stdout", daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not (seen and seen[-1].startswith(last)):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {last!r} line from the child within {timeout_s} s: {seen}") from None
        if line is None:
            raise AssertionError(f"the child ended before {last!r}: {seen}")
        seen.append(line)
    return seen


def test_sigkill_mid_generation_keeps_every_finished_message(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    model = write_tiny_gguf(tmp_path / "crash-model.gguf", **CRASH_MODEL)
    env = {**os.environ, "SMALLMIND_MODEL": str(model), "QT_QPA_PLATFORM": "offscreen"}
    stderr = (tmp_path / "child-stderr.txt").open("w+", encoding="utf-8")
    child = subprocess.Popen(
        [sys.executable, str(CHILD)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    try:
        try:
            lines = read_lines_until(child, "STREAMING", CHILD_TIMEOUT_S)
        except AssertionError as exc:
            stderr.seek(0)
            raise AssertionError(f"{exc}\nthe child's stderr:\n{stderr.read()[-4000:]}") from None
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        stderr.close()

    finished = dict(line.split()[1:] for line in lines if line.startswith("FINISHED"))
    streaming = [int(i) for i in lines[-1].split()[1:]]
    assert len(finished) == 3 * 3  # per tab: the short turn's question and reply, the long question
    with ConversationStore(paths.database_file()) as store:  # as the kill left it
        cut_off = {
            m.id: m for c in store.list_conversations() for m in store.messages(c.id) if m.id in streaming
        }
    assert sorted(cut_off) == sorted(streaming)
    assert all(m.status == "streaming" and m.content for m in cut_off.values())  # the kill was mid-reply

    window = make_window(model=model)  # the app starts again on the same SMALLMIND_HOME
    assert window.store.integrity_check() == "ok"
    stored = {m.id: m for tab in window.chat_tabs for m in window.store.messages(tab.conversation_id)}
    assert len(window.chat_tabs) == 3
    for message_id, digest in finished.items():
        message = stored[int(message_id)]
        assert message.status == "complete"
        assert hashlib.sha256(message.content.encode()).hexdigest()[:16] == digest
    entries = {e.message_id: (tab, e) for tab in window.chat_tabs for e in tab.entries}
    for message_id in streaming:
        message, (tab, entry) = stored[message_id], entries[message_id]
        assert message.status == "partial" and message.content.startswith(cut_off[message_id].content)
        assert (entry.status, entry.content) == ("partial", message.content) and tab.entries[-1] is entry
        window.tabs.setCurrentWidget(tab)
        assert "interrupted (the app closed while this reply was generated)" in tab.transcript.toPlainText()
        assert not tab.is_generating and tab.send_button.isEnabled()
