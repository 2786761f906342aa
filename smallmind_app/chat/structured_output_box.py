"""The Sampling dialog's "Structured output" section: a JSON schema typed or picked from the
examples, checked as it is typed (by the engine's own rule, through the worker's Qt-free options
module), given to the chat as its ``constraint`` override (``structured_output.py``).
"""

from __future__ import annotations

import json

from PySide6.QtCore import Signal, Slot
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QVBoxLayout,
)

from ..colors import colors
from ..worker.engine_options import json_schema_problem
from .structured_output import EXAMPLES


class StructuredOutputBox(QGroupBox):
    """The "Structured output" section: an own-value check box, the schema editor, examples, status."""

    changed = Signal()

    def __init__(self) -> None:
        super().__init__("Structured output")
        self.setObjectName("structuredOutputBox")
        self.own = QCheckBox("Answer in JSON that matches this schema", objectName="structuredOwn")
        self.examples = QComboBox(objectName="schemaExamples")
        self.examples.addItems(["Examples…", *EXAMPLES])
        self.examples.setToolTip("Fill the editor with an example schema")
        self.editor = QPlainTextEdit(objectName="schemaEdit")
        self.editor.setPlaceholderText('{"type": "object", "properties": {"answer": {"type": "string"}}}')
        self.editor.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.editor.setMinimumHeight(120)
        self.editor.setAccessibleName("JSON schema")
        self.status = QLabel(objectName="schemaStatus")
        self.status.setWordWrap(True)
        top = QHBoxLayout()
        top.addWidget(self.own, 1)
        top.addWidget(self.examples)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.editor)
        layout.addWidget(self.status)
        self.problem = ""
        self.own.toggled.connect(self._on_own_toggled)
        self.examples.activated.connect(self._on_examples_activated)
        self.editor.textChanged.connect(self._check)
        self.set_value(None)

    # -- values -------------------------------------------------------------------------------
    def set_value(self, schema: str | None) -> None:
        """Show ``schema`` (ticked) or nothing (unticked)."""
        self.own.blockSignals(True)
        self.own.setChecked(schema is not None)
        self.own.blockSignals(False)
        self.editor.setPlainText(schema or "")
        self._on_own_toggled(schema is not None)

    def value(self) -> dict[str, str] | None:
        """The chat's ``constraint`` override, or None when the box is unticked."""
        if not self.own.isChecked():
            return None
        return {"kind": "json_schema", "value": self.editor.toPlainText()}

    # -- slots --------------------------------------------------------------------------------
    @Slot(bool)
    def _on_own_toggled(self, checked: bool) -> None:
        self.editor.setEnabled(checked)
        self.examples.setEnabled(checked)
        self._check()

    @Slot(int)
    def _on_examples_activated(self, index: int) -> None:
        name = self.examples.itemText(index)
        if name in EXAMPLES:
            self.editor.setPlainText(json.dumps(EXAMPLES[name], indent=2))
        self.examples.setCurrentIndex(0)

    @Slot()
    def _check(self) -> None:
        """Check the schema as it is typed: JSON, a schema, one the engine can enforce."""
        if not self.own.isChecked():
            self.problem = ""
            self.status.setText("Replies are free text.")
            self.status.setStyleSheet("")
        else:
            text = self.editor.toPlainText()
            self.problem = (
                json_schema_problem(text) if text.strip() else "Write a JSON schema, or pick an example."
            )
            self.status.setText(self.problem or "✓ A valid schema: every reply of this chat will match it.")
            self.status.setStyleSheet(f"color: {colors()['error_text']};" if self.problem else "")
        self.changed.emit()
