"""Applying a theme to the running app: light, dark, or following the system's color scheme.

``colors.py`` holds the named colors of each theme (no Qt); this module turns the chosen one into the
app's ``QPalette``
(with the Fusion style, which draws every widget from the palette, so dark is dark on every
platform) and tells the window (``theme_changed``) so that it re-renders what it painted with the old
colors (transcripts, sparklines, the history list). "Follow the system" reads
``QStyleHints.colorScheme()`` and follows its ``colorSchemeChanged`` signal while chosen.
"""

from __future__ import annotations

import logging

from PySide6.QtCore import QObject, Qt, Signal, Slot
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

from .. import colors as palettes
from ..colors import CHOICES, check_choice

log = logging.getLogger(__name__)


_ROLES = {  # palette role -> theme color name
    QPalette.ColorRole.Window: "window",
    QPalette.ColorRole.WindowText: "text",
    QPalette.ColorRole.Base: "base",
    QPalette.ColorRole.AlternateBase: "alternate_base",
    QPalette.ColorRole.ToolTipBase: "base",
    QPalette.ColorRole.ToolTipText: "text",
    QPalette.ColorRole.PlaceholderText: "muted",
    QPalette.ColorRole.Text: "text",
    QPalette.ColorRole.Button: "button",
    QPalette.ColorRole.ButtonText: "text",
    QPalette.ColorRole.BrightText: "error_text",
    QPalette.ColorRole.Highlight: "highlight",
    QPalette.ColorRole.HighlightedText: "highlight_text",
    QPalette.ColorRole.Link: "link",
    QPalette.ColorRole.LinkVisited: "link",
    QPalette.ColorRole.Light: "base",
    QPalette.ColorRole.Midlight: "button",
    QPalette.ColorRole.Mid: "plot_border",
    QPalette.ColorRole.Dark: "plot_border",
    QPalette.ColorRole.Shadow: "plot_border",
}
_DISABLED = (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText)


def system_theme() -> str:
    """ "dark" when the system's color scheme is dark, else "light" (also when it is unknown)."""
    app = QGuiApplication.instance()
    if not isinstance(app, QGuiApplication):
        return "light"
    return "dark" if app.styleHints().colorScheme() == Qt.ColorScheme.Dark else "light"


def palette_for(name: str) -> QPalette:
    colors = palettes.DARK if name == "dark" else palettes.LIGHT
    palette = QPalette()
    for role, key in _ROLES.items():
        palette.setColor(role, QColor(colors[key]))
    for role in _DISABLED:
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor(colors["disabled_text"]))
    return palette


class ThemeManager(QObject):
    """The app's theme: ``choice`` is what the user picked; ``name`` what is shown ("light"/"dark")."""

    theme_changed = Signal(str)  # "light" or "dark": what was painted with the old colors must be redone

    def __init__(self, choice: str = "system", parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.choice = check_choice(choice)
        self.name = ""
        app = QGuiApplication.instance()
        if isinstance(app, QGuiApplication):
            app.styleHints().colorSchemeChanged.connect(self._on_style_hints_color_scheme_changed)

    def set_choice(self, choice: str) -> None:
        """Use ``choice`` ("system", "light", "dark") now."""
        self.choice = check_choice(choice)
        self.apply(system_theme() if choice == "system" else choice)

    def apply(self, name: str) -> None:
        app = QApplication.instance()
        palettes.set_current(name)
        if isinstance(app, QApplication):
            app.setPalette(palette_for(name))
        if name != self.name:
            self.name = name
            log.info("theme: %s (%s)", name, CHOICES[self.choice])
            self.theme_changed.emit(name)

    @Slot(Qt.ColorScheme)
    def _on_style_hints_color_scheme_changed(self, scheme: Qt.ColorScheme) -> None:
        if self.choice == "system":
            self.apply("dark" if scheme == Qt.ColorScheme.Dark else "light")
