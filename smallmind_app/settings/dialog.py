"""The settings dialog: every KV cache, batching and sampling option, the model file, the default
system prompt. Values are checked as they are typed (by the engine's own option classes, through
``worker.engine_options.validate_settings``); an invalid value disables OK and Apply and says why. Apply takes
effect at once, without a restart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import (
    QAbstractButton,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..colors import CHOICES as THEME_CHOICES
from ..colors import colors
from ..engines.engines_page import EnginesPage
from ..models import first_run
from ..wording import (
    FIELD_NAMES,
    FIELDS,
    INT8_ACTIVATIONS_TIP,
    INT8_UNAVAILABLE,
    INT_MAX,
    MIB_RANGE,
    PAGES,
    SECTION_KEYS,
    MiB,
    mib,
    setting_problem,
)
from ..worker.engine_options import session_limits, validate_settings
from .app_settings import (
    MIN_LOADED_MODEL_BYTES,
    TEXT_SCALES,
    AppSettings,
    default_system_prompt,
    section_defaults,
)
from .field_checks import SizeField, setting_warnings

__all__ = ["FIELDS", "INT_MAX", "MIB_RANGE", "SECTION_KEYS", "MiB", "SettingsDialog"]

CHOICES = {"kvDtype": ["float32", "float16", "q8_0"], "kvPolicy": ["lru"]}
SUFFIXES = {"kvMaxBytesTotal": " MiB", "kvMaxBytesPerSession": " MiB", "batchMaxWaitMs": " ms",
            "maxTimeMs": " ms", "kvMaxDiskBytes": " MiB"}  # fmt: skip
SPECIAL = {"seed": "random", "maxTimeMs": "no limit", "cpuThreads": "auto"}  # shown at the minimum
FLAGS = {"int8Activations": ("float32", "int8")}  # a check box for a text option: (unticked, ticked)
TOOLTIPS = {"int8Activations": INT8_ACTIVATIONS_TIP}  # what a field trades (an error takes its place)


def problems_text(errors: Mapping[str, str]) -> str:
    """One line per field: the engine's message with the dialog's labels and MiB for sizes."""
    labels = {name: label for _, _, name, label, _, _ in FIELDS}
    lines = []
    for name, message in errors.items():
        label = labels.get(name, name)
        text = setting_problem(message).removeprefix(f"“{label}”").strip()
        value = re.match(r"\((.*?)\) ", text)  # "(256 MiB) must not be more than …"
        lines.append(f"{label}: {value[1]} {text[value.end() :]}" if value else f"{label}: {text}")
    return "\n".join(lines)


def make_field(name: str, kind: str, limits: tuple[float, ...]) -> QWidget:
    widget: QWidget
    if kind in ("bool", "flag"):
        widget = QCheckBox()
    elif kind == "choice":
        widget = QComboBox()
        widget.addItems(CHOICES[name])
    elif kind == "lines":
        widget = QPlainTextEdit()
        widget.setMaximumHeight(64)
    elif kind in ("int", "optional int"):
        widget = QSpinBox(minimum=int(limits[0]), maximum=int(limits[1]))
        widget.setGroupSeparatorShown(True)
        widget.setSpecialValueText(SPECIAL.get(name, ""))
    elif kind == "mib":  # typed freely: a wrong size is said in red, never cut or put back silently
        widget = SizeField(limits[0], limits[1], int(limits[2]))
        widget.setGroupSeparatorShown(True)
        widget.setSingleStep(1)
    else:
        widget = QDoubleSpinBox(minimum=limits[0], maximum=limits[1], decimals=int(limits[2]))
        widget.setGroupSeparatorShown(True)
        widget.setSingleStep(10 ** -int(limits[2]) * (5 if limits[2] >= 2 else 1))
    widget.setObjectName(name)
    if isinstance(widget, QSpinBox | QDoubleSpinBox):
        widget.setSuffix(SUFFIXES.get(name, ""))
        widget.setMinimumWidth(150)
        widget.setKeyboardTracking(True)
    return widget


def _clamped(widget: Any, value: float) -> float:
    """``value`` within the spin box's range."""
    return min(max(value, widget.minimum()), widget.maximum())


