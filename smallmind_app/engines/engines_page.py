"""Settings → Engines: the built-in local engine and any number of OpenAI-compatible servers.

The list (``engineList``) has the local engine first (it cannot be removed), then the endpoints; the
fields edit the selected endpoint: ``engineName``, ``engineBaseUrl``, ``engineApiKey`` (hidden as it is
typed), ``engineModel`` (filled by ``engineTestButton``, which lists the server's models), and
``defaultEngine`` picks the engine of new tabs. The page asks for the test through
``test_requested``; the main window runs it on the worker and hands back ``show_test_result``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..paths import DEFAULT_PORT
from .endpoints import LOCAL_ENGINE, Endpoint, url_problem

LOCAL_LABEL = "Local engine (this computer)"
NEW_URL = f"http://127.0.0.1:{DEFAULT_PORT}/v1"
ERROR_STYLE = "color: #b91c1c;"
OK_STYLE = "color: #047857;"


class EnginesPage(QWidget):
    test_requested = Signal(str, str)  # base URL, API key
    changed = Signal()

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        api_keys: Mapping[str, str],
        default_engine: str,
        key_place: str,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._rows: list[dict[str, str]] = [
            {**e.to_dict(), "api_key": api_keys.get(e.id, "")} for e in endpoints
        ]  # endpoints being edited, with their keys
        self._testing_url = ""
        self._build(key_place)
        self._fill_defaults(default_engine)
        self.list.setCurrentRow(0)

    def _build(self, key_place: str) -> None:
        self.list = QListWidget(objectName="engineList")
        self.list.addItem(LOCAL_LABEL)
        for row in self._rows:
            self.list.addItem(row["name"])
        self.list.currentRowChanged.connect(self._on_list_current_row_changed)
        self.add_button = QPushButton("Add server", objectName="addEngineButton")
        self.add_button.clicked.connect(self.add_endpoint)
        self.remove_button = QPushButton("Remove", objectName="removeEngineButton")
        self.remove_button.clicked.connect(self.remove_endpoint)
        self.name = QLineEdit(objectName="engineName")
        self.base_url = QLineEdit(objectName="engineBaseUrl")
        self.base_url.setPlaceholderText(NEW_URL)
        self.api_key = QLineEdit(objectName="engineApiKey")
        self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.api_key.setPlaceholderText("none")
        self.api_key.setToolTip(f"Kept in {key_place}; never in the settings file or the conversations")
        self.model = QComboBox(objectName="engineModel")
        self.model.setEditable(True)
        self.model.setToolTip("The model the server should run (Test connection lists them)")
        self.test_button = QPushButton("Test connection", objectName="engineTestButton")
        self.test_button.clicked.connect(self._on_test_button_clicked)
        self.test_result = QLabel(objectName="engineTestResult")
        self.test_result.setWordWrap(True)
        self.default_engine = QComboBox(objectName="defaultEngine")
        for field in (self.name, self.base_url, self.api_key):
            field.textEdited.connect(self._on_field_edited)
        self.model.currentTextChanged.connect(self._on_field_edited)

        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        self.form = QFormLayout()
        self.form.addRow("Name", self.name)
        self.form.addRow("Base URL", self.base_url)
        self.form.addRow("API key", self.api_key)
        self.form.addRow("Model", self.model)
        self.form.addRow("", self.test_button)
        self.form.addRow("", self.test_result)
        note = QLabel(
            f"Any OpenAI-compatible server: vLLM, llama.cpp's llama-server, Ollama, or another "
            f"computer's smallmind serve. Each tab picks its engine at its top. API keys are kept in "
            f"{key_place}, never in the settings file or the conversations."
        )
        note.setWordWrap(True)
        note.setStyleSheet("color: #6b7280;")
        layout = QVBoxLayout(self)
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)
        layout.addLayout(self.form)
        default_row = QFormLayout()
        default_row.addRow("New tabs use", self.default_engine)
        layout.addLayout(default_row)
        layout.addWidget(note)

    # -- values ---------------------------------------------------------------------------------
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints as edited (ValueError for an unusable one: see ``problems``)."""
        return tuple(
            Endpoint(r["id"], r["name"].strip(), r["base_url"].strip(), r["model"].strip())
            for r in self._rows
        )

    def api_keys(self) -> dict[str, str]:
        return {row["id"]: row["api_key"].strip() for row in self._rows}

    def default_engine_id(self) -> str:
        return str(self.default_engine.currentData() or LOCAL_ENGINE)

    def problems(self) -> list[str]:
        """What would stop the endpoints from being saved, one line each."""
        found = []
        for row in self._rows:
            name = row["name"].strip() or "(no name)"
            if not row["name"].strip():
                found.append("a server needs a name")
            elif problem := url_problem(row["base_url"]):
                found.append(f"{name}: {problem}")
        return found

    # -- editing --------------------------------------------------------------------------------
    @Slot()
    def add_endpoint(self) -> None:
        endpoint = Endpoint.new(f"Server {len(self._rows) + 1}", NEW_URL)
        self._rows.append({**endpoint.to_dict(), "api_key": ""})
        self.list.addItem(endpoint.name)
        self._fill_defaults(self.default_engine_id())
        self.list.setCurrentRow(self.list.count() - 1)
        self.name.setFocus()
        self.name.selectAll()
        self.changed.emit()

    @Slot()
    def remove_endpoint(self) -> None:
        index = self.list.currentRow() - 1
        if index < 0:
            return  # the local engine stays
        row = self._rows.pop(index)
        self.list.takeItem(index + 1)
        default = self.default_engine_id()
        self._fill_defaults(LOCAL_ENGINE if default == row["id"] else default)
        self.changed.emit()

    def _current(self) -> dict[str, str] | None:
        index = self.list.currentRow() - 1
        return self._rows[index] if 0 <= index < len(self._rows) else None

    @Slot(int)
    def _on_list_current_row_changed(self, _row: int) -> None:
        row = self._current()
        for field in (self.name, self.base_url, self.api_key, self.model, self.test_button):
            field.setEnabled(row is not None)
        self.remove_button.setEnabled(row is not None)
        values = row or {"name": "", "base_url": "", "api_key": "", "model": ""}
        self.name.setText(values["name"])
        self.base_url.setText(values["base_url"])
        self.api_key.setText(values["api_key"])
        self.model.blockSignals(True)
        self.model.clear()
        self.model.setEditText(values["model"])
        self.model.blockSignals(False)
        self.test_result.clear()

    @Slot()
    def _on_field_edited(self, *_args: Any) -> None:
        row = self._current()
        if row is None:
            return
        row.update(name=self.name.text(), base_url=self.base_url.text(), api_key=self.api_key.text(),
                   model=self.model.currentText())  # fmt: skip
        self.list.currentItem().setText(row["name"] or "(no name)")
        self._fill_defaults(self.default_engine_id())
        self.changed.emit()

    def _fill_defaults(self, current: str) -> None:
        self.default_engine.blockSignals(True)
        self.default_engine.clear()
        self.default_engine.addItem("Local engine", LOCAL_ENGINE)
        for row in self._rows:
            self.default_engine.addItem(row["name"] or "(no name)", row["id"])
        self.default_engine.setCurrentIndex(max(0, self.default_engine.findData(current)))
        self.default_engine.blockSignals(False)

    # -- test connection ------------------------------------------------------------------------
    @Slot()
    def _on_test_button_clicked(self) -> None:
        url = self.base_url.text().strip()
        problem = url_problem(url)
        if problem:
            self._show_result(problem, ok=False)
            return
        self._testing_url = url
        self.test_button.setEnabled(False)
        self._show_result(f"Asking {url} for its models…", ok=True)
        self.test_requested.emit(url, self.api_key.text().strip())

    def show_test_result(self, base_url: str, models: list[str], error: str) -> None:
        """The worker's answer: the server's models (the model box offers them), or why it failed."""
        if base_url != self._testing_url:
            return  # an answer for a test the user moved away from
        self._testing_url = ""
        self.test_button.setEnabled(self._current() is not None)
        if error:
            self._show_result(f"Not reachable: {error}", ok=False)
            return
        current = self.model.currentText().strip()
        self.model.blockSignals(True)
        self.model.clear()
        self.model.addItems(models)
        self.model.setEditText(current if current in models or not models else models[0])
        self.model.blockSignals(False)
        self._on_field_edited()
        listed = ", ".join(models[:6]) + (" …" if len(models) > 6 else "")
        self._show_result(f"Connected: {len(models)} model{'s' * (len(models) != 1)} ({listed})", ok=True)

    def _show_result(self, text: str, ok: bool) -> None:
        self.test_result.setText(text)
        self.test_result.setStyleSheet(OK_STYLE if ok else ERROR_STYLE)
