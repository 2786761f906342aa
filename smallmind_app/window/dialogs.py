"""The main window's dialogs, one of each at most: Settings, a chat's sampling, Models, Local server
(and the first-run dialog, made when no model is found). Each is made when first opened, wired to
the window and the engine client, and forgotten when closed; the router sends the worker's answers
to whichever is open.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Slot

from ..chat.chat_settings_dialog import ChatSettingsDialog
from ..chat.tab import ChatTab
from ..models.first_run import FirstRunDialog
from ..models.models_dialog import ModelsDialog
from ..server.server_dialog import LocalServerDialog
from ..settings.dialog import SettingsDialog

if TYPE_CHECKING:
    from .main_window import MainWindow


class WindowDialogs(QObject):
    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.first_run_dialog: FirstRunDialog | None = None
        self.settings_dialog: SettingsDialog | None = None
        self.chat_settings_dialog: ChatSettingsDialog | None = None
        self.models_dialog: ModelsDialog | None = None
        self.server_dialog: LocalServerDialog | None = None

    @Slot()
    def open_local_server(self) -> LocalServerDialog:
        """Tools → Local server…: serve the loaded model over the OpenAI-compatible API (the worker
        runs the server on its engine, so API requests are batched with the tabs)."""
        if self.server_dialog is None:
            dialog = LocalServerDialog(port=self.window.settings.server_port, parent=self.window)
            dialog.start_requested.connect(self._on_server_dialog_start_requested)
            dialog.stop_requested.connect(self.window.client.stop_server)
            self.server_dialog = dialog
        self.server_dialog.open()
        return self.server_dialog

    @Slot(int, str)
    def _on_server_dialog_start_requested(self, port: int, api_key: str) -> None:
        """Start the server and remember its port (the key is not saved: it is asked each time)."""
        if port != self.window.settings.server_port:
            self.window.save_settings(self.window.settings.with_changes(server_port=port))
        self.window.client.start_server(port, api_key)

    @Slot()
    def open_models(self) -> ModelsDialog:
        """Tools → Models…: the catalog and the GGUF files at hand (listed by the worker)."""
        if self.models_dialog is None:
            dialog = ModelsDialog(self.window)
            dialog.refresh_requested.connect(self.refresh_models)
            dialog.download_requested.connect(self.window.client.start_download)
            dialog.download_cancel_requested.connect(self.window.client.cancel_download)
            dialog.load_requested.connect(self.window.use_model_file)
            dialog.finished.connect(self._on_models_dialog_finished)
            self.models_dialog = dialog
        self.refresh_models()
        self.models_dialog.open()
        return self.models_dialog

    @Slot()
    def refresh_models(self) -> None:
        if self.models_dialog is not None:
            self.window.client.list_models(
                [self.window.settings.model_path] if self.window.settings.model_path else []
            )

    @Slot(int)
    def _on_models_dialog_finished(self, _result: int) -> None:
        if self.models_dialog is not None:
            self.models_dialog.deleteLater()
            self.models_dialog = None

    @Slot(str)
    def open_settings(self, setting: str = "") -> SettingsDialog:
        """The settings dialog; ``setting`` ("kv_cache.max_bytes_total") opens it at that field."""
        if self.settings_dialog is None:
            keys = {e.id: self.window.api_keys.get(e.id) for e in self.window.settings.engines}
            dialog = SettingsDialog(
                self.window.settings, self.window.model_info, self.window, keys, self.window.api_keys.where,
                kernels=self.window.model_status.kernels,
            )  # fmt: skip
            dialog.api_keys_chosen.connect(self._on_settings_dialog_api_keys_chosen)
            dialog.engines_page.test_requested.connect(self.window.client.test_endpoint)
            dialog.settings_chosen.connect(self.window.apply_settings)
            dialog.disk_clear_requested.connect(self.window.client.clear_disk_cache)
            dialog.finished.connect(self._on_settings_dialog_finished)
            self.settings_dialog = dialog
        self.settings_dialog.open()
        if setting:
            self.settings_dialog.show_setting(setting)
        return self.settings_dialog

    @Slot()
    def open_current_chat_settings(self) -> None:
        tab = self.window.tabs.currentWidget()
        if isinstance(tab, ChatTab):
            self.open_chat_settings(tab.conversation_id)

    @Slot(str)
    def open_chat_settings(self, conversation_id: str) -> ChatSettingsDialog | None:
        """The dialog of one conversation's own sampling settings (used from its next reply on)."""
        tab = self.window.tabs.tab_for(conversation_id)
        if tab is None:
            return None
        if self.chat_settings_dialog is not None:
            self.chat_settings_dialog.reject()
        dialog = ChatSettingsDialog(
            tab.title, self.window.settings.sampling, tab.sampling_overrides, self.window
        )
        dialog.overrides_chosen.connect(functools.partial(self._set_chat_overrides, conversation_id))
        dialog.finished.connect(self._on_chat_settings_dialog_finished)
        self.chat_settings_dialog = dialog
        dialog.open()
        return dialog

    def _set_chat_overrides(self, conversation_id: str, overrides: dict) -> None:
        tab = self.window.tabs.tab_for(
            conversation_id
        )  # the tab may have been closed while the dialog was open
        if tab is not None:
            tab.set_sampling_overrides(overrides)

    @Slot(int)
    def _on_chat_settings_dialog_finished(self, _result: int) -> None:
        if self.chat_settings_dialog is not None:
            self.chat_settings_dialog.deleteLater()
            self.chat_settings_dialog = None

    @Slot(int)
    def _on_settings_dialog_finished(self, _result: int) -> None:
        if self.settings_dialog is not None:
            self.settings_dialog.deleteLater()
            self.settings_dialog = None

    @Slot(dict)
    def _on_settings_dialog_api_keys_chosen(self, keys: dict) -> None:
        """Keep the endpoints' keys (keyring or the 0600 file) and forget those of removed endpoints."""
        for error in self.window.engine_keys.choose(keys, (e.id for e in self.window.settings.engines)):
            where = self.window.api_keys.where
            self.window.show_error("API key not saved", f"The API key could not be kept in {where} "
                            f"({error}). It is used until SmallMind closes.")  # fmt: skip
