"""The main window: the conversation tabs, the stats dock, menus, and the routing of the worker's signals.

The worker's answers are routed by conversation id to their tab whether or not it is shown, so
switching tabs never stops or mixes up a generation. Model loading, the first-run dialog and the
settings dialog are driven from here; every engine call goes through ``EngineClient``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QCoreApplication, Qt, Slot
from PySide6.QtGui import QAction, QCloseEvent, QIcon, QKeySequence, QResizeEvent
from PySide6.QtWidgets import (
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QToolButton,
    QWidget,
)

from ..chat.chat_settings_dialog import ChatSettingsDialog
from ..chat.conversation_tabs import ConversationTabs
from ..chat.tab import ChatTab
from ..dock.stats_dock import StatsDock
from ..engines.endpoints import LOCAL_ENGINE, ApiKeyStore
from ..history.sidebar import HistorySidebar
from ..history.store import ConversationStore
from ..models.first_run import FirstRunDialog
from ..models.models_dialog import ModelsDialog
from ..paths import RESOURCES_DIR
from ..server.server_dialog import LocalServerDialog
from ..settings.app_settings import AppSettings, SettingsError, save_settings
from ..settings.dialog import SettingsDialog
from ..settings.presets import PresetController
from ..wording import MiB, setting_problem, tab_limit_lowered
from ..worker.client import EngineClient
from ..worker.downloads import default_model_description
from ..worker.engine_options import validate_settings
from .theme_manager import ThemeManager

log = logging.getLogger(__name__)
MODEL_ENV = "SMALLMIND_MODEL"
DOCK_SHARE, DOCK_WIDTH = 0.3, (300, 600)
HISTORY_WIDTH = 290
ICON_FILE = RESOURCES_DIR / "icon.png"


def app_icon() -> QIcon:
    """SmallMind's icon (resources/icon.png; icon.svg is its source)."""
    return QIcon(str(ICON_FILE))


