"""One conversation's own sampling settings: each option either follows the app's default (Settings →
Sampling) or has this chat's own value. The overrides are saved with the conversation and used for
every reply of its tab; the options are checked by the engine as they are typed, as in the settings
dialog.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import (
    QAbstractButton,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QGridLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from ..colors import colors
from ..settings.dialog import FIELDS, changed_signal, field_value, make_field, problems_text, set_field_value
from ..worker.engine_options import validate_settings
from .structured_output import CONSTRAINT_KEY, schema_of
from .structured_output_box import StructuredOutputBox

SAMPLING_FIELDS = [(key, name, label, kind, limits) for sec, key, name, label, kind, limits in FIELDS
                   if sec == "sampling"]  # fmt: skip


class ChatSettingsDialog(QDialog):
    """Per-conversation overrides of the sampling settings; emits the new overrides on OK."""

    overrides_chosen = Signal(dict)  # {option name: value}, only the options this chat sets itself

    def __init__(
        self,
        title: str,
        defaults: Mapping[str, Any],
        overrides: Mapping[str, Any],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setObjectName("chatSettingsDialog")
        self.setWindowTitle(f"Chat settings: {title}")
        self.setMinimumWidth(520)
        self.defaults = dict(defaults)
        self.errors: dict[str, str] = {}
        # key -> (kind, "own value" check box, field)
        self.fields: dict[str, tuple[str, QCheckBox, QWidget]] = {}
        intro = QLabel(
            "Sampling for this conversation only. Options left unticked follow the app's settings "
            "(Tools → Settings → Sampling) and change with them."
        )
        intro.setWordWrap(True)
        grid = QGridLayout()
        grid.addWidget(QLabel("<b>Own value</b>"), 0, 1)
        for row, (key, name, label, kind, limits) in enumerate(SAMPLING_FIELDS, start=1):
            widget = make_field(name, kind, limits)
            own = QCheckBox(objectName=f"{name}Own")
            own.setToolTip(f"Give this chat its own {label.lower()}")
            own.setAccessibleName(f"Own {label.lower()}")
            if kind == "bool":
                assert isinstance(widget, QCheckBox)
                widget.setText(label)
                grid.addWidget(widget, row, 2)
            else:
                grid.addWidget(QLabel(label), row, 0)
                grid.addWidget(widget, row, 2)
            grid.addWidget(own, row, 1)
            self.fields[key] = (kind, own, widget)
            own.toggled.connect(lambda checked, k=key: self._on_own_toggled(k, checked))
            changed_signal(widget).connect(self._revalidate)
        grid.setColumnStretch(2, 1)
        self.structured = StructuredOutputBox()  # the JSON schema replies must match (own value only)
        self.structured.changed.connect(self._revalidate)
        self.error_label = QLabel(objectName="chatSettingsError")
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(f"color: {colors()['error_text']};")
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
            | QDialogButtonBox.StandardButton.RestoreDefaults
        )  # fmt: skip
        self.ok_button = buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.ok_button.setObjectName("okButton")
        self.restore_button = buttons.button(QDialogButtonBox.StandardButton.RestoreDefaults)
        self.restore_button.setObjectName("restoreDefaultsButton")
        self.restore_button.setText("Use app settings for all")
        buttons.clicked.connect(self._on_buttons_clicked)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(grid)
        layout.addWidget(self.structured)
        layout.addWidget(self.error_label)
        layout.addWidget(buttons)
        self.load(overrides)

    # -- values ---------------------------------------------------------------------------------
    def load(self, overrides: Mapping[str, Any]) -> None:
        """Tick and fill the options in ``overrides``; the others show the app's value, greyed."""
        for key, (kind, own, widget) in self.fields.items():
            mine = key in overrides
            own.blockSignals(True)
            own.setChecked(mine)
            own.blockSignals(False)
            set_field_value(widget, kind, overrides[key] if mine else self.defaults.get(key))
            widget.setEnabled(mine)
        self.structured.set_value(schema_of(overrides))
        self._revalidate()

    def overrides(self) -> dict[str, Any]:
        """The options this chat sets itself, with the values in their fields."""
        chosen = {key: (kind, widget) for key, (kind, own, widget) in self.fields.items() if own.isChecked()}
        values = {key: field_value(widget, kind) for key, (kind, widget) in chosen.items()}
        constraint = self.structured.value()
        return values if constraint is None else {**values, CONSTRAINT_KEY: constraint}

    def effective(self) -> dict[str, Any]:
        """What a reply of this chat would use: the app's settings with this chat's values over them."""
        return {**self.defaults, **self.overrides()}

    @Slot()
    def _on_own_toggled(self, key: str, checked: bool) -> None:
        kind, _, widget = self.fields[key]
        widget.setEnabled(checked)
        if not checked:  # back to following the app: show the value it will use
            set_field_value(widget, kind, self.defaults.get(key))
        self._revalidate()

    @Slot()
    def _revalidate(self) -> None:
        problems = validate_settings({}, {}, self.effective())
        self.errors = {key.split(".", 1)[1]: message for key, message in problems.items()}
        if self.structured.problem:
            self.errors[CONSTRAINT_KEY] = self.structured.problem
        for key, (_, _, widget) in self.fields.items():
            widget.setStyleSheet(
                f"background-color: {colors()['error_field']};" if key in self.errors else ""
            )
            widget.setToolTip(self.errors.get(key, ""))
        names = {key: name for key, name, *_ in SAMPLING_FIELDS} | {CONSTRAINT_KEY: "Structured output"}
        self.error_label.setText(problems_text({names.get(k, k): m for k, m in self.errors.items()}))
        self.error_label.setVisible(bool(self.errors))
        self.ok_button.setEnabled(not self.errors)

    # -- buttons --------------------------------------------------------------------------------
    @Slot(QAbstractButton)
    def _on_buttons_clicked(self, button: QAbstractButton) -> None:
        if button is self.restore_button:
            self.load({})
        elif button is self.ok_button:
            self._revalidate()
            if not self.errors:
                self.overrides_chosen.emit(self.overrides())
                self.accept()
        else:
            self.reject()
