"""The main window: the conversation tabs, the history sidebar, the stats dock, menus, the dialogs.

The worker's signals reach the tabs, dialogs and dock through ``router.WorkerRouter``; model
loading, the first-run dialog and the settings dialog are driven from here; every engine call goes
through ``EngineClient``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QCoreApplication, QSize, Qt, Slot
from PySide6.QtGui import QCloseEvent, QGuiApplication, QIcon, QResizeEvent
from PySide6.QtWidgets import (
    QFileDialog,
    QMainWindow,
    QMessageBox,
    QWidget,
)

from .. import paths
from ..chat.chat_settings_dialog import ChatSettingsDialog
from ..chat.conversation_tabs import ConversationTabs
from ..chat.preset_menu import PresetController
from ..chat.tab import ChatTab
from ..dock.stats_dock import StatsDock
from ..documents.feature import DocumentsFeature
from ..engines.engine_keys import EngineKeys
from ..history.sidebar import HistorySidebar
from ..history.store import ConversationStore
from ..models.first_run import FirstRunDialog
from ..models.models_dialog import ModelsDialog
from ..paths import RESOURCES_DIR
from ..server.server_dialog import LocalServerDialog
from ..settings import app_settings
from ..settings.app_settings import AppSettings, SettingsError
from ..settings.dialog import SettingsDialog
from ..wording import MiB, setting_problem
from ..worker.client import EngineClient
from ..worker.engine_options import validate_settings
from .dialogs import WindowDialogs
from .menus import build_menus
from .model_status import ModelStatus
from .router import WorkerRouter
from .tab_models import TabModels, models_options
from .theme_manager import ThemeManager

log = logging.getLogger(__name__)
DOCK_SHARE, DOCK_WIDTH = 0.3, (300, 600)
HISTORY_WIDTH = 290
WINDOW_SIZE = (1320, 840)
ICON_FILE = RESOURCES_DIR / "icon.png"


def initial_size() -> QSize:
    """1320x840, or less on a smaller screen (its available area: a 1280x720 laptop shows it all)."""
    screen = QGuiApplication.primaryScreen()
    width, height = WINDOW_SIZE
    if screen is not None:
        room = screen.availableGeometry()
        width, height = min(width, room.width()), min(height, room.height())
    return QSize(width, height)


def app_icon() -> QIcon:
    """SmallMind's icon (resources/icon.png; icon.svg is its source)."""
    return QIcon(str(ICON_FILE))


