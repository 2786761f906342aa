"""The side panel of a tab that shows a cited passage: where it is (file, page or lines) and its text."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PySide6.QtCore import QUrl, Slot
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QHBoxLayout, QPushButton, QTextBrowser, QVBoxLayout, QWidget

from .choices import citation_html


class CitationPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("citationPanel")
        self.citation: dict[str, Any] = {}
        self.text = QTextBrowser(objectName="citationText")
        self.text.setOpenLinks(False)
        self.open_button = QPushButton("Open file", objectName="citationOpenButton")
        self.open_button.setToolTip("Open the cited file in the application your system uses for it")
        self.close_button = QPushButton("Close", objectName="citationCloseButton")
        self.open_button.clicked.connect(self._on_open_button_clicked)
        self.close_button.clicked.connect(self.hide)
        buttons = QHBoxLayout()
        buttons.addWidget(self.open_button)
        buttons.addStretch(1)
        buttons.addWidget(self.close_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.text, 1)
        layout.addLayout(buttons)
        self.setMinimumWidth(260)
        self.hide()

    def show_citation(self, citation: Mapping[str, Any]) -> None:
        self.citation = dict(citation)
        self.text.setHtml(citation_html(citation))
        self.open_button.setEnabled(Path(str(citation.get("path", ""))).is_file())
        self.show()

    @Slot()
    def _on_open_button_clicked(self) -> None:
        path = str(self.citation.get("path", ""))
        if path:
            QDesktopServices.openUrl(QUrl.fromLocalFile(path))
