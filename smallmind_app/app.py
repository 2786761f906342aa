"""Start the desktop app: logging, the excepthook, the QApplication, the main window.

``create_window()`` builds everything (settings and conversations from the directories that
``SMALLMIND_HOME`` moves, the model from ``SMALLMIND_MODEL`` or the settings) without entering the
event loop; ``main()`` shows the window and runs the loop.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox

from . import gui_gc, paths
from .history.records import StoreCorruptError, StoreError
from .history.store import ConversationStore, move_aside
from .settings.app_settings import AppSettings, load_settings
from .window.main_window import MainWindow, app_icon
from .worker.client import EngineClient
from .worker.engine_options import validate_settings

log = logging.getLogger(__name__)

_app: QApplication | None = None  # keeps a QApplication made by create_window alive
_error_boxes: list[QMessageBox] = []  # open unexpected-error dialogs (kept alive until closed)


def setup_logging(level: int = logging.INFO) -> Path | None:
    """Log to the rotating file paths.log_file() (and stderr for warnings); the file, or None."""
    root = logging.getLogger()
    root.setLevel(level)
    stderr = logging.StreamHandler()
    stderr.setLevel(logging.WARNING)
    root.addHandler(stderr)
    path = paths.log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=2_000_000, backupCount=3, encoding="utf-8"
        )
    except OSError as exc:
        log.warning("cannot write the log file %s: %s", path, exc)
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return path


def install_excepthook() -> None:
    """Unexpected errors are logged with their traceback and shown in a dialog, never lost."""

    def show(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        log.critical("unexpected error", exc_info=(kind, value, tb))
        app = QApplication.instance()
        if app is None:
            sys.__excepthook__(kind, value, tb)
            return
        details = "".join(traceback.format_exception(kind, value, tb))
        QTimer.singleShot(0, app, lambda: _error_box(f"{kind.__name__}: {value}", details))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        show(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)

    sys.excepthook = show
    threading.excepthook = thread_hook


def _error_box(summary: str, details: str) -> None:
    text = f"Something went wrong; the details are in the log file {paths.log_file()}.\n\n{summary}"
    box = QMessageBox(QMessageBox.Icon.Critical, "SmallMind: unexpected error", text)
    box.setObjectName("unexpectedErrorDialog")
    box.setDetailedText(details)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    _error_boxes.append(box)
    box.finished.connect(lambda _result: _error_boxes.remove(box))
    box.open()  # not exec(): the app goes on (generations keep streaming) behind the dialog


def open_store() -> tuple[ConversationStore, str | None]:
    """The conversations database; a damaged one is moved aside, an unusable disk gives a memory-only one."""
    path = paths.database_file()
    try:
        return ConversationStore(path), None
    except StoreCorruptError as exc:
        aside = move_aside(path)
        return ConversationStore(
            path
        ), f"{exc}\nThe damaged file was moved to {aside}; a new one was started."
    except StoreError as exc:
        return ConversationStore(":memory:"), f"{exc}\nConversations are kept in memory only until you quit."


def ensure_application(argv: Sequence[str] | None = None) -> QApplication:
    global _app
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        _app = app = QApplication(list(argv) if argv is not None else sys.argv[:1])
    app.setApplicationName("SmallMind")
    app.setDesktopFileName("smallmind")  # the desktop entry (smallmind install-desktop-entry) of this app
    app.setWindowIcon(app_icon())
    app.setStyle("Fusion")
    gui_gc.install(app)  # cyclic garbage (closed dialogs' Qt objects) is collected on this thread only
    return app


def settings_problems(settings: AppSettings) -> dict[str, str]:
    """The engine's range check of a settings file: {"<section>.<key>": what is wrong}, {} when valid."""
    sections = {"kv": "kv_cache", "batching": "batching", "sampling": "sampling"}
    problems = validate_settings(settings.kv_cache, settings.batching, settings.sampling)
    return {f"{sections[key.split('.')[0]]}.{key.split('.', 1)[1]}": m for key, m in problems.items()}


def create_window(model_path: str | None = None) -> MainWindow:
    """Build the main window with a running engine worker; the caller shows it and runs the loop."""
    ensure_application()
    settings, settings_notice = load_settings(check=settings_problems)
    try:
        store, store_notice = open_store()
    except StoreError as exc:  # even the fallback failed: say so, run with a memory-only store
        store, store_notice = ConversationStore(":memory:"), str(exc)
    window = MainWindow(settings, store, EngineClient())
    window.start(model_path)
    for title, notice in (("Settings", settings_notice), ("Conversations", store_notice)):
        if notice:
            window.show_error(title, notice)
    return window


def main(argv: Sequence[str] | None = None) -> int:
    """``smallmind [--model PATH] [-v]``: show the window and run the event loop; the exit status."""
    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(prog="smallmind", description="SmallMind, the desktop chat app")
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="GGUF model file (default: $SMALLMIND_MODEL, "
        "else the settings, else the installed default model)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv[1:])  # an unknown option prints the usage and exits with status 2
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    install_excepthook()
    app = ensure_application([argv[0]])
    window = create_window(args.model)
    window.show()
    signal.signal(signal.SIGINT, lambda *_: app.quit())  # Ctrl+C in the terminal: a clean shutdown
    wake = QTimer(app, interval=250)  # lets Python run its signal handlers while Qt's loop runs
    wake.timeout.connect(lambda: None)
    wake.start()
    return app.exec()
