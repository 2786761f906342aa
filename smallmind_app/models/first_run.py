"""First run without a model: download the default model (cancellable, with progress) or open a GGUF file.

The download is the same code as ``smallmind models pull`` (``engine.download.pull_model``), run by
the worker on a plain thread; this dialog only shows its progress.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..colors import colors

PHASES = {"download": "Downloading", "extract": "Extracting", "verify": "Verifying"}


def choose_model_file(parent: QWidget | None) -> str:
    """Ask for a GGUF file; "" when the user cancels. (Tests replace this function.)"""
    path, _ = QFileDialog.getOpenFileName(
        parent, "Open a GGUF model file", "", "GGUF models (*.gguf);;All files (*)"
    )
    return path


class FirstRunDialog(QDialog):
    download_requested = Signal()
    download_cancel_requested = Signal()
    model_file_chosen = Signal(str)

    def __init__(self, model: Mapping[str, Any], reason: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("firstRunDialog")
        self.setWindowTitle("Welcome to SmallMind")
        self.setMinimumWidth(520)
        self._downloading = False
        self._cancelled = False
        size_mb = model["size_bytes"] / 1e6
        intro = QLabel(
            f"<h3>SmallMind needs a language model</h3>"
            f"<p>No model file was found. SmallMind can download <b>{model['name']}</b> "
            f"({size_mb:.0f} MB, {model['license']}) and check its SHA-256, or open a GGUF model file "
            f"you already have.</p>"
        )
        intro.setWordWrap(True)
        intro.setTextFormat(Qt.TextFormat.RichText)
        self.reason_label = QLabel(reason, objectName="firstRunReason")
        self.reason_label.setWordWrap(True)
        self.reason_label.setStyleSheet(f"color: {colors()['muted']};")
        self.reason_label.setVisible(bool(reason))
        self.download_button = QPushButton(f"Download {model['name']}", objectName="downloadButton")
        self.download_button.setDefault(True)
        self.open_button = QPushButton("Open a GGUF file…", objectName="openFileButton")
        self.later_button = QPushButton("Not now", objectName="laterButton")
        self.progress = QProgressBar(objectName="downloadProgress")
        self.progress.setVisible(False)
        self.phase_label = QLabel(objectName="downloadPhase")
        self.phase_label.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel download", objectName="cancelDownloadButton")
        self.cancel_button.setVisible(False)
        self.download_button.clicked.connect(self._on_download_clicked)
        self.open_button.clicked.connect(self._on_open_clicked)
        self.later_button.clicked.connect(self.reject)
        self.cancel_button.clicked.connect(self._on_cancel_clicked)
        choices = QHBoxLayout()
        choices.addWidget(self.download_button)
        choices.addWidget(self.open_button)
        choices.addStretch(1)
        choices.addWidget(self.later_button)
        progress_row = QHBoxLayout()
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.reason_label)
        layout.addLayout(choices)
        layout.addLayout(progress_row)
        layout.addWidget(self.phase_label)

    @property
    def downloading(self) -> bool:
        return self._downloading

    def _set_downloading(self, downloading: bool) -> None:
        self._downloading = downloading
        self.download_button.setEnabled(not downloading)
        self.open_button.setEnabled(not downloading)
        self.later_button.setEnabled(not downloading)
        self.progress.setVisible(downloading)
        self.cancel_button.setVisible(downloading)
        self.cancel_button.setEnabled(downloading)

    @Slot()
    def _on_download_clicked(self) -> None:
        self._cancelled = False
        self._set_downloading(True)
        self.progress.setRange(0, 0)  # busy until pip reports a size
        self.phase_label.setText("Starting the download…")
        self.download_requested.emit()

    @Slot()
    def _on_cancel_clicked(self) -> None:
        self._cancelled = True
        self.cancel_button.setEnabled(False)
        self.phase_label.setText("Cancelling…")
        self.download_cancel_requested.emit()

    @Slot()
    def _on_open_clicked(self) -> None:
        path = choose_model_file(self)
        if path:
            self.model_file_chosen.emit(path)
            self.accept()

    def show_progress(self, phase: str, done: int, total: int) -> None:
        if self._downloading:
            show_download_progress(self.progress, self.phase_label, phase, done, total)

    def show_finished(self, path: str) -> None:
        self._set_downloading(False)
        self.phase_label.setText(f"Installed {path}")
        self.accept()

    def show_failed(self, message: str) -> None:
        self._set_downloading(False)
        self.phase_label.setText("Download cancelled." if self._cancelled else f"Download failed: {message}")
        self.phase_label.setStyleSheet("" if self._cancelled else f"color: {colors()['error_text']};")

    def reject(self) -> None:
        if self._downloading:  # Escape or the window's close button while downloading: cancel first
            self._on_cancel_clicked()
            return
        super().reject()


def show_download_progress(bar: QProgressBar, label: QLabel, phase: str, done: int, total: int) -> None:
    """A download's phase and bytes in ``label``, its share in ``bar`` (busy when the total is unknown)."""
    if total > 0:
        bar.setRange(0, 1000)
        bar.setValue(int(1000 * min(1.0, done / total)))
        amount = f"{done / 1e6:.1f} of {total / 1e6:.1f} MB"
    else:
        bar.setRange(0, 0)
        amount = f"{done / 1e6:.1f} MB" if done else ""
    label.setText(f"{PHASES.get(phase, phase.capitalize())}… {amount}".strip())