class MainWindow(QMainWindow):
    def __init__(self, settings: AppSettings, store: ConversationStore, client: EngineClient) -> None:
        super().__init__()
        self.setObjectName("mainWindow")
        self.setWindowTitle("SmallMind")
        self.resize(1320, 840)
        self.settings = settings
        self.store = store
        self.client = client
        self.model_info: dict[str, Any] = {}
        self.first_run_dialog: FirstRunDialog | None = None
        self.settings_dialog: SettingsDialog | None = None
        self.chat_settings_dialog: ChatSettingsDialog | None = None
        self.models_dialog: ModelsDialog | None = None
        self.server_dialog: LocalServerDialog | None = None
        self.error_dialog: QMessageBox | None = None
        self._closed = False
        self.api_keys = ApiKeyStore()  # Settings → Engines: the endpoints' keys (keyring, or a 0600 file)
        self._remote_stats: dict[str, dict[str, Any]] = {}  # endpoint id -> the worker's remote_stats()
        self._unsaved_keys: dict[str, str] = {}  # keys the key store refused: used until the app closes
        self._keys_changed = False
        self.tabs = ConversationTabs(store)
        self.tabs.tab_opened.connect(self._on_tabs_tab_opened)
        self.tabs.tab_closed.connect(self._on_tabs_tab_closed)
        self.tabs.store_failed.connect(self._on_tabs_store_failed)
        self.tabs.currentChanged.connect(self._show_tab_engine)
        self.setCentralWidget(self.tabs)
        self.stats_dock = StatsDock(self)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.stats_dock)
        self.resizeDocks([self.stats_dock], [400], Qt.Orientation.Horizontal)
        self.history = HistorySidebar(store, self.tabs, self)
        self.history.store_failed.connect(self._on_tabs_store_failed)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.history)
        self.resizeDocks([self.history], [HISTORY_WIDTH], Qt.Orientation.Horizontal)
        self.setWindowIcon(app_icon())
        self._build_actions()
        self._build_history_actions()
        self.theme = ThemeManager(settings.theme, self)
        self.theme.theme_changed.connect(self._on_theme_theme_changed)
        self.theme.set_choice(settings.theme)
        self._build_status_bar()
        self._connect_worker()
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._shutdown)

    # -- construction ---------------------------------------------------------------------------
    def _action(self, name: str, text: str, slot: Any, shortcut: str | None = None) -> QAction:
        action = QAction(text, self, objectName=name)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(slot)
        self.addAction(action)
        return action

    def _build_actions(self) -> None:
        self.action_new = self._action("actionNewChat", "&New chat", self.new_chat, "Ctrl+T")
        self.action_close = self._action("actionCloseChat", "&Close chat", self._on_close_triggered, "Ctrl+W")
        self.action_rename = self._action(
            "actionRenameChat", "&Rename chat…", self._on_rename_triggered, "F2"
        )
        self.action_export = self._action(
            "actionExportChat", "&Export to Markdown…", self._on_export_triggered
        )
        self.action_delete = self._action(
            "actionDeleteChat", "&Delete conversation…", self._on_delete_triggered
        )
        self.action_chat_settings = self._action(
            "actionChatSettings", "Chat sa&mpling…", self._on_chat_settings_triggered, "Ctrl+Shift+,"
        )
        self.action_settings = self._action(
            "actionSettings", "&Settings…", lambda: self.open_settings(), "Ctrl+,"
        )
        self.action_models = self._action("actionModels", "&Models…", lambda: self.open_models())
        self.action_local_server = self._action(
            "actionLocalServer", "&Local server…", lambda: self.open_local_server()
        )
        self.action_quit = self._action("actionQuit", "&Quit", self.close, "Ctrl+Q")
        chat = self.menuBar().addMenu("&Chat")
        for action in (self.action_new, self.action_close, self.action_rename):
            chat.addAction(action)
        self.reopen_menu = chat.addMenu("Re&open conversation")
        self.reopen_menu.setObjectName("reopenMenu")
        self.reopen_menu.aboutToShow.connect(self._on_reopen_menu_about_to_show)
        chat.addSeparator()
        chat.addAction(self.action_chat_settings)
        chat.addAction(self.action_export)
        chat.addAction(self.action_delete)
        chat.addSeparator()
        chat.addAction(self.action_quit)
        tools = self.menuBar().addMenu("&Tools")
        tools.addAction(self.action_models)
        tools.addAction(self.action_local_server)
        tools.addAction(self.action_settings)
        dock_action = self.stats_dock.toggleViewAction()
        dock_action.setText("Engine &stats")
        dock_action.setShortcut(QKeySequence("Ctrl+Shift+S"))
        tools.addAction(dock_action)
        plus = QToolButton(objectName="newChatButton", text=" + ")
        plus.setAutoRaise(True)
        plus.setToolTip("New chat (Ctrl+T)")
        plus.clicked.connect(self.new_chat)
        self.tabs.setCornerWidget(plus, Qt.Corner.TopRightCorner)

    def _build_status_bar(self) -> None:
        self.model_label = QLabel("No model loaded", objectName="modelStatus")
        self.busy_label = QLabel(objectName="busyStatus")
        self.load_bar = QProgressBar(objectName="modelLoadProgress", maximumWidth=160, maximumHeight=14)
        self.load_bar.setRange(0, 0)
        self.load_bar.setVisible(False)
        bar = self.statusBar()
        bar.addWidget(self.model_label)
        bar.addWidget(self.load_bar)
        bar.addPermanentWidget(self.busy_label)

    def _connect_worker(self) -> None:
        w = self.client.worker
        w.model_loading.connect(self._on_worker_model_loading)
        w.model_loaded.connect(self._on_worker_model_loaded)
        w.model_load_failed.connect(self._on_worker_model_load_failed)
        w.model_missing.connect(self._on_worker_model_missing)
        w.prompt_progressed.connect(self._on_worker_prompt_progressed)
        w.text_generated.connect(self._on_worker_text_generated)
        w.request_waiting.connect(self._on_worker_request_waiting)
        w.request_finished.connect(self._on_worker_request_finished)
        w.request_failed.connect(self._on_worker_request_failed)
        w.stats_updated.connect(self._on_worker_stats_updated)
        w.settings_rejected.connect(self._on_worker_settings_rejected)
        w.settings_applied.connect(self._on_worker_settings_applied)
        w.tokens_counted.connect(self._on_worker_tokens_counted)
        w.download_progressed.connect(self._on_worker_download_progressed)
        w.download_finished.connect(self._on_worker_download_finished)
        w.download_failed.connect(self._on_worker_download_failed)
        w.models_listed.connect(self._on_worker_models_listed)
        w.endpoint_tested.connect(self._on_worker_endpoint_tested)
        w.remote_stats_updated.connect(self._on_worker_remote_stats_updated)

    def start(self, model_path: str | None = None) -> None:
        """Start the worker, load the model (on the worker), restore the open conversations."""
        self.client.start()
        self.client.apply_settings(dict(self.settings.kv_cache), dict(self.settings.batching))
        self._send_endpoints()
        if model_path is None:
            model_path = "" if os.environ.get(MODEL_ENV, "").strip() else (self.settings.model_path or "")
        self.client.load_model(model_path)
        self.tabs.restore()
        if not self.tabs.count():
            self.new_chat()
        self.history.refresh()

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
        tab.generation_requested.connect(self._on_tab_generation_requested)
        tab.cancel_requested.connect(self.client.cancel)
        tab.chat_settings_requested.connect(self.open_chat_settings)
        tab.busy_changed.connect(self._on_tab_busy_changed)
        tab.settings_requested.connect(self.open_settings)
        tab.token_count_requested.connect(self.client.count_tokens)
        tab.setting_change_requested.connect(self._on_tab_setting_change_requested)
        tab.engine_changed.connect(self._on_tab_engine_changed)
        effective = tab.set_engine_choices(self.engine_choices())
        if tab.saved_engine is None:  # a new chat: the default engine (remembered with it from now on)
            tab.set_engine(self.settings.default_engine)
        else:
            self.client.set_conversation_engine(tab.conversation_id, effective)
        self.presets.add_button(tab)

    @Slot(str)
    def _on_tabs_tab_closed(self, conversation_id: str) -> None:
        self.client.remove_session(conversation_id)  # also stops its reply
        self._update_busy()
        if not self.tabs.count() and not self._closed:
            self.new_chat()

    @Slot(str)
    def _on_tabs_store_failed(self, message: str) -> None:
        self.statusBar().showMessage(message, 10_000)

    @Slot()
    def _on_close_triggered(self) -> None:
        if self.tabs.currentIndex() >= 0:
            self.tabs.close_tab(self.tabs.currentIndex())

    @Slot()
    def _on_rename_triggered(self) -> None:
        self.tabs.ask_rename(self.tabs.currentIndex())

    @Slot()
    def _on_reopen_menu_about_to_show(self) -> None:
        self.tabs.fill_reopen_menu(self.reopen_menu)

    @Slot()
    def _on_export_triggered(self) -> None:
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
    def _on_delete_triggered(self) -> None:
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

    # -- tabs -> worker -------------------------------------------------------------------------
    def sampling_for(self, tab: ChatTab) -> dict[str, Any]:
        """The global sampling settings, overridden by the tab's own (conversation settings)."""
        sampling = {**self.settings.sampling, **tab.conversation_settings.get("sampling", {})}
        sampling["stop"] = list(sampling.get("stop", ()))
        return sampling

    @Slot(str, list)
    def _on_tab_generation_requested(self, conversation_id: str, messages: list) -> None:
        tab = self.tabs.tab_for(conversation_id)
        if tab is not None:
            self.client.submit(conversation_id, messages, self.sampling_for(tab))

    @Slot(str, bool)
    def _on_tab_busy_changed(self, _conversation_id: str, _busy: bool) -> None:
        self._update_busy()

    def _update_busy(self) -> None:
        n = sum(tab.is_generating for tab in self.tabs.chat_tabs)
        self.busy_label.setText(f"{n} tab{'s' * (n != 1)} generating" if n else "")

    # -- worker -> tabs -------------------------------------------------------------------------
    @Slot(str, int, int)
    def _on_worker_prompt_progressed(self, conversation_id: str, done: int, total: int) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.show_prompt_progress(done, total)

    @Slot(str)
    def _on_worker_request_waiting(self, conversation_id: str) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.show_waiting_for_memory()

    @Slot(str, str, int)
    def _on_worker_text_generated(self, conversation_id: str, text: str, n_tokens: int) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.append_text(text, n_tokens)

    @Slot(str, dict)
    def _on_worker_request_finished(self, conversation_id: str, result: dict) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.finish_reply(result)

    @Slot(str, str, dict)
    def _on_worker_request_failed(self, conversation_id: str, message: str, info: dict) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.fail_request(message, info)

    @Slot(str, str, int, int)
    def _on_worker_tokens_counted(self, conversation_id: str, text: str, n_tokens: int, limit: int) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.show_token_count(text, n_tokens, limit)

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

    @Slot(dict)
    def _on_worker_stats_updated(self, stats: dict) -> None:
        if not self._closed:
            self.stats_dock.update_stats(stats, self.tabs.titles())
        if self.settings_dialog is not None:  # the KV page shows what the disk tier holds
            self.settings_dialog.set_disk_usage(stats["kv"]["disk_sessions"], stats["kv"]["disk_bytes"])

    # -- model ----------------------------------------------------------------------------------
    @Slot(str, str)
    def _on_worker_model_loading(self, path: str, note: str) -> None:
        self.model_label.setText(f"Loading {Path(path).name}…" + (f" ({note})" if note else ""))
        self.load_bar.setVisible(True)

    @Slot(dict)
    def _on_worker_model_loaded(self, info: dict) -> None:
        self.model_info = dict(info)
        self.load_bar.setVisible(False)
        name = Path(info["file_name"]).stem
        self._show_model_label()
        self.model_label.setToolTip(f"{info['name']}\n{info['path']}")
        self.setWindowTitle(f"SmallMind — {name}")
        if self.settings_dialog is not None:
            self.settings_dialog.set_model_info(info)
        if self.models_dialog is not None:
            self.models_dialog.show_load_result(f"Running {info['file_name']}.")
        self._refresh_models()
        self._refresh_engine_choices()  # the local engine's entry names the model
        self.client.prefetch_sessions([tab.conversation_id for tab in self.chat_tabs])  # tabs restored

    @Slot(str, str)
    def _on_worker_model_load_failed(self, path: str, reason: str) -> None:
        self.load_bar.setVisible(False)
        if not self.model_info:
            self.model_label.setText("No model loaded")
        if self.models_dialog is not None:
            self.models_dialog.show_load_result(f"Could not load {Path(path).name}: {reason}", error=True)
        self._refresh_models()
        self.show_error(
            "Cannot load the model",
            f"The model file {path} cannot be used:\n\n{reason}",
            name="modelErrorDialog",
        )

    @Slot(str)
    def _on_worker_model_missing(self, message: str) -> None:
        self.model_label.setText("No model loaded")
        reason = message.split(" Run `")[0]  # the command-line hints do not apply here
        dialog = FirstRunDialog(default_model_description(), reason, self)
        dialog.download_requested.connect(self.client.start_download)
        dialog.download_cancel_requested.connect(self.client.cancel_download)
        dialog.model_file_chosen.connect(self.use_model_file)
        self.first_run_dialog = dialog
        dialog.open()

    @Slot(str)
    def use_model_file(self, path: str) -> None:
        """The user picked a GGUF file: remember it and load it."""
        self._save_settings(self.settings.with_changes(model_path=path))
        self.client.load_model(path)

    @Slot(str, int, int)
    def _on_worker_download_progressed(self, phase: str, done: int, total: int) -> None:
        if self.first_run_dialog is not None:
            self.first_run_dialog.show_progress(phase, done, total)
        if self.models_dialog is not None:
            self.models_dialog.show_progress(phase, done, total)

    @Slot(str)
    def _on_worker_download_finished(self, path: str) -> None:
        if self.first_run_dialog is not None:
            self.first_run_dialog.show_finished(path)
        if self.models_dialog is not None:
            self.models_dialog.show_finished(path)
        if not self.model_info:  # the first model: run it; else the Models dialog's Load switches
            self.client.load_model(path)

    @Slot(str)
    def _on_worker_download_failed(self, message: str) -> None:
        if self.first_run_dialog is not None:
            self.first_run_dialog.show_failed(message)
        if self.models_dialog is not None:
            self.models_dialog.show_failed(message)

    # -- remote engines -------------------------------------------------------------------------
    def engine_choices(self) -> list[tuple[str, str]]:
        """The tabs' engine pickers: (engine id, label), the local engine first."""
        name = Path(self.model_info["file_name"]).stem if self.model_info else "no model loaded"
        return [(LOCAL_ENGINE, f"Local · {name}")] + [(e.id, e.label) for e in self.settings.engines]

    def _send_endpoints(self) -> None:
        """The endpoints of the settings, with their keys, to the worker (which makes their engines)."""
        self.client.set_endpoints(
            [{**e.to_dict(), "api_key": self._key_of(e.id)} for e in self.settings.engines]
        )

    def _key_of(self, endpoint_id: str) -> str:
        return self._unsaved_keys.get(endpoint_id) or self.api_keys.get(endpoint_id)

    def _refresh_engine_choices(self) -> None:
        choices = self.engine_choices()
        for tab in self.chat_tabs:
            self.client.set_conversation_engine(tab.conversation_id, tab.set_engine_choices(choices))
        self._show_tab_engine()

    @Slot(str, str)
    def _on_tab_engine_changed(self, conversation_id: str, engine_id: str) -> None:
        self.client.set_conversation_engine(conversation_id, engine_id)
        self._show_tab_engine()

    @Slot()
    def _show_tab_engine(self, *_args: Any) -> None:
        """The dock's "This tab's engine": the tab shown's engine and, for a server, its own figures."""
        tab = self.tabs.currentWidget()
        if not isinstance(tab, ChatTab) or self._closed:
            return
        engine_id, label = tab.engine_picker.engine_id, tab.engine_picker.currentText()
        if engine_id == LOCAL_ENGINE:
            self.stats_dock.show_tab_engine(label, None)
            return
        empty = {"tokens_per_second": 0.0, "ttft_p50_ms": 0.0}
        figures = self._remote_stats.get(engine_id, empty)
        url = f" ({figures['url']})" if figures.get("url") else ""
        self.stats_dock.show_tab_engine(label + url, figures)

    @Slot(dict)
    def _on_worker_remote_stats_updated(self, stats: dict) -> None:
        self._remote_stats = dict(stats)
        self._show_tab_engine()

    @Slot(str, list, str)
    def _on_worker_endpoint_tested(self, base_url: str, models: list, error: str) -> None:
        if self.settings_dialog is not None:
            self.settings_dialog.engines_page.show_test_result(base_url, list(models), error)

    @Slot(dict)
    def _on_settings_dialog_api_keys_chosen(self, keys: dict) -> None:
        """Keep the endpoints' keys (keyring or the 0600 file) and forget those of removed endpoints."""
        for endpoint_id in {e.id for e in self.settings.engines} - set(keys):
            keys[endpoint_id] = ""  # a removed endpoint: forget its key
        for endpoint_id, key in keys.items():
            if key == self._key_of(endpoint_id):
                continue
            self._keys_changed = True
            try:
                self.api_keys.set(endpoint_id, key)
                self._unsaved_keys.pop(endpoint_id, None)
            except Exception as exc:  # keyring errors are of many kinds; none may lose the other settings
                log.warning("API key not saved: %s", type(exc).__name__)
                self._unsaved_keys[endpoint_id] = key
                where = self.api_keys.where
                self.show_error("API key not saved", f"The API key could not be kept in {where} "
                                f"({type(exc).__name__}). It is used until SmallMind closes.")  # fmt: skip

    # -- local API server -------------------------------------------------------------------------
    @Slot()
    def open_local_server(self) -> LocalServerDialog:
        """Tools → Local server…: serve the loaded model over the OpenAI-compatible API (the worker
        runs the server on its engine, so API requests are batched with the tabs)."""
        if self.server_dialog is None:
            dialog = LocalServerDialog(port=self.settings.server_port, parent=self)
            dialog.start_requested.connect(self._on_server_dialog_start_requested)
            dialog.stop_requested.connect(self.client.stop_server)
            self.client.worker.server_started.connect(dialog.show_running)
            self.client.worker.server_stopped.connect(dialog.show_stopped)
            self.server_dialog = dialog
        self.server_dialog.open()
        return self.server_dialog

    @Slot(int, str)
    def _on_server_dialog_start_requested(self, port: int, api_key: str) -> None:
        """Start the server and remember its port (the key is not saved: it is asked each time)."""
        if port != self.settings.server_port:
            self._save_settings(self.settings.with_changes(server_port=port))
        self.client.start_server(port, api_key)

    # -- models dialog --------------------------------------------------------------------------
    @Slot()
    def open_models(self) -> ModelsDialog:
        """Tools → Models…: the catalog and the GGUF files at hand (listed by the worker)."""
        if self.models_dialog is None:
            dialog = ModelsDialog(self)
            dialog.refresh_requested.connect(self._refresh_models)
            dialog.download_requested.connect(self.client.start_download)
            dialog.download_cancel_requested.connect(self.client.cancel_download)
            dialog.load_requested.connect(self.use_model_file)
            dialog.finished.connect(self._on_models_dialog_finished)
            self.models_dialog = dialog
        self._refresh_models()
        self.models_dialog.open()
        return self.models_dialog

    @Slot()
    def _refresh_models(self) -> None:
        if self.models_dialog is not None:
            self.client.list_models([self.settings.model_path] if self.settings.model_path else [])

    @Slot(list)
    def _on_worker_models_listed(self, rows: list) -> None:
        if self.models_dialog is not None:
            self.models_dialog.set_models(rows)

    @Slot(int)
    def _on_models_dialog_finished(self, _result: int) -> None:
        if self.models_dialog is not None:
            self.models_dialog.deleteLater()
            self.models_dialog = None

    # -- settings -------------------------------------------------------------------------------
    @Slot(str)
    def open_settings(self, setting: str = "") -> SettingsDialog:
        """The settings dialog; ``setting`` ("kv_cache.max_bytes_total") opens it at that field."""
        if self.settings_dialog is None:
            keys = {e.id: self.api_keys.get(e.id) for e in self.settings.engines}
            dialog = SettingsDialog(self.settings, self.model_info, self, keys, self.api_keys.where)
            dialog.api_keys_chosen.connect(self._on_settings_dialog_api_keys_chosen)
            dialog.engines_page.test_requested.connect(self.client.test_endpoint)
            dialog.settings_chosen.connect(self.apply_settings)
            dialog.disk_clear_requested.connect(self.client.clear_disk_cache)
            dialog.finished.connect(self._on_settings_dialog_finished)
            self.settings_dialog = dialog
        self.settings_dialog.open()
        if setting:
            self.settings_dialog.show_setting(setting)
        return self.settings_dialog

    @Slot()
    def _on_chat_settings_triggered(self) -> None:
        tab = self.tabs.currentWidget()
        if isinstance(tab, ChatTab):
            self.open_chat_settings(tab.conversation_id)

    @Slot(str)
    def open_chat_settings(self, conversation_id: str) -> ChatSettingsDialog | None:
        """The dialog of one conversation's own sampling settings (used from its next reply on)."""
        tab = self.tabs.tab_for(conversation_id)
        if tab is None:
            return None
        if self.chat_settings_dialog is not None:
            self.chat_settings_dialog.reject()
        dialog = ChatSettingsDialog(tab.title, self.settings.sampling, tab.sampling_overrides, self)
        dialog.overrides_chosen.connect(functools.partial(self._set_chat_overrides, conversation_id))
        dialog.finished.connect(self._on_chat_settings_dialog_finished)
        self.chat_settings_dialog = dialog
        dialog.open()
        return dialog

    def _set_chat_overrides(self, conversation_id: str, overrides: dict) -> None:
        tab = self.tabs.tab_for(conversation_id)  # the tab may have been closed while the dialog was open
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

    @Slot(object)
    def apply_settings(self, settings: AppSettings) -> None:
        """Live: the engine takes the new options at once; a new model file is loaded on the worker."""
        old, self.settings = self.settings, settings
        self._save_settings(settings)
        self.client.apply_settings(dict(settings.kv_cache), dict(settings.batching))
        if settings.model_path != old.model_path:
            self.client.load_model(settings.model_path or "")
        if (settings.engines, settings.default_engine) != (
            old.engines,
            old.default_engine,
        ) or self._keys_changed:
            self._keys_changed = False
            self._send_endpoints()
            self._refresh_engine_choices()
        if settings.theme != self.theme.choice:
            self.theme.set_choice(settings.theme)

    def _save_settings(self, settings: AppSettings) -> None:
        self.settings = settings
        try:
            save_settings(settings)
        except SettingsError as exc:
            self.show_error("Settings not saved", f"{exc}\nThey apply until SmallMind closes.")

    def _show_model_label(self) -> None:
        info = self.model_info
        base = " · base model: it continues your text, it was not trained to follow instructions"
        self.model_label.setText(
            f"{Path(info['file_name']).stem} · {info['n_layers']} layers · "
            f"context {info['context_length']:,} · {info['session_token_limit']:,} tokens per tab"
            + (base if info.get("base_model") else "")
        )

    @Slot(dict)
    def _on_worker_settings_applied(self, applied: dict) -> None:
        """The status bar shows the new limit at once; a lower one is said (longer chats get trimmed)."""
        if not self.model_info or "session_token_limit" not in applied:
            return
        old, new = self.model_info["session_token_limit"], applied["session_token_limit"]
        self.model_info.update(session_token_limit=new, bytes_per_token=applied["bytes_per_token"])
        self._show_model_label()
        if self.settings_dialog is not None:
            self.settings_dialog.set_model_info(self.model_info)
        if new < old:
            setting = str(applied.get("limit_setting") or "")
            self.statusBar().showMessage(tab_limit_lowered(new, old, setting), 20_000)

    @Slot(str)
    def _on_worker_settings_rejected(self, message: str) -> None:
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
    def _build_history_actions(self) -> None:
        self.action_toggle_history = self.history.toggleViewAction()
        self.action_toggle_history.setObjectName("actionToggleHistory")
        self.action_toggle_history.setText("&History")
        self.action_toggle_history.setShortcut(QKeySequence("Ctrl+H"))
        self.addAction(self.action_toggle_history)
        self.action_search_history = self._action(
            "actionSearchHistory", "&Search conversations…", self.history.focus_search, "Ctrl+Shift+F"
        )
        view = self.menuBar().addMenu("&View")
        view.addAction(self.action_toggle_history)
        view.addAction(self.action_search_history)
        self.presets = PresetController(
            self, lambda: self.settings.prompt_presets, self._save_presets, self._current_chat_tab
        )
        self.preset_menu = self.presets.menu(self)  # the current tab's, in the Chat menu
        chat = self.menuBar().actions()[0].menu()
        chat.insertMenu(self.action_chat_settings, self.preset_menu)

    def _current_chat_tab(self) -> ChatTab | None:
        tab = self.tabs.currentWidget()
        return tab if isinstance(tab, ChatTab) else None

    def _save_presets(self, presets: dict[str, str]) -> None:
        self._save_settings(self.settings.with_changes(prompt_presets=presets))

    @Slot(str)
    def _on_theme_theme_changed(self, _name: str) -> None:
        """Redo what was painted with the old colors: transcripts, busy tabs, plots, the history list."""
        for tab in self.tabs.chat_tabs:
            tab.transcript.restyle()
        self.tabs.restyle()
        self.stats_dock.restyle()
        self.history.view.viewport().update()

    # -- shutdown -------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:
        self._shutdown()
        event.accept()

    @Slot()
    def _shutdown(self) -> None:
        """Keep the text of replies in progress, stop the engine, join its thread. Runs once."""
        if self._closed:
            return
        self._closed = True
        self.history.commit_pending()  # a delete waiting for its undo time is done now
        self.tabs.save_all()
        self.client.shutdown()
        self.store.close()

    def widget_named(self, name: str) -> QWidget | None:
        return self.findChild(QWidget, name)
