"""Fixtures of the app tests: offscreen Qt, a tiny model big enough that steps take real time, windows.

The windows are real: ``create_window()`` with the real engine worker on its own thread. Every test
has its own ``SMALLMIND_HOME`` (the autouse fixture in tests/conftest.py), so settings and
conversations start empty unless a test writes them.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.tiny_model import write_tiny_gguf
from tests.fixtures.window import APP_MODEL, MODEL_TIMEOUT_MS


@pytest.fixture(scope="session")
def app_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("app_model") / "app-tiny.gguf", **APP_MODEL)


@pytest.fixture
def write_settings() -> Callable[..., None]:
    """Write settings.json (in this test's SMALLMIND_HOME) before a window is made."""
    from smallmind_app.settings.app_settings import AppSettings, save_settings

    def write(**sections: Any) -> None:
        save_settings(AppSettings().with_changes(**sections))

    return write


@pytest.fixture
def make_window(
    qtbot: Any, monkeypatch: pytest.MonkeyPatch, app_model_path: Path
) -> Iterator[Callable[..., Any]]:
    """make_window(model=app model | path | None, wait_model=True) -> a shown MainWindow."""
    from smallmind_app import create_window

    windows: list[Any] = []

    def make(model: Path | str | None = app_model_path, wait_model: bool = True) -> Any:
        if model is None:
            monkeypatch.delenv("SMALLMIND_MODEL", raising=False)
        else:
            monkeypatch.setenv("SMALLMIND_MODEL", str(model))
        window = create_window()
        qtbot.addWidget(window)
        windows.append(window)
        window.show()
        if wait_model:
            qtbot.waitUntil(lambda: bool(window.model_info), timeout=MODEL_TIMEOUT_MS)
        return window

    yield make
    for window in windows:  # no engine thread may outlive its test
        window.close()
        assert not window.client.thread.isRunning()
    if windows:  # this test's cyclic garbage (its Qt objects) collected here, on the GUI thread
        from smallmind_app import gui_gc

        gui_gc.uninstall()
