"""The tab header's engine picker (``enginePicker``): the local engine first, then ``name · model``
for each endpoint of Settings → Engines. It shows and emits engine ids ("local" or an endpoint id);
the tab keeps the choice in its conversation's settings (key ``"engine"``)."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QSize, Qt, Signal, Slot
from PySide6.QtGui import QPaintEvent
from PySide6.QtWidgets import QComboBox, QSizePolicy, QStyle, QStyleOptionComboBox, QStylePainter, QWidget

from .endpoints import LOCAL_ENGINE

MAX_WIDTH_PX = 360
TIP = "The engine that answers in this chat: this computer's, or a server (Settings → Engines)"
MIN_WIDTH_PX = 120  # the header squeezes the picker this far; its text then ends in "…"


class EnginePicker(QComboBox):
    engine_picked = Signal(str)  # engine id, when the user picks one (not when set from code)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("enginePicker")
        self.setToolTip(TIP)
        self.setAccessibleName("Engine")
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self.setMaximumWidth(MAX_WIDTH_PX)  # a long model id does not push the header's other buttons out
        self.addItem("Local engine", LOCAL_ENGINE)
        self.activated.connect(self._on_activated)

    @property
    def engine_id(self) -> str:
        return str(self.currentData() or LOCAL_ENGINE)

    def set_choices(self, choices: Sequence[tuple[str, str]], current: str) -> bool:
        """(engine id, label) pairs, the local engine first; selects ``current``. Returns False when
        ``current`` is not among them (then the local engine is selected)."""
        self.blockSignals(True)
        self.clear()
        for engine_id, label in choices:
            self.addItem(label, engine_id)
            self.setItemData(self.count() - 1, label, Qt.ItemDataRole.ToolTipRole)
        index = self.findData(current)
        self.setCurrentIndex(max(0, index))
        self.setToolTip(f"{self.currentText()}\n\n{TIP}")  # the whole name, when the picker cuts it
        self.blockSignals(False)
        return index >= 0

    def minimumSizeHint(self) -> QSize:
        """Never the width of the longest name: the window's minimum width must not follow it."""
        hint = super().minimumSizeHint()
        return QSize(min(hint.width(), MIN_WIDTH_PX), hint.height())

    def paintEvent(self, _event: QPaintEvent) -> None:
        """The current name cut with "…" when the picker is narrower than it (the list shows it whole)."""
        painter = QStylePainter(self)
        option = QStyleOptionComboBox()
        self.initStyleOption(option)
        painter.drawComplexControl(QStyle.ComplexControl.CC_ComboBox, option)
        field = self.style().subControlRect(
            QStyle.ComplexControl.CC_ComboBox, option, QStyle.SubControl.SC_ComboBoxEditField, self
        )
        option.currentText = self.fontMetrics().elidedText(
            option.currentText, Qt.TextElideMode.ElideRight, field.width() - 2
        )
        painter.drawControl(QStyle.ControlElement.CE_ComboBoxLabel, option)

    @Slot(int)
    def _on_activated(self, _index: int) -> None:
        self.setToolTip(f"{self.currentText()}\n\n{TIP}")
        self.engine_picked.emit(self.engine_id)
