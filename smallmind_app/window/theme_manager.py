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

from PySide6.QtCore import QEvent, QObject, Qt, Signal, Slot
from PySide6.QtGui import QColor, QFont, QGuiApplication, QPainter, QPalette, QPen
from PySide6.QtWidgets import QApplication, QProxyStyle, QStyle, QStyleOption, QWidget

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


_system_font: list[QFont] = []  # the app's font before any text size was applied (one app per process)


def scaled_font(percent: int) -> QFont:
    """The system's font at ``percent`` % of its size (Settings → Appearance → Text size)."""
    app = QApplication.instance()
    if not _system_font:
        _system_font.append(QFont(app.font()) if isinstance(app, QApplication) else QFont())
    font = QFont(_system_font[0])
    if font.pointSizeF() > 0:
        font.setPointSizeF(font.pointSizeF() * percent / 100)
    else:  # a font sized in pixels
        font.setPixelSize(max(6, round(font.pixelSize() * percent / 100)))
    return font


def _depth(widget: QWidget) -> int:
    depth, parent = 0, widget.parentWidget()
    while parent is not None:
        depth, parent = depth + 1, parent.parentWidget()
    return depth


_INDICATORS = (
    QStyle.PrimitiveElement.PE_IndicatorCheckBox,
    QStyle.PrimitiveElement.PE_IndicatorItemViewItemCheck,
)


class ThemedStyle(QProxyStyle):
    """Fusion, with an edge of the theme's ``indicator_border`` around check boxes and radio buttons:
    Fusion draws it a shade darker than the window, which on the dark theme left the box of “Running”
    (Tools → Local server…) and every other check box hardly visible (1.1:1; 1.7:1 on the light theme)."""

    def __init__(self) -> None:
        super().__init__("Fusion")

    def drawPrimitive(
        self,
        element: QStyle.PrimitiveElement,
        option: QStyleOption,
        painter: QPainter,
        widget: QWidget | None = None,
    ) -> None:
        super().drawPrimitive(element, option, painter, widget)
        radio = element == QStyle.PrimitiveElement.PE_IndicatorRadioButton
        if element not in _INDICATORS and not radio:
            return
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, radio)
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.setPen(QPen(QColor(palettes.colors()["indicator_border"]), 1))
        box = option.rect.adjusted(0, 0, -1, -1)  # type: ignore[attr-defined]
        if radio:
            painter.drawEllipse(box)
        else:
            painter.drawRect(box)
        painter.restore()


_styles: list[ThemedStyle] = []


def use_themed_style(app: QApplication) -> None:
    """The app's style: Fusion (dark is dark on every platform) with visible check boxes."""
    if not isinstance(app.style(), ThemedStyle):
        _styles.append(ThemedStyle())  # kept referenced here as well as by the app
        app.setStyle(_styles[-1])


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
    text_scale_changed = Signal(int)  # % of the system's size: what was laid out in the old size is redone

    def __init__(self, choice: str = "system", parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.choice = check_choice(choice)
        self.name = ""
        self.text_scale = 100
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

    def set_text_scale(self, percent: int) -> None:
        """The whole app's text at ``percent`` % of the system's size, now (every widget not given a
        font of its own follows the app's font)."""
        app = QApplication.instance()
        font = scaled_font(percent)
        if isinstance(app, QApplication) and app.font() != font:
            app.setFont(font)
            app.sendPostedEvents(None, QEvent.Type.ApplicationFontChange)  # every widget now, not later
            # a widget with a style sheet keeps the font it was polished with: polish it again, parents
            # first (a child takes its parent's font)
            styled = [widget for widget in app.allWidgets() if widget.styleSheet()]
            for widget in sorted(styled, key=_depth):
                widget.setStyleSheet(widget.styleSheet())
        if percent != self.text_scale:
            self.text_scale = percent
            log.info("text size: %d%%", percent)
            self.text_scale_changed.emit(percent)

    @Slot(Qt.ColorScheme)
    def _on_style_hints_color_scheme_changed(self, scheme: Qt.ColorScheme) -> None:
        if self.choice == "system":
            self.apply("dark" if scheme == Qt.ColorScheme.Dark else "light")