def set_field_value(widget: Any, kind: str, value: Any) -> None:
    """Show an option's value in its field (made by ``make_field``) without emitting change signals."""
    widget.blockSignals(True)
    if kind == "flag":
        widget.setChecked(value == FLAGS[widget.objectName()][1])
    elif isinstance(widget, QCheckBox):
        widget.setChecked(bool(value))
    elif isinstance(widget, QComboBox):
        widget.setCurrentText(str(value))
    elif isinstance(widget, QPlainTextEdit):
        widget.setPlainText("\n".join(value))
    elif kind == "mib":
        widget.setValue(value / MiB)
    elif kind == "optional int":
        widget.setValue(widget.minimum() if value is None else _clamped(widget, value))
    else:  # a hand-edited file may hold more than the box shows (a QSpinBox holds 32 bits)
        widget.setValue(_clamped(widget, value))
    widget.blockSignals(False)


def field_value(widget: Any, kind: str) -> Any:
    """The option value a field (made by ``make_field``) holds."""
    if kind == "flag":
        return FLAGS[widget.objectName()][widget.isChecked()]
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, QComboBox):
        return widget.currentText()
    if isinstance(widget, QPlainTextEdit):
        return [line for line in widget.toPlainText().split("\n") if line]
    value = widget.value()
    if kind == "mib":
        return round(value * MiB)
    if kind == "optional int":
        return None if value == widget.minimum() else int(value)
    return value


def changed_signal(widget: QWidget) -> Any:
    """The signal a field emits when the user changes its value."""
    if isinstance(widget, QCheckBox):
        return widget.toggled
    if isinstance(widget, QComboBox):
        return widget.currentIndexChanged
    if isinstance(widget, QPlainTextEdit):
        return widget.textChanged
    return widget.valueChanged  # type: ignore[attr-defined]


def _model_text(info: Mapping[str, Any]) -> str:
    if not info:
        return "no model loaded"
    return (
        f"{info['name']} ({info['file_name']}): {info['n_layers']} layers, "
        f"context {info['context_length']:,} tokens"
    )


