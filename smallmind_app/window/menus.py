"""The main window's menus and their shortcuts: Chat, Tools, View, and the tabs' "+" button.

Each action is a window attribute (``action_new``, ``action_settings``, ...) with an objectName, so
tests and the keyboard reach the same thing a click does; what an action does is the window's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QToolButton

if TYPE_CHECKING:
    from .main_window import MainWindow


def _action(window: MainWindow, name: str, text: str, slot: Any, shortcut: str | None = None) -> QAction:
    action = QAction(text, window, objectName=name)
    if shortcut is not None:
        action.setShortcut(QKeySequence(shortcut))
    action.triggered.connect(slot)
    window.addAction(action)
    return action


def build_menus(window: MainWindow) -> None:
    """The actions, the menu bar's menus and the "+" (new chat) corner button of ``window``."""
    w = window
    w.action_new = _action(w, "actionNewChat", "&New chat", w.new_chat, "Ctrl+T")
    w.action_close = _action(w, "actionCloseChat", "&Close chat", w.close_current_tab, "Ctrl+W")
    w.action_rename = _action(w, "actionRenameChat", "&Rename chat…", w.rename_current_tab, "F2")
    w.action_export = _action(w, "actionExportChat", "&Export to Markdown…", w.export_current_tab)
    w.action_delete = _action(w, "actionDeleteChat", "&Delete conversation…", w.ask_delete_current_tab)
    w.action_chat_settings = _action(
        w, "actionChatSettings", "Chat sa&mpling…", w.open_current_chat_settings, "Ctrl+Shift+,"
    )
    w.action_settings = _action(w, "actionSettings", "&Settings…", lambda: w.open_settings(), "Ctrl+,")
    w.action_models = _action(w, "actionModels", "&Models…", lambda: w.open_models())
    w.action_local_server = _action(w, "actionLocalServer", "&Local server…", lambda: w.open_local_server())
    w.action_quit = _action(w, "actionQuit", "&Quit", w.close, "Ctrl+Q")
    chat = w.chat_menu = w.menuBar().addMenu("&Chat")
    for action in (w.action_new, w.action_close, w.action_rename):
        chat.addAction(action)
    w.reopen_menu = chat.addMenu("Re&open conversation")
    w.reopen_menu.setObjectName("reopenMenu")
    w.reopen_menu.aboutToShow.connect(lambda: w.tabs.fill_reopen_menu(w.reopen_menu))
    chat.addSeparator()
    chat.addAction(w.action_chat_settings)
    chat.addAction(w.action_export)
    chat.addAction(w.action_delete)
    chat.addSeparator()
    chat.addAction(w.action_quit)
    tools = w.tools_menu = w.menuBar().addMenu("&Tools")
    tools.addAction(w.action_models)
    tools.addAction(w.action_local_server)
    tools.addAction(w.action_settings)
    dock_action = w.stats_dock.toggleViewAction()
    dock_action.setText("Engine &stats")
    dock_action.setShortcut(QKeySequence("Ctrl+Shift+S"))
    tools.addAction(dock_action)
    plus = QToolButton(objectName="newChatButton", text=" + ")
    plus.setAutoRaise(True)
    plus.setToolTip("New chat (Ctrl+T)")
    plus.clicked.connect(w.new_chat)
    w.tabs.setCornerWidget(plus, Qt.Corner.TopRightCorner)
    _build_view_menu(w)


def _build_view_menu(w: MainWindow) -> None:
    w.action_toggle_history = w.history.toggleViewAction()
    w.action_toggle_history.setObjectName("actionToggleHistory")
    w.action_toggle_history.setText("&History")
    w.action_toggle_history.setShortcut(QKeySequence("Ctrl+H"))
    w.addAction(w.action_toggle_history)
    w.action_search_history = _action(
        w, "actionSearchHistory", "&Search conversations…", w.history.focus_search, "Ctrl+Shift+F"
    )
    view = w.menuBar().addMenu("&View")
    view.addAction(w.action_toggle_history)
    view.addAction(w.action_search_history)