class MainWindow(QMainWindow):
    def __init__(self, settings: AppSettings, store: ConversationStore, client: EngineClient) -> None:
        super().__init__()
        self.setObjectName("mainWindow")
        self.setWindowTitle("SmallMind")
        self.resize(initial_size())
        self.settings = settings
        self.store = store
        self.client = client
        self.error_dialog: QMessageBox | None = None
        self.closed = False
        self.models = TabModels(
            lambda: self.settings, lambda: self.model_info
        )  # which model answers each tab
        self.engine_keys = EngineKeys()  # Settings → Engines: the endpoints' keys (keyring, or a 0600 file)
        self.api_keys = self.engine_keys.store
        self.tabs = ConversationTabs(store)
        self.tabs.tab_opened.connect(self._on_tabs_tab_opened)
        self.tabs.tab_closed.connect(self._on_tabs_tab_closed)
        self.tabs.store_failed.connect(self._on_tabs_store_failed)
        self.setCentralWidget(self.tabs)
        self.stats_dock = StatsDock(self)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.stats_dock)
        self.resizeDocks([self.stats_dock], [400], Qt.Orientation.Horizontal)
        self.history = HistorySidebar(store, self.tabs, self)
        self.history.store_failed.connect(self._on_tabs_store_failed)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.history)
        self.resizeDocks([self.history], [HISTORY_WIDTH], Qt.Orientation.Horizontal)
        self.setWindowIcon(app_icon())
        self.dialogs = WindowDialogs(self)
        build_menus(self)
        self.presets = PresetController(
            self, lambda: self.settings.prompt_presets, self._save_presets, self._current_chat_tab,
            tied=lambda: self.settings.preset_models, save_tied=self._save_preset_models,
            label_of=lambda engine_id: self.models.engine_label(engine_id),
        )  # fmt: skip
        self.preset_menu = self.presets.menu(self)  # the current tab's, in the Chat menu
        self.chat_menu.insertMenu(self.action_chat_settings, self.preset_menu)
        self.theme = ThemeManager(settings.theme, self)
        self.theme.theme_changed.connect(self._on_theme_theme_changed)
        self.theme.set_choice(settings.theme)
        self.theme.set_text_scale(settings.text_scale)
        self.theme.text_scale_changed.connect(self._on_theme_theme_changed)
        self.model_status = ModelStatus(self)  # the status bar
        self.model_label = self.model_status.label
        self.router = WorkerRouter(self)
        self.documents = DocumentsFeature(self)  # Tools → Documents…, the tabs' Documents buttons
        self.tabs.currentChanged.connect(self.router.show_tab_engine)
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._shutdown)

    # -- construction ---------------------------------------------------------------------------

    def start(self, model_path: str | None = None) -> None:
        """Start the worker, load the model (on the worker), restore the open conversations."""
        self.client.start()
        self.client.apply_settings(
            dict(self.settings.kv_cache), dict(self.settings.batching), models_options(self.settings)
        )
        self.send_endpoints()
        if model_path is None:
            model_path = (
                "" if os.environ.get(paths.MODEL_ENV, "").strip() else (self.settings.model_path or "")
            )
        self.client.load_model(model_path)
        self.tabs.restore()
        if not self.tabs.count():
            self.new_chat()
        self.history.refresh()

    @property
    def model_info(self) -> dict[str, Any]:
        """The running model's ``model_info`` (empty before one is loaded): see ``ModelStatus``."""
        return self.model_status.info

    # -- dialogs (``dialogs.WindowDialogs``) ---------------------------------------------------------
    @property
    def settings_dialog(self) -> SettingsDialog | None:
        return self.dialogs.settings_dialog

    @property
    def chat_settings_dialog(self) -> ChatSettingsDialog | None:
        return self.dialogs.chat_settings_dialog

    @property
    def models_dialog(self) -> ModelsDialog | None:
        return self.dialogs.models_dialog

    @property
    def server_dialog(self) -> LocalServerDialog | None:
        return self.dialogs.server_dialog

    @property
    def first_run_dialog(self) -> FirstRunDialog | None:
        return self.dialogs.first_run_dialog

    def open_settings(self, setting: str = "") -> SettingsDialog:
        """The settings dialog; ``setting`` ("kv_cache.max_bytes_total") opens it at that field."""
        return self.dialogs.open_settings(setting)

    def open_chat_settings(self, conversation_id: str) -> ChatSettingsDialog | None:
        """The dialog of one conversation's own sampling settings (used from its next reply on)."""
        return self.dialogs.open_chat_settings(conversation_id)

    def open_current_chat_settings(self) -> None:
        self.dialogs.open_current_chat_settings()

    def open_models(self) -> ModelsDialog:
        return self.dialogs.open_models()

    def open_local_server(self) -> LocalServerDialog:
        return self.dialogs.open_local_server()

    # -- tabs -----------------------------------------------------------------------------------
    @property
    def chat_tabs(self) -> list[ChatTab]:
        return self.tabs.chat_tabs

    @Slot()
    def new_chat(self) -> ChatTab:
        return self.tabs.new_chat(self.settings.system_prompt)

    @Slot(object)
    def _on_tabs_tab_opened(self, tab: ChatTab) -> None:
        self.client.prefetch_sessions([tab.conversation_id])  # its K/V on disk start coming in
        self.router.connect_tab(tab)
        tab.chat_settings_requested.connect(self.open_chat_settings)
        tab.busy_changed.connect(self._on_tab_busy_changed)
        tab.settings_requested.connect(self.open_settings)
        tab.setting_change_requested.connect(self._on_tab_setting_change_requested)
        effective = tab.engine.set_choices(self.engine_choices())
        if tab.saved_engine is None:  # a new chat: the default engine (remembered with it from now on)
            tab.set_engine(self.settings.default_engine)
        else:
            self.client.set_conversation_engine(tab.conversation_id, effective)
        self.presets.add_button(tab)

    @Slot(str)
    def _on_tabs_tab_closed(self, conversation_id: str) -> None:
        self.client.remove_session(conversation_id)  # also stops its reply
        self.model_status.update_busy()
        if not self.tabs.count() and not self.closed:
            self.new_chat()

    @Slot(str)
    def _on_tabs_store_failed(self, message: str) -> None:
        self.statusBar().showMessage(message, 10_000)

    @Slot()
    def close_current_tab(self) -> None:
        if self.tabs.currentIndex() >= 0:
            self.tabs.close_tab(self.tabs.currentIndex())

    @Slot()
    def rename_current_tab(self) -> None:
        self.tabs.ask_rename(self.tabs.currentIndex())

    @Slot()
    def export_current_tab(self) -> None:
        tab = self.tabs.currentWidget()
        if not isinstance(tab, ChatTab):
            return
        name = "".join(c if c.isalnum() or c in " -_" else "_" for c in tab.title).strip() or "conversation"
        default = str(Path.home() / f"{name}.md")
        path, _ = QFileDialog.getSaveFileName(self, "Export to Markdown", default, "Markdown (*.md)")
        if path:
            problem = self.tabs.export_conversation(tab.conversation_id, path)
            if problem:
                self.show_error("Export failed", problem)
            else:
                self.statusBar().showMessage(f"Exported to {path}", 6000)

    @Slot()
    def ask_delete_current_tab(self) -> None:
        tab = self.tabs.currentWidget()
        if not isinstance(tab, ChatTab):
            return
        question = f"Delete “{tab.title}” and all its messages? This cannot be undone."
        box = QMessageBox(QMessageBox.Icon.Warning, "Delete conversation", question, parent=self)
        box.setObjectName("deleteDialog")
        delete = box.addButton("Delete", QMessageBox.ButtonRole.DestructiveRole)
        keep = box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)  # Enter keeps the conversation: deleting takes a deliberate click
        box.setEscapeButton(keep)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        conversation_id = tab.conversation_id
        box.buttonClicked.connect(
            lambda button: self._delete_conversation(conversation_id) if button is delete else None
        )
        box.open()

    def _delete_conversation(self, conversation_id: str) -> None:
        self.tabs.delete_conversation(conversation_id)
        self.client.forget_session(conversation_id)  # its K/V files go too

    def sampling_for(self, tab: ChatTab) -> dict[str, Any]:
        """What the tab's next reply is sampled with (``TabModels.sampling_for``)."""
        return self.models.sampling_for(tab)

    @Slot(list)
    def set_local_models(self, models: list) -> None:
        """The worker's local models changed (one opened, loaded, unloaded): the pickers and the dock."""
        self.models.local_models = list(models)
        self.refresh_engine_choices()
        self.stats_dock.show_models(self.models.local_models)

    @Slot(str, bool)
    def _on_tab_busy_changed(self, _conversation_id: str, _busy: bool) -> None:
        self.model_status.update_busy()

    @Slot(str, str, int)
    def _on_tab_setting_change_requested(self, conversation_id: str, setting: str, value: int) -> None:
        """The tab's "Raise to … and send": change the limit (and the memory it needs), send again."""
        section, key = setting.split(".", 1)
        changes = {key: value}
        per_token = int(self.model_info.get("bytes_per_token", 0))
        kv = {**self.settings.kv_cache, **changes} if section == "kv_cache" else dict(self.settings.kv_cache)
        if key == "max_tokens_per_session" and per_token:  # the memory per session must hold them too
            needed = -(-value * per_token // MiB) * MiB
            kv["max_bytes_per_session"] = max(kv["max_bytes_per_session"], needed)
        kv["max_bytes_total"] = max(kv["max_bytes_total"], kv["max_bytes_per_session"])
        problems = validate_settings(kv, self.settings.batching, self.settings.sampling)
        if problems:
            self.show_error("Setting not changed", "\n".join(setting_problem(m) for m in problems.values()))
            return
        self.apply_settings(self.settings.with_changes(kv_cache=kv))
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.regenerate()

    @Slot(str)
    def use_model_file(self, path: str) -> None:
        """The user picked a GGUF file: the default model from now on (new tabs, and this one)."""
        self.keep_tabs_on_their_model()
        self.save_settings(self.settings.with_changes(model_path=path))
        self.client.load_model(path)

    def keep_tabs_on_their_model(self) -> None:
        """The default model is about to change: the other tabs keep theirs (``TabModels``)."""
        self.models.keep_tabs_on_their_model(self.chat_tabs, self.tabs.currentWidget())

    # -- remote engines -------------------------------------------------------------------------
    def engine_choices(self) -> list[tuple[str, str]]:
        """The tabs' engine pickers: (engine id, label) (``TabModels.engine_choices``)."""
        return self.models.engine_choices()

    def send_endpoints(self) -> None:
        """The endpoints of the settings, with their keys, to the worker (which makes their engines)."""
        self.client.set_endpoints(self.engine_keys.endpoints_with_keys(self.settings.engines))

    def refresh_engine_choices(self) -> None:
        choices = self.engine_choices()
        for tab in self.chat_tabs:
            before = tab.engine_picker.engine_id
            if (effective := tab.engine.set_choices(choices)) != before:  # the saved one is gone
                self.client.set_conversation_engine(tab.conversation_id, effective)
        self.router.show_tab_engine()

    # -- settings -------------------------------------------------------------------------------

    @Slot(object)
    def apply_settings(self, settings: AppSettings) -> None:
        """Live: the engine takes the new options at once; a new model file is loaded on the worker."""
        old, self.settings = self.settings, settings
        self.save_settings(settings)
        self.client.apply_settings(dict(settings.kv_cache), dict(settings.batching), models_options(settings))
        if settings.model_path != old.model_path:
            self.keep_tabs_on_their_model()
            self.client.load_model(settings.model_path or "")
        if (settings.engines, settings.default_engine) != (
            old.engines,
            old.default_engine,
        ) or self.engine_keys.changed:
            self.engine_keys.changed = False
            self.send_endpoints()
            self.refresh_engine_choices()
        if settings.theme != self.theme.choice:
            self.theme.set_choice(settings.theme)
        self.theme.set_text_scale(settings.text_scale)

    def save_settings(self, settings: AppSettings) -> None:
        self.settings = settings
        try:
            app_settings.save_settings(settings)
        except SettingsError as exc:
            self.show_error("Settings not saved", f"{exc}\nThey apply until SmallMind closes.")

    @Slot(str)
    def show_settings_rejected(self, message: str) -> None:
        self.show_error("Settings not applied", message)

    # -- errors ---------------------------------------------------------------------------------
    def show_error(self, title: str, text: str, name: str = "errorDialog") -> QMessageBox:
        """A non-blocking message box (the app stays usable behind it)."""
        box = QMessageBox(QMessageBox.Icon.Warning, title, text, QMessageBox.StandardButton.Ok, self)
        box.setObjectName(name)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.error_dialog = box
        box.open()
        return box

    def resizeEvent(self, event: QResizeEvent) -> None:
        """The dock keeps its share of the window (30%, 300 to 600 px) as the window grows or shrinks."""
        super().resizeEvent(event)
        if self.stats_dock.isVisible() and not self.stats_dock.isFloating():
            width = min(DOCK_WIDTH[1], max(DOCK_WIDTH[0], int(self.width() * DOCK_SHARE)))
            self.resizeDocks([self.stats_dock], [width], Qt.Orientation.Horizontal)

    # -- history, theme, presets ----------------------------------------------------------------
    def _current_chat_tab(self) -> ChatTab | None:
        tab = self.tabs.currentWidget()
        return tab if isinstance(tab, ChatTab) else None

    def _save_presets(self, presets: dict[str, str]) -> None:
        self.save_settings(self.settings.with_changes(prompt_presets=presets))

    def _save_preset_models(self, tied: dict[str, str]) -> None:
        self.save_settings(self.settings.with_changes(preset_models=tied))

    @Slot(str)
    @Slot(int)
    def _on_theme_theme_changed(self, _name: str | int) -> None:
        """Redo what was painted with the old colors or text size: transcripts, busy tabs, plots, the
        history list."""
        for tab in self.tabs.chat_tabs:
            tab.transcript.restyle()
            tab.prompt_edit.fit()  # its height is in lines of the font
        self.tabs.restyle()
        self.stats_dock.restyle()
        self.history.view.doItemsLayout()  # its rows are two lines of the font high
        self.history.view.viewport().update()

    # -- shutdown -------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:
        self._shutdown()
        event.accept()

    @Slot()
    def _shutdown(self) -> None:
        """Keep the text of replies in progress, stop the engine, join its thread. Runs once."""
        if self.closed:
            return
        self.closed = True
        self.history.commit_pending()  # a delete waiting for its undo time is done now
        self.tabs.save_all()
        self.documents.shutdown()
        self.client.shutdown()
        self.store.close()

    def widget_named(self, name: str) -> QWidget | None:
        return self.findChild(QWidget, name)
