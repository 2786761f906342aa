"""SmallMind's desktop app. Import-light: Qt and the engine load only when a window is made."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .window.main_window import MainWindow


def create_window(model_path: str | None = None) -> MainWindow:
    """Build the main window (see ``smallmind_app.app.create_window``) without entering the event loop."""
    from .app import create_window as _create_window

    return _create_window(model_path)


__all__ = ["create_window"]
