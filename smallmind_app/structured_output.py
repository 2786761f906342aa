"""Structured output in a chat: the JSON schema a tab's replies must match, and how such a reply shows.

``StructuredOutputBox`` is the Sampling dialog's "Structured output" section: a JSON schema typed or
picked from the examples, checked as it is typed (by the engine's own rule, through the worker
module), stored in the chat's sampling overrides as ``constraint = {"kind": "json_schema", "value":
<schema text>}``. The engine then generates every reply of that tab under the schema. A reply made so
is shown as highlighted JSON (``displayed_markdown``): pretty-printed in a ``json`` code block.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

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

from .theme import colors
from .worker import json_schema_problem

CONSTRAINT_KEY = "constraint"
STRUCTURED = "structured"  # a reply's stats: it was generated under the chat's schema
EXAMPLES: dict[str, dict[str, Any]] = {
    "A person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40},
                       "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "A sentiment label": {
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["sentiment"], "additionalProperties": False,
    },
}  # fmt: skip


def schema_of(overrides: Mapping[str, Any]) -> str | None:
    """The JSON schema text a chat's overrides ask for, or None."""
    constraint = overrides.get(CONSTRAINT_KEY)
    if isinstance(constraint, Mapping) and constraint.get("kind") == "json_schema":
        return str(constraint.get("value", ""))
    return None


def displayed_markdown(content: str, structured: bool) -> str:
    """What the transcript renders for a reply: a structured one as a ``json`` code block (pretty-printed
    once it parses; as it streams, as written so far)."""
    if not structured or not content.strip():
        return content
    try:
        text = json.dumps(json.loads(content), indent=2, ensure_ascii=False)
    except json.JSONDecodeError:
        text = content
    return f"```json\n{text}\n```"


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
