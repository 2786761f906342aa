"""The tab header's engine picker (``enginePicker``): the local engine first, then ``name · model``
for each endpoint of Settings → Engines. It shows and emits engine ids ("local" or an endpoint id);
the tab keeps the choice in its conversation's settings (key ``"engine"``)."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import QComboBox, QSizePolicy, QWidget

from .endpoints import LOCAL_ENGINE

MAX_WIDTH_PX = 360


class EnginePicker(QComboBox):
    engine_picked = Signal(str)  # engine id, when the user picks one (not when set from code)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("enginePicker")
        self.setToolTip(
            "The engine that answers in this chat: this computer's, or a server (Settings → Engines)"
        )
        self.setAccessibleName("Engine")
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)  # never squeezed by the header
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
        self.blockSignals(False)
        return index >= 0

    @Slot(int)
    def _on_activated(self, _index: int) -> None:
        self.engine_picked.emit(self.engine_id)
