"""One conversation tab: the view of a ``ConversationModel`` (the transcript, the prompt box, the
buttons) and the path of a message from Send to its reply.

The model (``conversation_model.py``, no Qt) holds the entries and writes every change to the
store; this widget shows them and turns clicks into model calls. It talks to the engine only through
its signals (``generation_requested``, ``cancel_requested``); the window's router sends the worker's
answers back to ``show_prompt_progress``, ``append_text``, ``finish_reply`` and ``fail_request``.
Two parts it owns have rooms of their own: ``tab_engine.TabEngine`` (what answers the tab: the engine
picker, its model's state, the chat's sampling and system prompt) and ``tab_edits.MessageEdits``
(editing a sent message, switching versions). ``_connect`` wires every widget to one of the three.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import QTimer, Signal, Slot
from PySide6.QtGui import QResizeEvent, QShowEvent
from PySide6.QtWidgets import QFileDialog, QWidget

from ..history.store import Conversation, ConversationStore, Message
from ..wording import limit_reached, short_status, tab_limit, waiting_reason
from .conversation_model import ConversationModel, Entry
from .tab_controls import ProblemOffer, SystemPromptEditor
from .tab_edits import MessageEdits
from .tab_engine import TabEngine
from .tab_widgets import TabWidgets

RENDER_DELAY_MS = 60  # a streaming reply is re-rendered at most ~16 times a second


class ChatTab(TabWidgets):
    generation_requested = Signal(str, list)  # conversation id, chat messages (system prompt first)
    continue_requested = Signal(str, list)  # conversation id, chat messages (the reply to go on from last)
    cancel_requested = Signal(str)
    chat_settings_requested = Signal(str)  # conversation id: the user wants this chat's own settings
    busy_changed = Signal(str, bool)
    token_count_requested = Signal(str, str)  # conversation id, the prompt box's text
    first_message_sent = Signal(str, str)  # conversation id, the text of its first user message
    settings_requested = Signal(str)  # a setting ("kv_cache.max_bytes_total") the user wants to change
    setting_change_requested = Signal(str, str, int)  # conversation id, setting, value: then send again
    engine_changed = Signal(str, str)  # conversation id, engine id ("local" or an endpoint id)

    def __init__(
        self,
        conversation: Conversation,
        messages: list[Message],
        store: ConversationStore,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(conversation.system_prompt, parent)
        self.model = ConversationModel(conversation, messages, store)
        self.conversation_id = conversation.id
        self.render_pending = False  # a render waits for its timer (or for the tab to be shown)
        self._waiting_offer = False  # the Settings button shown says why the reply waits
        self.system_prompt_editor = SystemPromptEditor(self.system_toggle, self.system_edit, self)
        self.problem = ProblemOffer(self.fix_button, self.raise_button, self)
        self.engine = TabEngine(self)  # the engine picker, its model's state, sampling, system prompt
        self.edits = MessageEdits(self)  # an edit of a sent message, the versions shown
        self._connect()
        self.engine.show_sampling()
        self.update_buttons()
        self.render_now()

    def _connect(self) -> None:
        self.system_prompt_editor.edited.connect(self.engine.use_system_prompt)
        self.system_prompt_editor.save_due.connect(self.engine.save_system_prompt)
        self.problem.settings_wanted.connect(self.settings_requested)
        self.problem.raise_wanted.connect(
            lambda setting, value: self.setting_change_requested.emit(self.conversation_id, setting, value)
        )
        self.settings_button.clicked.connect(lambda: self.chat_settings_requested.emit(self.conversation_id))
        self.engine_picker.engine_picked.connect(self.engine.set_engine)
        self.transcript.copied.connect(lambda _index: self.status_label.setText("Copied to the clipboard."))
        self.transcript.link_refused.connect(
            lambda address: self.status_label.setText(
                f"Only web links (http, https) are opened; not {address[:80]}"
            )
        )
        self.transcript.version_requested.connect(self.edits.select_version)
        self.transcript.edit_requested.connect(self.edits.edit_message)
        self.version_bar.step_requested.connect(self.edits.select_version)
        self.prompt_edit.count_wanted.connect(
            lambda text: self.token_count_requested.emit(self.conversation_id, text)
        )
        self.prompt_edit.submitted.connect(self.send)
        self.prompt_edit.escaped.connect(self.edits.cancel_edit)
        self.attachment_list.count_wanted.connect(
            lambda block: self.token_count_requested.emit(self.conversation_id, block)
        )
        self.attachment_list.refused.connect(self._on_attachment_list_refused)
        self.prompt_edit.files_dropped.connect(self.attachment_list.attach)
        self.attach_button.clicked.connect(self._on_attach_button_clicked)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button.clicked.connect(self.regenerate)
        self.continue_button.clicked.connect(self.continue_reply)
        self.edit_button.clicked.connect(self.edits.edit_last)

    # -- the model's state, as the window and tests read it ------------------------------------------
    @property
    def entries(self) -> list[Entry]:
        return self.model.entries

    @property
    def title(self) -> str:
        return self.model.title

    @title.setter
    def title(self, title: str) -> None:
        self.model.title = title

    @property
    def conversation_settings(self) -> dict[str, Any]:
        return self.model.settings

    @conversation_settings.setter
    def conversation_settings(self, settings: dict[str, Any]) -> None:
        self.model.settings = settings

    @property
    def is_generating(self) -> bool:
        return self.model.is_generating

    @property
    def system_prompt(self) -> str:
        return self.model.system_prompt

    def set_system_prompt(self, text: str) -> None:
        """A new system prompt for this conversation (a preset): shown, used from the next reply, saved."""
        self.system_edit.setPlainText(text)  # textChanged saves it (after a short pause)

    @property
    def sampling_overrides(self) -> dict[str, Any]:
        """The sampling options this chat sets itself (the rest follow the app's settings)."""
        return self.model.sampling_overrides

    def set_sampling_overrides(self, overrides: Mapping[str, Any]) -> None:
        """Use these for the next replies and save them with the conversation (``TabEngine``)."""
        self.engine.set_sampling_overrides(overrides)

    @property
    def saved_engine(self) -> str | None:
        """The engine this conversation remembers (None: never chosen, a new chat)."""
        return self.model.saved_engine

    def set_engine(self, engine_id: str) -> None:
        """Answer with ``engine_id`` from the next reply on; remembered with the conversation
        (``TabEngine``)."""
        self.engine.set_engine(engine_id)

    def chat_messages(self) -> list[dict[str, str]]:
        """What the model sees: the system prompt, then every kept user message and reply."""
        return self.model.chat_messages()

    def update_buttons(self) -> None:
        """Enable what may be done now (nothing but Stop while a reply runs, no new action in an edit)."""
        busy, entries = self.is_generating, self.model.entries
        has_user, free = self.model.has_user_message, not busy and not self.edits.active
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.regenerate_button.setEnabled(free and has_user)
        self.continue_button.setEnabled(free and self.model.can_continue)
        self.edit_button.setEnabled(free and has_user)
        last = next((i for i in range(len(entries) - 1, -1, -1) if entries[i].versions), -1)
        versions = entries[last].versions if last >= 0 else None
        role = entries[last].role if last >= 0 else ""
        self.version_bar.show_versions(last, role, versions, free)
        self.engine_picker.setEnabled(not busy)  # a reply is answered by the engine it was sent to

    def _busy_changed(self) -> None:
        self.update_buttons()
        self.busy_changed.emit(self.conversation_id, self.is_generating)

    # -- user actions ---------------------------------------------------------------------------
    @Slot()
    def send(self) -> None:
        text = self.prompt_edit.toPlainText().strip()
        if not text or self.is_generating:
            return
        if self.edits.active:  # the edit is committed: a new version of the edited message
            self.model.commit_edit(self.edits.end_edit())
        self.problem.show("", None)
        if self.model.add_user_message(text):
            self.first_message_sent.emit(self.conversation_id, text)
        self.prompt_edit.clear()
        self.transcript.jump_to_latest()  # the user's own message and the reply are followed
        self._request_reply()

    @Slot()
    def stop(self) -> None:
        if self.is_generating:
            self.status_label.setText("stopping…")
            self.cancel_requested.emit(self.conversation_id)

    @Slot()
    def regenerate(self) -> None:
        """Drop the last reply (if any) after the last user message and generate it again."""
        if self.is_generating or not self.model.regenerate():  # the old reply stays a version (‹ 2/2 ›)
            return
        self.problem.show("", None)
        self._request_reply()

    @Slot()
    def continue_reply(self) -> None:
        """The last reply (cut by its token limit, or stopped) goes on from where it stopped."""
        if self.is_generating or self.edits.active or not self.model.can_continue:
            return
        self.problem.show("", None)
        messages = self.model.start_continuation()
        self._busy_changed()
        self.status_label.setText("continuing the reply…")
        self.render_now()
        self.continue_requested.emit(self.conversation_id, messages)

    def select_version(self, index: int, step: int) -> None:
        """Show the version ``step`` places from entry ``index``'s (``MessageEdits``)."""
        self.edits.select_version(index, step)

    # -- attachments ----------------------------------------------------------------------------
    @Slot()
    def _on_attach_button_clicked(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self, "Attach text files", "", "All files (*);;Text files (*.txt *.md *.py *.json *.csv *.log)"
        )
        self.attach_files(paths)

    def attach_files(self, paths: list[str]) -> None:
        """Add text files to the message (``AttachmentList.attach``)."""
        self.attachment_list.attach(paths)

    @Slot(str)
    def _on_attachment_list_refused(self, message: str) -> None:
        self.add_notice(message, "error")
        self.set_status(message)

    def _request_reply(self) -> None:
        messages = self.model.start_reply()
        self._busy_changed()
        self.status_label.setText("waiting for the engine…")
        self.render_now()
        self.generation_requested.emit(self.conversation_id, messages)

    # -- from the worker (routed by the window's router) -------------------------------------------
    def show_prompt_progress(self, done: int, total: int) -> None:
        if not self.model.show_progress(done, total):
            return
        self._started()
        self.status_label.setText(
            f"processing prompt {done}/{total}" if done < total else "prompt processed, generating…"
        )
        self.schedule_render()

    def show_waiting(self, kind: str, running: int = 0, limit: int = 0) -> None:
        """The request waits in the queue, for KV memory ("memory": queued behind others, or
        preempted) or for a place in the batch ("batch"): say why, offer the setting; its next
        progress or text puts the usual status back."""
        status, footer, setting = waiting_reason(kind, running, limit)
        if not self.model.show_waiting(footer):
            return
        self.set_status(status)
        self.problem.show(setting, None)
        self._waiting_offer = True
        self.schedule_render()

    def _started(self) -> None:
        """The reply runs (again): the offer made while it waited goes."""
        if self._waiting_offer:
            self._waiting_offer = False
            self.problem.show("", None)

    def append_text(self, text: str, n_tokens: int | None = None) -> None:
        """More text of the reply; ``n_tokens``: the tokens it has so far (kept if the app quits)."""
        if not self.model.add_text(text, n_tokens):
            return
        self._started()
        self.status_label.setText("generating…")
        self.schedule_render()

    def finish_reply(self, result: dict[str, Any]) -> None:
        stats = self.model.finish(result)
        if stats is None:
            return
        self._started()
        self._busy_changed()
        if stats.get("error"):
            self.set_status(f"The reply failed: {stats['error']}")
            self.problem.show(str(result.get("error_setting") or ""), None)
        elif stats["context_trimmed"]:
            self.status_label.setText(
                f"Older messages were left out to fit {tab_limit(stats, trimmed=True)}."
            )
        elif stats["finish_reason"] == "length":
            self.status_label.setText(f"Stopped: {limit_reached(stats)}.")
        else:
            self.status_label.setText("Stopped." if stats["finish_reason"] == "cancelled" else "")
        self.render_now()

    def fail_request(self, message: str, info: Mapping[str, Any] | None = None) -> None:
        """The engine did not take the request (queue full, too long, no model): say so in the tab;
        ``info`` may name the setting that caused it ("setting") and a value that would do ("suggested")."""
        was_generating = self.is_generating
        self.model.refuse(message)
        if was_generating:
            self._busy_changed()
        self.render_now()
        self.set_status(message)
        info = info or {}
        self.problem.show(str(info.get("setting") or ""), info.get("suggested"))

    def set_status(self, text: str) -> None:
        """A long message in one line beside the buttons (all of it in the tooltip and the transcript)."""
        short = short_status(text)
        self.status_label.setText(short)
        self.status_label.setToolTip(text if short != text else "")

    def add_notice(self, text: str, kind: str = "info") -> None:
        self.model.add_notice(text, kind)
        self.render_now()

    def save_pending(self) -> None:
        """Write what waits for a timer (the system prompt being typed): the tab closes or the app quits."""
        self.system_prompt_editor.flush()
        self.model.catch_up()

    def save_partial_now(self) -> None:
        """The tab closes or the app quits while generating: keep the text so far, marked partial."""
        if not self.model.save_partial():
            return
        self.update_buttons()
        self.model.catch_up()
        if self.model.unsaved:
            self.schedule_render()  # the notice that says so

    def show_token_count(self, text: str, n_tokens: int, limit: int) -> None:
        """The worker counted the prompt box's tokens (``text`` is what it counted), or an attachment's."""
        if not self.attachment_list.counted(text, n_tokens, limit):
            self.token_count.show_count(text, n_tokens, limit)

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self.prompt_edit.fit()  # its cap is a share of the tab's height

    # -- rendering ------------------------------------------------------------------------------
    def schedule_render(self) -> None:
        if not self.render_pending:
            self.render_pending = True
            QTimer.singleShot(RENDER_DELAY_MS, self, self._render_if_visible)

    @Slot()
    def _render_if_visible(self) -> None:
        if self.isVisible():
            self.render_now()  # a hidden tab renders when it is shown again (showEvent)

    def render_now(self) -> None:
        self.render_pending = False
        self.transcript.render(self.entries)

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self.render_pending:
            self.render_now()
