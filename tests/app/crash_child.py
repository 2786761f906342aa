"""The app that tests/app/test_crash.py kills: the real window, generating in three tabs, until SIGKILL.

Run as ``python tests/app/crash_child.py`` with ``SMALLMIND_HOME`` and ``SMALLMIND_MODEL`` in the
environment (offscreen Qt unless ``QT_QPA_PLATFORM`` says otherwise). It builds the window with
``create_window()``, opens three tabs, gets a short reply in each, then starts a long reply in each.
On stdout, flushed, it prints:

    FINISHED <message id> <sha256 of its content, 16 hex digits>   once per message stored as complete
    STREAMING <id> <id> <id>   once all three long replies are streaming with some of their text saved

and then keeps running (streaming) until it is killed. Nothing here is faked: the replies, the
partial saves and the database are the app's own.
"""

from __future__ import annotations

import hashlib
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QTimer

from smallmind_app.app import create_window, ensure_application
from smallmind_app.settings.app_settings import AppSettings, save_settings

N_TABS = 3
SHORT = {"max_new_tokens": 8, "stop_on_eos": False, "seed": 1}
LONG = {"max_new_tokens": 1500, "stop_on_eos": False, "seed": 2}  # several seconds on the crash model
POLL_MS = 20


def say(line: str) -> None:
    print(line, flush=True)


class Child:
    def __init__(self) -> None:
        self.window = create_window()
        self.window.show()
        self.tabs = [self.window.chat_tabs[0]] + [self.window.new_chat() for _ in range(N_TABS - 1)]
        self.phase = "loading"
        self.reported: set[int] = set()

    def send_all(self, text: str) -> None:
        for i, tab in enumerate(self.tabs):
            tab.prompt_edit.setPlainText(f"{text} (tab {i + 1})")
            tab.send_button.click()

    def report_finished(self) -> None:
        for tab in self.tabs:
            for message in self.window.store.messages(tab.conversation_id):
                if message.status == "complete" and message.id not in self.reported:
                    self.reported.add(message.id)
                    digest = hashlib.sha256(message.content.encode()).hexdigest()[:16]
                    say(f"FINISHED {message.id} {digest}")

    def streaming_ids(self) -> list[int]:
        """The long replies stored as streaming with some text saved (all three, or none)."""
        ids = []
        for tab in self.tabs:
            last = self.window.store.messages(tab.conversation_id)[-1]
            if last.role == "assistant" and last.status == "streaming" and last.content and tab.is_generating:
                ids.append(last.id)
        return ids if len(ids) == N_TABS else []

    def poll(self) -> None:
        if self.phase == "loading" and self.window.model_info:
            self.send_all("Hello")
            self.phase = "short"
        elif self.phase == "short" and not any(tab.is_generating for tab in self.tabs):
            self.report_finished()
            self.window.settings = self.window.settings.with_changes(sampling=LONG)
            self.send_all("Now tell me a very long story")
            self.phase = "long"
        elif self.phase == "long":
            self.report_finished()  # the long turns' questions
            if ids := self.streaming_ids():
                say("STREAMING " + " ".join(map(str, ids)))
                self.phase = "streaming"


def main() -> int:
    for name in ("SMALLMIND_HOME", "SMALLMIND_MODEL"):
        if not os.environ.get(name):
            sys.exit(f"crash_child.py needs {name} in the environment")
    app = ensure_application()
    save_settings(AppSettings().with_changes(sampling=SHORT))
    child = Child()
    timer = QTimer(interval=POLL_MS)
    timer.timeout.connect(child.poll)
    timer.start()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