class SettingsDialog(QDialog):
    settings_chosen = Signal(object)  # AppSettings, on OK or Apply
    api_keys_chosen = Signal(dict)  # endpoint id -> API key, on OK or Apply (before settings_chosen)
    disk_clear_requested = Signal()  # the KV page's Clear button: delete the saved K/V files now

    def __init__(
        self,
        settings: AppSettings,
        model_info: Mapping[str, Any] | None,
        parent: QWidget | None = None,
        api_keys: Mapping[str, str] | None = None,
        key_place: str = "the system keyring",
        kernels: Mapping[str, Any] | None = None,
    ):
        super().__init__(parent)
        self.setObjectName("settingsDialog")
        self.setWindowTitle("SmallMind settings")
        self.setMinimumWidth(560)
        self._settings = settings
        self.model_info = dict(model_info or {})
        self.fields: dict[str, tuple[str, str, str, QWidget]] = {}  # objectName -> (section, key, kind, w)
        self.errors: dict[str, str] = {}
        self.tooltips = dict(TOOLTIPS)  # objectName -> its tooltip while its value is fine
        self.kernels: dict[str, Any] = {}  # set_kernels
        self.pages = tabs = QTabWidget(objectName="settingsPages")
        tabs.addTab(self._model_page(), "Model")
        for section, title in PAGES.items():
            tabs.addTab(self._options_page(section), title)
        tabs.addTab(self._prompt_page(), "System prompt")
        self.engines_page = EnginesPage(settings.engines, api_keys or {}, settings.default_engine, key_place)
        self.engines_page.changed.connect(self._revalidate)
        tabs.addTab(self.engines_page, "Engines")
        tabs.addTab(self._appearance_page(), "Appearance")
        self.error_label = QLabel(objectName="settingsError")
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(f"color: {colors()['error_text']};")
        self.warning_label = QLabel(objectName="settingsWarning")  # allowed, but probably not meant
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet(f"color: {colors()['notice_text']};")
        self.warning_label.setVisible(False)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Apply
            | QDialogButtonBox.StandardButton.Cancel | QDialogButtonBox.StandardButton.RestoreDefaults
        )  # fmt: skip
        self.buttons = buttons
        self.ok_button = buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.apply_button = buttons.button(QDialogButtonBox.StandardButton.Apply)
        self.restore_button = buttons.button(QDialogButtonBox.StandardButton.RestoreDefaults)
        self.ok_button.setObjectName("okButton")
        self.apply_button.setObjectName("applyButton")
        self.restore_button.setObjectName("restoreDefaultsButton")
        buttons.clicked.connect(self._on_buttons_clicked)
        layout = QVBoxLayout(self)
        layout.addWidget(tabs)
        layout.addWidget(self.error_label)
        layout.addWidget(self.warning_label)
        layout.addWidget(buttons)
        self.load(settings)
        self.set_kernels(kernels or {})

    # -- pages ----------------------------------------------------------------------------------
    def _model_page(self) -> QWidget:
        page = QWidget()
        form = QFormLayout(page)
        self.model_path = QLineEdit(objectName="modelPath")
        self.model_path.setPlaceholderText("the default model (SmolLM2-135M-Instruct)")
        browse = QPushButton("Browse…", objectName="browseModelButton")
        browse.clicked.connect(self._on_browse_clicked)
        row = QHBoxLayout()
        row.addWidget(self.model_path, 1)
        row.addWidget(browse)
        form.addRow("Model file (GGUF)", row)
        self.model_label = QLabel(_model_text(self.model_info), objectName="loadedModel")
        self.model_label.setWordWrap(True)
        form.addRow("Loaded", self.model_label)
        self.bytes_per_token = QLabel(objectName="bytesPerToken")
        self.token_limit = QLabel(objectName="effectiveTokenLimit")
        self.token_limit.setWordWrap(True)
        form.addRow("KV bytes per token", self.bytes_per_token)
        form.addRow("Tokens per session", self.token_limit)
        self.max_loaded = QSpinBox(
            objectName="maxLoadedModelBytes", minimum=0, maximum=1 << 20, singleStep=256
        )
        self.max_loaded.setSuffix(" MiB")
        self.max_loaded.setSpecialValueText("half the memory")
        self.max_loaded.setToolTip(
            "Models stay loaded while their weights fit this; to load another, the least recently used "
            "idle model is unloaded first (never one that is answering)"
        )
        self.max_loaded.valueChanged.connect(self._revalidate)
        form.addRow("Loaded models: memory limit", self.max_loaded)
        self.idle_ttl = QSpinBox(objectName="modelIdleTtl", minimum=0, maximum=30 * 24 * 60, singleStep=5)
        self.idle_ttl.setSuffix(" min")
        self.idle_ttl.setSpecialValueText("never (only to make room)")
        self.idle_ttl.setToolTip("A model no tab or API request used for this long is unloaded")
        form.addRow("Unload a model unused for", self.idle_ttl)
        note = QLabel("A new model file is loaded when you press Apply or OK; conversations stay open.")
        note.setWordWrap(True)
        note.setStyleSheet(f"color: {colors()['muted']};")
        form.addRow("", note)
        return page

    def _options_page(self, section: str) -> QWidget:
        page = QWidget()
        form = QFormLayout(page)
        for sec, key, name, label, kind, limits in FIELDS:
            if sec != section:
                continue
            widget = make_field(name, kind, limits)
            self.fields[name] = (sec, key, kind, widget)
            if kind in ("bool", "flag"):
                assert isinstance(widget, QCheckBox)
                widget.setText(label)
                form.addRow("", widget)
                widget.toggled.connect(self._revalidate)
                if name == "int8Activations":
                    form.addRow("", self._int8_note())
            else:
                form.addRow(label, widget)
                changed_signal(widget).connect(self._revalidate)
                if isinstance(widget, SizeField):  # text that is not a size leaves the value as it was
                    widget.lineEdit().textChanged.connect(self._revalidate)
        if section == "kv":
            form.addRow("Saved on disk", self._disk_row())
        return page

    def _int8_note(self) -> QLabel:
        """Why the 8-bit activations cannot be chosen here (shown only then: ``set_kernels``)."""
        self.int8_note = QLabel(objectName="int8ActivationsNote")
        self.int8_note.setWordWrap(True)
        self.int8_note.setStyleSheet(f"color: {colors()['muted']};")
        self.int8_note.setVisible(False)
        return self.int8_note

    def set_kernels(self, facts: Mapping[str, Any]) -> None:
        """The worker's facts of the kernels (``LocalEngine.kernels_info``): without ``int8_available``
        the 8-bit activations are disabled, the note below them says why (unknown facts: enabled)."""
        self.kernels = dict(facts)
        widget = self.fields["int8Activations"][3]
        available = bool(facts.get("int8_available", True))
        widget.setEnabled(available)
        why = "" if available else INT8_UNAVAILABLE.get(str(facts.get("path")), INT8_UNAVAILABLE["numba"])
        self.int8_note.setText(why)
        self.int8_note.setVisible(bool(why))
        self.tooltips["int8Activations"] = INT8_ACTIVATIONS_TIP + (f"\n\n{why}" if why else "")
        self._revalidate()

    def _disk_row(self) -> QHBoxLayout:
        """The disk tier's usage and its Clear button (it deletes the files at once, no Apply needed)."""
        self.disk_usage = QLabel("–", objectName="kvDiskUsage")
        self.disk_usage.setWordWrap(True)
        clear = QPushButton("Clear", objectName="kvDiskClear")
        clear.setToolTip("Delete the K/V of every conversation saved on disk (the conversations stay)")
        clear.clicked.connect(self._on_disk_clear_clicked)
        row = QHBoxLayout()
        row.addWidget(self.disk_usage, 1)
        row.addWidget(clear)
        return row

    @Slot()
    def _on_disk_clear_clicked(self) -> None:
        self.disk_clear_requested.emit()
        self.disk_usage.setText("cleared")

    def set_disk_usage(self, n_sessions: int, n_bytes: int) -> None:
        """What the disk tier holds now (the window passes the worker's stats on)."""
        self.disk_usage.setText(f"{n_sessions:,} conversation{'s' * (n_sessions != 1)}, {mib(n_bytes)}")

    def _prompt_page(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.addWidget(QLabel("The system prompt of new conversations (each tab can change its own):"))
        self.system_prompt = QPlainTextEdit(objectName="defaultSystemPrompt")
        self.system_prompt.setPlaceholderText(
            "None: each model's own (the one its chat template writes, if any; a base model has none)"
        )
        layout.addWidget(self.system_prompt)
        return page

    def _appearance_page(self) -> QWidget:
        page = QWidget()
        form = QFormLayout(page)
        self.theme_combo = QComboBox(objectName="themeSetting")
        for value, label in THEME_CHOICES.items():
            self.theme_combo.addItem(label, value)
        self.theme_combo.setToolTip("Follow system: dark when your desktop uses a dark color scheme")
        form.addRow("Theme", self.theme_combo)
        low, high = TEXT_SCALES
        self.text_scale = QSpinBox(objectName="textScaleSetting", minimum=low, maximum=high)
        self.text_scale.setSingleStep(10)
        self.text_scale.setSuffix(" %")
        self.text_scale.setToolTip("The size of the window's text: 100 % is your system's font size")
        form.addRow("Text size", self.text_scale)
        return page

    # -- values ---------------------------------------------------------------------------------
    def load(self, settings: AppSettings) -> None:
        for section, key, kind, widget in self.fields.values():
            set_field_value(widget, kind, getattr(settings, SECTION_KEYS[section])[key])
        self.model_path.setText(settings.model_path or "")
        self.max_loaded.setValue(round((settings.max_loaded_model_bytes or 0) / MiB))
        self.idle_ttl.setValue(round(settings.model_idle_ttl_s / 60))
        self.system_prompt.setPlainText(settings.system_prompt)
        self.theme_combo.setCurrentIndex(max(0, self.theme_combo.findData(settings.theme)))
        self.text_scale.setValue(settings.text_scale)
        self._revalidate()

    def _value(self, name: str) -> Any:
        _, _, kind, widget = self.fields[name]
        return field_value(widget, kind)

    def sections(self) -> dict[str, dict[str, Any]]:
        values: dict[str, dict[str, Any]] = {"kv": {}, "batching": {}, "sampling": {}}
        for name, (section, key, _, _) in self.fields.items():
            values[section][key] = self._value(name)
        return values

    def chosen_settings(self) -> AppSettings:
        values = self.sections()
        return self._settings.with_changes(
            model_path=self.model_path.text().strip() or None,
            system_prompt=self.system_prompt.toPlainText(),
            max_loaded_model_bytes=self.max_loaded.value() * MiB or None,
            model_idle_ttl_s=float(self.idle_ttl.value() * 60),
            theme=self.theme_combo.currentData(), text_scale=self.text_scale.value(),
            kv_cache=values["kv"], batching=values["batching"], sampling=values["sampling"],
            engines=self.engines_page.endpoints(), default_engine=self.engines_page.default_engine_id(),
        )  # fmt: skip

    # -- validation -----------------------------------------------------------------------------
    @Slot()
    def _revalidate(self) -> None:
        values = self.sections()
        problems = validate_settings(values["kv"], values["batching"], values["sampling"])
        by_key = {f"{sec}.{key}": name for name, (sec, key, _, _) in self.fields.items()}
        self.errors = {by_key.get(key, key): message for key, message in problems.items()}
        for name, (_, _, _, widget) in self.fields.items():
            if isinstance(widget, SizeField) and (typed := widget.problem()):
                self.errors[name] = typed  # what was typed, not the last size the box held
        self._show_limits(values["kv"])
        warning = setting_warnings(values, self.model_info, self.errors)
        self.warning_label.setText(warning)
        self.warning_label.setVisible(bool(warning))
        if engine_problems := self.engines_page.problems():
            self.errors["Engines"] = "; ".join(engine_problems)
        if 0 < self.max_loaded.value() * MiB < MIN_LOADED_MODEL_BYTES:
            self.errors["maxLoadedModelBytes"] = (
                f"at least {MIN_LOADED_MODEL_BYTES // MiB} MiB (0: half the memory)"
            )
        for name, (_, _, _, widget) in self.fields.items():
            widget.setStyleSheet(
                f"background-color: {colors()['error_field']};" if name in self.errors else ""
            )
            widget.setToolTip(self.errors.get(name) or self.tooltips.get(name, ""))
        self.error_label.setText(problems_text(self.errors))
        self.error_label.setVisible(bool(self.errors))
        self.ok_button.setEnabled(not self.errors)
        self.apply_button.setEnabled(not self.errors)

    def _show_limits(self, kv: dict[str, Any]) -> None:
        if not self.model_info:
            self.bytes_per_token.setText("(load a model to see)")
            self.token_limit.setText("(load a model to see)")
            return
        tokens, per_token = session_limits(kv, self.model_info)
        self.bytes_per_token.setText(f"{per_token:,} bytes ({kv.get('dtype')})")
        self.token_limit.setText(
            f"{tokens:,} tokens (the smallest of max tokens per session, the memory limit per session "
            f"÷ bytes per token, and the model's context of {self.model_info['context_length']:,})"
        )
        by_bytes = int(kv.get("max_bytes_per_session", 0)) // per_token
        if by_bytes < 1 and "kvMaxBytesPerSession" not in self.errors and kv.get("enabled", True):
            self.errors["kvMaxBytesPerSession"] = (
                f"smaller than one token of K/V ({mib(per_token)} for this model)"
            )

    # -- buttons --------------------------------------------------------------------------------
    @Slot(QAbstractButton)
    def _on_buttons_clicked(self, button: QAbstractButton) -> None:
        if button is self.restore_button:
            self.restore_defaults()
        elif button is self.apply_button:
            self.apply()
        elif button is self.ok_button:
            if self.apply():
                self.accept()
        else:
            self.reject()

    def apply(self) -> bool:
        self._revalidate()
        if self.errors:
            return False
        self._settings = self.chosen_settings()
        self.api_keys_chosen.emit(self.engines_page.api_keys())
        self.settings_chosen.emit(self._settings)
        return True

    def restore_defaults(self) -> None:
        """Every option and the default system prompt back to their defaults (the model file stays)."""
        defaults = AppSettings(
            model_path=self.model_path.text().strip() or None,
            system_prompt=default_system_prompt(),
            kv_cache=dict(section_defaults("kv_cache")),
            batching=dict(section_defaults("batching")),
            sampling=dict(section_defaults("sampling")),
        )
        self.load(defaults)

    @Slot()
    def _on_browse_clicked(self) -> None:
        path = first_run.choose_model_file(self)
        if path:
            self.model_path.setText(path)

    def show_setting(self, setting: str) -> None:
        """Turn to the page of ``setting`` ("kv_cache.max_bytes_total") and put the cursor in its field."""
        name = FIELD_NAMES.get(setting)
        if name is None:
            return
        section, _, _, widget = self.fields[name]
        self.pages.setCurrentIndex(list(PAGES).index(section) + 1)  # page 0 is the model
        widget.setFocus()
        if isinstance(widget, QSpinBox | QDoubleSpinBox):
            widget.selectAll()

    def set_model_info(self, info: Mapping[str, Any]) -> None:
        self.model_info = dict(info)
        self.model_label.setText(_model_text(self.model_info))
        self._revalidate()
