"""The loaded model as the window shows it: the status bar (model, tokens per tab, load progress,
tabs generating), the window title, and the first-run dialog when no model is found. ``info`` is
the worker's ``model_info`` of the model running (empty before the first one loads); ``kernels`` its
facts of the kernels (``LocalEngine.kernels_info``: whether 8-bit activations can run here), sent
with every settings change, the first at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Slot
from PySide6.QtWidgets import QLabel, QProgressBar

from ..elided import ElidedLabel
from ..models.first_run import FirstRunDialog
from ..wording import tab_limit_lowered
from ..worker.downloads import default_model_description

if TYPE_CHECKING:
    from .main_window import MainWindow


class ModelStatus(QObject):
    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.info: dict[str, Any] = {}
        self.kernels: dict[str, Any] = {}
        self._build()

    def _build(self) -> None:
        self.label = ElidedLabel("No model loaded", objectName="modelStatus")  # a long name ends in "…"
        self.busy_label = QLabel(objectName="busyStatus")
        self.load_bar = QProgressBar(objectName="modelLoadProgress", maximumWidth=160, maximumHeight=14)
        self.load_bar.setRange(0, 0)
        self.load_bar.setVisible(False)
        bar = self.window.statusBar()
        bar.addWidget(self.label)
        bar.addWidget(self.load_bar)
        bar.addPermanentWidget(self.busy_label)

    @Slot(str, str)
    def show_loading(self, path: str, note: str) -> None:
        self.label.setText(f"Loading {Path(path).name}…" + (f" ({note})" if note else ""))
        self.load_bar.setVisible(True)

    @Slot(dict)
    def show_loaded(self, info: dict) -> None:
        self.info = dict(info)
        self.load_bar.setVisible(False)
        name = Path(info["file_name"]).stem
        self._show_label()
        self.label.setToolTip(f"{info['name']}\n{info['path']}")  # after the label's whole text when cut
        self.window.setWindowTitle(f"SmallMind — {name}")
        if self.window.settings_dialog is not None:
            self.window.settings_dialog.set_model_info(info)
        if self.window.models_dialog is not None:
            self.window.models_dialog.show_load_result(f"Running {info['file_name']}.")
        self.window.dialogs.refresh_models()
        self.window.refresh_engine_choices()  # the local engine's entry names the model
        restored = [tab.conversation_id for tab in self.window.chat_tabs]
        self.window.client.prefetch_sessions(restored)  # their K/V files start coming in

    @Slot(str, str)
    def show_load_failed(self, path: str, reason: str) -> None:
        self.load_bar.setVisible(False)
        if not self.info:
            self.label.setText("No model loaded")
        if self.window.models_dialog is not None:
            self.window.models_dialog.show_load_result(
                f"Could not load {Path(path).name}: {reason}", error=True
            )
        self.window.dialogs.refresh_models()
        self.window.show_error(
            "Cannot load the model",
            f"The model file {path} cannot be used:\n\n{reason}",
            name="modelErrorDialog",
        )

    @Slot(str)
    def show_missing(self, message: str) -> None:
        self.label.setText("No model loaded")
        reason = message.split(" Run `")[0]  # the command-line hints do not apply here
        dialog = FirstRunDialog(default_model_description(), reason, self.window)
        dialog.download_requested.connect(self.window.client.start_download)
        dialog.download_cancel_requested.connect(self.window.client.cancel_download)
        dialog.model_file_chosen.connect(self.window.use_model_file)
        self.window.dialogs.first_run_dialog = dialog
        dialog.open()

    def _show_label(self) -> None:
        info = self.info
        base = " · base model: it continues your text, it was not trained to follow instructions"
        self.label.setText(
            f"{Path(info['file_name']).stem} · {info['n_layers']} layers · "
            f"context {info['context_length']:,} · {info['session_token_limit']:,} tokens per tab"
            + (base if info.get("base_model") else "")
        )

    @Slot(dict)
    def show_applied(self, applied: dict) -> None:
        """The status bar shows the new limit at once; a lower one is said (longer chats get trimmed)."""
        if "kernels" in applied:
            self.kernels = dict(applied["kernels"])
            if self.window.settings_dialog is not None:
                self.window.settings_dialog.set_kernels(self.kernels)
        if not self.info or "session_token_limit" not in applied:
            return
        old, new = self.info["session_token_limit"], applied["session_token_limit"]
        self.info.update(session_token_limit=new, bytes_per_token=applied["bytes_per_token"])
        self._show_label()
        if self.window.settings_dialog is not None:
            self.window.settings_dialog.set_model_info(self.info)
        if new < old:
            setting = str(applied.get("limit_setting") or "")
            self.window.statusBar().showMessage(tab_limit_lowered(new, old, setting), 20_000)

    def update_busy(self) -> None:
        n = sum(tab.is_generating for tab in self.window.tabs.chat_tabs)
        self.busy_label.setText(f"{n} tab{'s' * (n != 1)} generating" if n else "")
