"""Tools → Local server…: start and stop the OpenAI-compatible API server, see its address.

A view only: it emits ``start_requested(port, api_key)`` / ``stop_requested()`` and shows what its
owner reports back with ``show_running(url)`` / ``show_stopped(message)``; it never touches the
engine or the server itself. The address label, a copyable ``curl`` example and the settings
(port, key) are what the user sees; the owner saves them.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..worker.api_server import DEFAULT_PORT


def curl_example(url: str, api_key: str = "") -> str:
    auth = f' \\\n  -H "Authorization: Bearer {api_key}"' if api_key else ""
    return (
        f"curl {url}/v1/chat/completions{auth} \\\n"
        '  -H "Content-Type: application/json" \\\n'
        '  -d \'{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 60}\''
    )


class LocalServerDialog(QDialog):
    """The local API server's switch, port, key and address."""

    start_requested = Signal(int, str)  # port, API key ("" = none; the server binds 127.0.0.1)
    stop_requested = Signal()

    def __init__(self, port: int = DEFAULT_PORT, api_key: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("localServerDialog")
        self.setWindowTitle("Local server")
        self.setMinimumWidth(520)
        intro = QLabel(
            "Serve the model over an OpenAI-compatible API on this computer (127.0.0.1), so other "
            "programs can use it. Their requests are batched with your tabs."
        )
        intro.setWordWrap(True)
        self.enabled = QCheckBox("Running", objectName="serverEnabled")
        self.port = QSpinBox(objectName="serverPort", minimum=1024, maximum=65_535, value=port)
        self.api_key = QLineEdit(api_key, objectName="serverApiKey", placeholderText="none (local use only)")
        self.api_key.setEchoMode(QLineEdit.EchoMode.PasswordEchoOnEdit)
        self.address = QLabel("not running", objectName="serverAddress")
        self.address.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.example = QPlainTextEdit(objectName="serverCurlExample", readOnly=True)
        self.example.setMaximumHeight(90)
        copy = QPushButton("Copy", objectName="serverCopyExample")
        copy.clicked.connect(self._copy_example)
        form = QFormLayout()
        form.addRow("Server", self.enabled)
        form.addRow("Port", self.port)
        form.addRow("API key", self.api_key)
        form.addRow("Address", self.address)
        example_row = QHBoxLayout()
        example_row.addWidget(self.example)
        example_row.addWidget(copy)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(QLabel("Try it:"))
        layout.addLayout(example_row)
        layout.addWidget(buttons)
        self.enabled.toggled.connect(self._on_enabled_toggled)
        self.show_stopped()

    @Slot(bool)
    def _on_enabled_toggled(self, checked: bool) -> None:
        if checked:
            self.port.setEnabled(False)
            self.api_key.setEnabled(False)
            self.address.setText("starting…")
            self.start_requested.emit(self.port.value(), self.api_key.text().strip())
        else:
            self.stop_requested.emit()

    @Slot(str)
    def show_running(self, url: str) -> None:
        """The server answers at ``url`` (base URL, without /v1)."""
        self._set_checked(True)
        self.port.setEnabled(False)
        self.api_key.setEnabled(False)
        self.address.setText(f"{url}/v1")
        self.example.setPlainText(curl_example(url, self.api_key.text().strip()))

    @Slot(str)
    def show_stopped(self, message: str = "") -> None:
        """Not serving; ``message`` says why when starting failed."""
        self._set_checked(False)
        self.port.setEnabled(True)
        self.api_key.setEnabled(True)
        self.address.setText(message or "not running")
        self.example.setPlainText(curl_example(f"http://127.0.0.1:{self.port.value()}", self.api_key.text()))

    def _set_checked(self, checked: bool) -> None:
        blocked = self.enabled.blockSignals(True)
        self.enabled.setChecked(checked)
        self.enabled.blockSignals(blocked)

    @Slot()
    def _copy_example(self) -> None:
        QGuiApplication.clipboard().setText(self.example.toPlainText())
