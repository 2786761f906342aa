"""The app that tests/app/test_usability_two.py stops with SIGTERM: the real window, one reply, then
the event loop with the app's own signal handling (``app.quit_on_signals``), until a signal comes.

Run as ``python tests/app/quit_child.py`` with ``SMALLMIND_HOME`` and ``SMALLMIND_MODEL`` in the
environment (offscreen Qt). Once the reply is done it prints ``READY <prompt tokens> <reply tokens>``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QTimer

from smallmind_app import app as app_module
from smallmind_app.app import create_window, ensure_application

POLL_MS = 20
QUESTION = "Tell me about the mountains and the sea, " * 6


def main() -> int:
    app = ensure_application()
    window = create_window()
    window.show()
    if hasattr(app_module, "quit_on_signals"):  # (an older app has none: SIGTERM kills it outright)
        app_module.quit_on_signals(app)
    tab = window.chat_tabs[0]
    state = {"sent": False}

    def poll() -> None:
        if not state["sent"] and window.model_info:
            tab.prompt_edit.setPlainText(QUESTION)
            tab.send_button.click()
            state["sent"] = True
        elif state["sent"] and not tab.is_generating:
            stats = tab.entries[-1].stats
            print(f"READY {stats['prompt_tokens']} {stats['n_tokens']}", flush=True)
            timer.stop()

    timer = QTimer(interval=POLL_MS)
    timer.timeout.connect(poll)
    timer.start()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
