"""The version bar under the transcript: ‹ 2/3 › for the latest message that has versions.

Regenerate keeps the replies it replaces, and an edited message keeps the one it replaces (with all
that followed it), as versions of their place in the conversation (the store's ``parent_id`` tree).
The transcript shows ‹ n/m › links under every such message; this bar holds the same two buttons
as widgets (``versionPrev``, ``versionNext``) for the last one, the one users switch most, and for
the keyboard. The chosen version is what the conversation continues from.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QToolButton, QWidget


class VersionBar(QWidget):
    step_requested = Signal(int, int)  # entry index, step (-1 previous, 1 next)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent, objectName="versionBar")
        self.index = -1  # the entry whose versions are shown
        self.prev_button = QToolButton(self, objectName="versionPrev")
        self.prev_button.setText("‹")
        self.prev_button.setAutoRaise(True)
        self.next_button = QToolButton(self, objectName="versionNext")
        self.next_button.setText("›")
        self.next_button.setAutoRaise(True)
        self.label = QLabel(self, objectName="versionLabel")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.prev_button)
        layout.addWidget(self.label)
        layout.addWidget(self.next_button)
        self.prev_button.clicked.connect(lambda: self.step_requested.emit(self.index, -1))
        self.next_button.clicked.connect(lambda: self.step_requested.emit(self.index, 1))
        self.setVisible(False)

    def show_versions(self, index: int, role: str, versions: tuple[int, int] | None, enabled: bool) -> None:
        """Show ‹ number/count › for entry ``index`` (hidden when it has no versions)."""
        self.index = index
        if versions is None:
            self.setVisible(False)
            return
        number, count = versions
        what = "reply" if role == "assistant" else "message"
        self.label.setText(f"{what.capitalize()} {number}/{count}")
        for button, which in ((self.prev_button, "previous"), (self.next_button, "next")):
            button.setToolTip(f"The {which} version of this {what}")
            button.setAccessibleName(f"{which.capitalize()} version of the {what}")
        self.prev_button.setEnabled(enabled and number > 1)
        self.next_button.setEnabled(enabled and number < count)
        self.setVisible(True)
