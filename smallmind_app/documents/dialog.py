"""Tools → Documents…: the libraries, their counts and skipped files, adding folders or files, and the
progress of the background indexing. The dialog only shows and asks; ``feature.py`` does the work
through the documents workers (never on this thread)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    from .feature import DocumentsFeature


def library_line(row: dict[str, Any]) -> str:
    skipped = len(row.get("skipped", ()))
    never = "" if row.get("updated_s") else " · not indexed yet"
    return (f"{row['name']} — {row['n_files']:,} files, {row['n_passages']:,} passages, "
            f"{skipped:,} skipped{never}")  # fmt: skip


def unique_name(base: str, taken: Sequence[str]) -> str:
    name, n = base or "library", 2
    while name in taken:
        name, n = f"{base} {n}", n + 1
    return name


class DocumentsDialog(QDialog):
    def __init__(self, feature: DocumentsFeature, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("documentsDialog")
        self.setWindowTitle("Documents")
        self.resize(760, 520)
        self.feature = feature
        self.rows: list[dict[str, Any]] = []
        self.library_list = QListWidget(objectName="libraryList")
        self.skipped_list = QListWidget(objectName="skippedList")
        self.sources_label = QLabel(objectName="librarySources")
        self.sources_label.setWordWrap(True)
        self.sources_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.add_button = QPushButton("New library from a folder…", objectName="addLibraryButton")
        self.add_files_button = QPushButton("New library from files…", objectName="addFilesButton")
        self.update_button = QPushButton("Update now", objectName="updateLibrariesButton")
        self.stop_button = QPushButton("Stop", objectName="stopIndexingButton")
        self.remove_button = QPushButton("Remove library", objectName="removeLibraryButton")
        self.progress = QProgressBar(objectName="indexProgress")
        self.status = QLabel(objectName="indexStatus")
        self.status.setWordWrap(True)
        self._lay_out()
        self.add_button.clicked.connect(self._on_add_button_clicked)
        self.add_files_button.clicked.connect(self._on_add_files_button_clicked)
        self.update_button.clicked.connect(lambda: self.feature.update_libraries())
        self.stop_button.clicked.connect(self.feature.stop_indexing)
        self.remove_button.clicked.connect(self._on_remove_button_clicked)
        self.library_list.currentRowChanged.connect(self._show_selected)
        self.stop_button.setEnabled(False)
        self.progress.setVisible(False)

    def _lay_out(self) -> None:
        buttons = QHBoxLayout()
        for button in (self.add_button, self.add_files_button, self.update_button, self.stop_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.remove_button)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Libraries (a chat uses them from its Documents button):"))
        layout.addWidget(self.library_list, 2)
        layout.addWidget(self.sources_label)
        layout.addWidget(QLabel("Files not indexed, and why:"))
        layout.addWidget(self.skipped_list, 1)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(buttons)

    # -- from the feature -------------------------------------------------------------------------
    def set_rows(self, rows: list[dict[str, Any]]) -> None:
        selected = self.selected_name()
        self.rows = list(rows)
        self.library_list.clear()
        for row in self.rows:
            item = QListWidgetItem(library_line(row))
            item.setData(Qt.ItemDataRole.UserRole, row["name"])
            self.library_list.addItem(item)
        names = [row["name"] for row in self.rows]
        self.library_list.setCurrentRow(
            names.index(selected) if selected in names else min(0, len(names) - 1)
        )
        self.remove_button.setEnabled(bool(self.rows))
        self._show_selected()

    def show_progress(self, name: str, done: int, total: int, path: str) -> None:
        self.progress.setVisible(True)
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.stop_button.setEnabled(True)
        where = f" — {os.path.basename(path)}" if path else ""
        self.status.setText(f"Indexing {name}: {done:,} of {total:,} files{where}")

    def show_finished(self, name: str, report: dict[str, Any]) -> None:
        self.progress.setVisible(False)
        self.stop_button.setEnabled(False)
        if report.get("removed"):
            self.status.setText(f"Removed {name}.")
            return
        what = "Stopped" if report.get("cancelled") else "Indexed"
        self.status.setText(
            f"{what} {name}: {report['n_files']:,} files ({report['n_read']:,} read again), "
            f"{report['n_passages']:,} new passages, {len(report['skipped']):,} skipped, "
            f"{report['elapsed_s']:.1f} s."
        )

    def show_failed(self, name: str, message: str) -> None:
        self.progress.setVisible(False)
        self.stop_button.setEnabled(False)
        self.status.setText(f"{name}: {message}")

    # -- user actions ---------------------------------------------------------------------------
    def selected_name(self) -> str | None:
        item = self.library_list.currentItem()
        return None if item is None else str(item.data(Qt.ItemDataRole.UserRole))

    @Slot()
    def _show_selected(self) -> None:
        name = self.selected_name()
        row = next((r for r in self.rows if r["name"] == name), None)
        self.skipped_list.clear()
        if row is None:
            self.sources_label.setText("")
            return
        self.sources_label.setText("Folders and files: " + "; ".join(row["sources"]))
        for path, reason in row["skipped"]:
            self.skipped_list.addItem(f"{path} — {reason}")

    def add_sources(self, paths: Sequence[str]) -> str | None:
        """A new library (named after the first folder or file) of ``paths``, indexed in the background."""
        paths = [p for p in paths if p]
        if not paths:
            return None
        base = os.path.basename(os.path.normpath(paths[0]))
        base = os.path.splitext(base)[0] if os.path.isfile(paths[0]) else base
        name = unique_name(base, [row["name"] for row in self.rows])
        self.feature.add_library(name, list(paths))
        self.status.setText(f"Indexing {name}…")
        return name

    @Slot()
    def _on_add_button_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A folder for a new library")
        self.add_sources([folder] if folder else [])

    @Slot()
    def _on_add_files_button_clicked(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(
            self,
            "Files for a new library",
            "",
            "Documents (*.txt *.md *.pdf *.html *.htm *.rst *.py);;All files (*)",
        )
        self.add_sources(files)

    @Slot()
    def _on_remove_button_clicked(self) -> None:
        name = self.selected_name()
        if name is not None:
            self.feature.remove_library(name)
