"""One conversation tab: the transcript, the prompt box, the buttons, the tab's own system prompt.

The tab owns its conversation's entries in memory and writes every change to the
``ConversationStore`` at once; when a write fails (disk full, read-only) the conversation stays in
memory and the tab says so. It talks to the engine only through its signals
(``generation_requested``, ``cancel_requested``); the main window routes the worker's answers back
to ``show_prompt_progress``, ``append_text``, ``finish_reply`` and ``fail_request``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QResizeEvent, QShowEvent, QTextCursor
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .attachments import AttachmentList
from .engine_picker import ENGINE_KEY, EnginePicker
from .prompt_box import PromptEdit, TokenCount
from .store import Conversation, ConversationStore, Message, StoreError
from .structured_output import CONSTRAINT_KEY, STRUCTURED, schema_of
from .theme import colors
from .transcript import Entry, TranscriptView, limit_reached, tab_limit
from .versions import VersionBar
from .wording import LABELS, mib

log = logging.getLogger(__name__)

RENDER_DELAY_MS = 60  # a streaming reply is re-rendered at most ~16 times a second
SAVE_PARTIAL_EVERY_S = 1.0  # the text of a streaming reply is saved about once a second
SYSTEM_PROMPT_SAVE_DELAY_MS = 600
STATUS_CHARS = 90  # the status line beside the buttons is cut there (the transcript has the whole text)
FINISH_STATUS = {"stop": "complete", "length": "complete", "cancelled": "partial", "timeout": "partial"}


def reply_stats(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers kept with a reply (the store's stats_json)."""
    return {
        "n_tokens": int(result.get("generated_tokens", len(result.get("token_ids", ())))),
        "tokens_per_s": float(result.get("decode_tokens_per_s") or 0.0),
        "ttft_ms": result.get("ttft_ms"),
        "reused_tokens": int(result.get("reused_tokens", 0)),
        "prompt_tokens": int(result.get("prompt_tokens", 0)),
        "finish_reason": str(result.get("finish_reason", "")),
        "total_ms": float(result.get("total_ms") or 0.0),
        "context_trimmed": bool(result.get("context_trimmed", False)),
        **tokens_per_step(result),
        **({"error": str(result["error"])} if result.get("error") else {}),
        **{key: result[key] for key in LIMIT_KEYS if result.get(key) is not None},
    }


def tokens_per_step(result: dict[str, Any]) -> dict[str, float]:
    """{"tokens_per_step": ...} for a reply that verified drafted tokens (speculative decoding)."""
    if not result.get("draft_tokens") or not result.get("decode_steps"):
        return {}
    return {"tokens_per_step": 1.0 + result.get("accepted_draft_tokens", 0) / result["decode_steps"]}


LIMIT_KEYS = ("max_new_tokens", "stopped_by", "session_limit", "limit_setting")


SHORT_NAMES = {
    "max_new_tokens": "max tokens",
    "repetition_penalty": "repetition",
    "max_time_ms": "time limit",
}


def overrides_summary(overrides: Mapping[str, Any]) -> str:
    """A line for the tab: which options this chat sets itself, e.g. 'temperature 0.2 · max tokens 64'."""
    if not overrides:
        return "app defaults"
    parts = []
    for key, value in overrides.items():
        if key == CONSTRAINT_KEY:
            parts.append("JSON schema")
            continue
        shown = ("random" if key == "seed" else "none") if value is None else value
        if isinstance(shown, float):
            shown = f"{shown:g}"
        elif isinstance(shown, list):
            shown = " / ".join(repr(s) for s in shown) or "none"
        parts.append(f"{SHORT_NAMES.get(key, key.replace('_', ' '))} {shown}")
    return " · ".join(parts)


class ChatTab(QWidget):
    generation_requested = Signal(str, list)  # conversation id, chat messages (system prompt first)
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
        super().__init__(parent)
        self.setObjectName("chatTab")
        self.conversation_id = conversation.id
        self.title = conversation.title
        self.conversation_settings = dict(conversation.settings)
        self._store = store
        self.entries = [Entry(m.role, m.content, m.status, dict(m.stats), m.id) for m in messages]
        self._reply: Entry | None = None  # the reply being generated
        self._last_partial_save = 0.0
        self._unsaved = False  # a write failed: the database is behind what the tab shows
        self._render_pending = False
        self._n_streamed = 0  # tokens of the reply being generated, as the worker counted them
        self._edited: Entry | None = None  # the user message being edited
        self._engine_choices: list[tuple[str, str]] = []
        self._build(conversation.system_prompt)
        self._refresh_versions()
        self._update_buttons()
        self.render_now()

    # -- layout ---------------------------------------------------------------------------------
    def _build(self, system_prompt: str) -> None:
        self.system_toggle = QToolButton(objectName="systemPromptToggle")
        self.system_toggle.setCheckable(True)
        self.system_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.system_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.system_toggle.setAutoRaise(True)
        self.system_toggle.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.system_toggle.toggled.connect(self._on_system_toggle_toggled)
        self.system_edit = QPlainTextEdit(objectName="systemPromptEdit")
        self.system_edit.setPlainText(system_prompt)
        self.system_edit.setPlaceholderText("The system prompt of this conversation (sent before every turn)")
        self.system_edit.setMaximumHeight(90)
        self.system_edit.setVisible(False)
        self.system_edit.textChanged.connect(self._on_system_edit_changed)
        self._system_save = QTimer(self, interval=SYSTEM_PROMPT_SAVE_DELAY_MS)
        self._system_save.setSingleShot(True)
        self._system_save.timeout.connect(self._save_system_prompt)

        self.settings_button = QToolButton(objectName="chatSettingsButton")
        self.settings_button.setAutoRaise(True)
        self.settings_button.setToolTip("This chat's own sampling settings (temperature, max tokens, …)")
        self.settings_button.clicked.connect(lambda: self.chat_settings_requested.emit(self.conversation_id))
        self.engine_picker = EnginePicker(self)
        self.engine_picker.engine_picked.connect(self.set_engine)

        self.transcript = TranscriptView(self)
        self.transcript.copied.connect(lambda _index: self.status_label.setText("Copied to the clipboard."))
        self.transcript.link_refused.connect(
            lambda address: self.status_label.setText(
                f"Only web links (http, https) are opened; not {address[:80]}"
            )
        )
        self.transcript.version_requested.connect(self.select_version)
        self.transcript.edit_requested.connect(self.edit_message)
        self.version_bar = VersionBar()
        self.version_bar.step_requested.connect(self.select_version)
        self.status_label = QLabel(objectName="tabStatus")
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_label.setWordWrap(True)

        self.prompt_edit = PromptEdit(objectName="promptEdit")
        self.prompt_edit.setPlaceholderText("Message the model…  (Enter sends, Shift+Enter for a new line)")
        self.prompt_edit.setAccessibleName("Message")
        self.prompt_edit.count_wanted.connect(
            lambda text: self.token_count_requested.emit(self.conversation_id, text)
        )
        self.token_count = TokenCount(self.prompt_edit)
        self.prompt_edit.submitted.connect(self.send)
        self.attachment_list = AttachmentList(self.prompt_edit)
        self.attachment_list.count_wanted.connect(
            lambda block: self.token_count_requested.emit(self.conversation_id, block)
        )
        self.attachment_list.refused.connect(self._on_attachment_list_refused)
        self.prompt_edit.files_dropped.connect(self.attachment_list.attach)
        self.attach_button = QToolButton(objectName="attachButton")
        self.attach_button.setText("Attach…")
        self.attach_button.setToolTip(
            "Add a text file (code, Markdown, plain text) to the message; you can also drop files on the box"
        )
        self.attach_button.clicked.connect(self._on_attach_button_clicked)
        self.prompt_edit.escaped.connect(self.cancel_edit)
        self.edit_banner = QLabel(objectName="editBanner")
        self.edit_banner.setText(
            "Editing your message: Enter sends it as a new version (the old one and what followed it are "
            "kept: ‹ › switches back); Esc cancels."
        )
        self.edit_banner.setWordWrap(True)
        self.edit_banner.setStyleSheet(
            f"background: {colors()['notice']}; color: {colors()['notice_text']}; "
            "padding: 4px 8px; border-radius: 4px;"
        )
        self.edit_banner.setVisible(False)
        self._editing: str | None = None  # the draft the prompt box held before an edit began
        self.send_button = QPushButton("Send", objectName="sendButton")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop", objectName="stopButton")
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button = QPushButton("Regenerate", objectName="regenerateButton")
        self.regenerate_button.setToolTip("Generate the last reply again (the old one stays: ‹ › switches)")
        self.regenerate_button.clicked.connect(self.regenerate)
        self.edit_button = QPushButton("Edit last message", objectName="editLastButton")
        self.edit_button.setToolTip("Put your last message back in the prompt box to change and resend it")
        self.edit_button.clicked.connect(self.edit_last)
        for button in (self.send_button, self.stop_button, self.regenerate_button, self.edit_button):
            button.setMinimumWidth(96)
        self.fix_button = QPushButton(
            objectName="openSettingsButton"
        )  # shown when a setting caused a problem
        self.fix_button.clicked.connect(lambda: self.settings_requested.emit(self._problem[0]))
        self.raise_button = QPushButton(objectName="raiseLimitButton")
        self.raise_button.clicked.connect(self._on_raise_button_clicked)
        self._problem: tuple[str, int | None] = ("", None)  # the setting to change, a value that would do
        self._show_problem("", None)

        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        buttons.addStretch(1)
        buttons.addWidget(self.token_count, 0, Qt.AlignmentFlag.AlignRight)
        prompt_row = QHBoxLayout()
        prompt_row.addWidget(self.attach_button, 0, Qt.AlignmentFlag.AlignBottom)
        prompt_row.addWidget(self.prompt_edit, 1)
        prompt_row.addLayout(buttons)
        actions_row = QHBoxLayout()
        actions_row.addWidget(self.regenerate_button)
        actions_row.addWidget(self.edit_button)
        actions_row.addWidget(self.version_bar)
        actions_row.addSpacing(12)
        actions_row.addWidget(self.status_label, 1)
        actions_row.addWidget(self.raise_button)
        actions_row.addWidget(self.fix_button)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 10)
        layout.setSpacing(6)
        header = QHBoxLayout()
        header.addWidget(self.system_toggle, 1)
        header.addWidget(self.engine_picker)
        header.addWidget(self.settings_button)
        self.header_row = header  # the main window adds its presets button here
        layout.addLayout(header)
        layout.addWidget(self.system_edit)
        layout.addWidget(self.transcript, 1)
        layout.addLayout(actions_row)
        layout.addWidget(self.edit_banner)
        layout.addWidget(self.attachment_list)
        layout.addLayout(prompt_row)
        self._update_system_toggle()
        self._update_settings_button()

    def set_system_prompt(self, text: str) -> None:
        """A new system prompt for this conversation (a preset): shown, used from the next reply, saved."""
        self.system_edit.setPlainText(text)  # textChanged saves it (after a short pause)

    # -- state ----------------------------------------------------------------------------------
    @property
    def is_generating(self) -> bool:
        return self._reply is not None

    @property
    def system_prompt(self) -> str:
        return self.system_edit.toPlainText()

    @property
    def sampling_overrides(self) -> dict[str, Any]:
        """The sampling options this chat sets itself (the rest follow the app's settings)."""
        return dict(self.conversation_settings.get("sampling", {}))

    def set_sampling_overrides(self, overrides: Mapping[str, Any]) -> None:
        """Use these for the next replies and save them with the conversation."""
        settings = {key: value for key, value in self.conversation_settings.items() if key != "sampling"}
        self.conversation_settings = {**settings, "sampling": dict(overrides)} if overrides else settings
        self._update_settings_button()
        self._save(self._store.set_conversation_settings, self.conversation_id, self.conversation_settings)

    @property
    def saved_engine(self) -> str | None:
        """The engine this conversation remembers (None: never chosen, a new chat)."""
        value = self.conversation_settings.get(ENGINE_KEY)
        return value if isinstance(value, str) else None

    def set_engine(self, engine_id: str) -> None:
        """Answer with ``engine_id`` from the next reply on; remembered with the conversation."""
        self.conversation_settings = {**self.conversation_settings, ENGINE_KEY: engine_id}
        self._save(self._store.set_conversation_settings, self.conversation_id, self.conversation_settings)
        if self.engine_picker.engine_id != engine_id:
            self.engine_picker.set_choices(self._engine_choices, engine_id)
        self.engine_changed.emit(self.conversation_id, engine_id)

    def set_engine_choices(self, choices: list[tuple[str, str]]) -> str:
        """The engines to pick from (local first); returns the engine the tab uses now (its saved
        one, or the local engine when that endpoint is gone: the tab says so)."""
        self._engine_choices = list(choices)
        saved = self.saved_engine or choices[0][0]
        if not self.engine_picker.set_choices(choices, saved):
            self.status_label.setText("This chat's server is no longer in Settings → Engines; "
                                      "the local engine answers.")  # fmt: skip
        return self.engine_picker.engine_id

    def chat_messages(self) -> list[dict[str, str]]:
        """What the model sees: the system prompt, then every kept user message and reply."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        for entry in self.entries:
            if entry is self._reply or entry.role not in ("user", "assistant"):
                continue
            if entry.role == "assistant" and not entry.content:
                continue
            messages.append({"role": entry.role, "content": entry.content})
        return messages

    def _update_buttons(self) -> None:
        busy = self.is_generating
        has_user = any(e.role == "user" for e in self.entries)
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.regenerate_button.setEnabled(not busy and has_user and self._editing is None)
        self.edit_button.setEnabled(not busy and has_user and self._editing is None)
        last = next((i for i in range(len(self.entries) - 1, -1, -1) if self.entries[i].versions), -1)
        versions = self.entries[last].versions if last >= 0 else None
        role = self.entries[last].role if last >= 0 else ""
        self.version_bar.show_versions(last, role, versions, not busy and self._editing is None)
        self.engine_picker.setEnabled(not busy)  # a reply is answered by the engine it was sent to

    def _set_busy(self, busy_reply: Entry | None) -> None:
        self._reply = busy_reply
        self._update_buttons()
        self.busy_changed.emit(self.conversation_id, busy_reply is not None)

    # -- user actions ---------------------------------------------------------------------------
    @Slot()
    def send(self) -> None:
        text = self.prompt_edit.toPlainText().strip()
        if not text or self.is_generating:
            return
        if self._editing is not None:  # the edit is committed: a new version of the edited message
            edited = self._edited
            self._end_edit()
            if edited in self.entries:
                self._catch_up()
                self._keep_as_version(self.entries.index(edited))
        self.entries = [e for e in self.entries if e.role != "notice"]
        self._show_problem("", None)
        self._catch_up()
        message = self._save(self._store.add_message, self.conversation_id, "user", text)
        first = not any(e.role == "user" for e in self.entries)
        self.entries.append(Entry("user", text, message_id=message.id if message else None))
        if first:
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
        if self.is_generating:
            return
        last_user = self._last_index("user")
        if last_user is None:
            return
        last = self.entries[last_user]
        self._catch_up()
        self.entries = [e for e in self.entries if e.role != "notice"]
        self._keep_as_version(self.entries.index(last) + 1)  # the old reply stays a version (‹ 2/2 ›)
        self._show_problem("", None)
        self._request_reply()

    @Slot()
    def edit_last(self) -> None:
        """Edit the last user message (``edit_message``)."""
        last_user = self._last_index("user")
        if last_user is not None:
            self.edit_message(last_user)

    @Slot(int)
    def edit_message(self, index: int) -> None:
        """Put user message ``index`` in the prompt box to change it; nothing changes until it is sent
        (then it becomes a new version of that message, the old one and all that followed it kept as
        the previous version); Esc or Cancel edit leaves everything as it was."""
        if not 0 <= index < len(self.entries) or self.entries[index].role != "user":
            return
        if self.is_generating:
            self.status_label.setText("A message can be edited once the reply is done (or stopped).")
            return
        if self._editing is None:
            self._editing = self.prompt_edit.toPlainText()
        for entry in self.entries:
            entry.editing = False
        self._edited = self.entries[index]
        self._edited.editing = True
        self.prompt_edit.setPlainText(self._edited.content)
        self.prompt_edit.moveCursor(QTextCursor.MoveOperation.End)
        self.prompt_edit.setFocus()
        self.edit_banner.setVisible(True)
        self.send_button.setText("Save && send")
        self._update_buttons()
        self.render_now()

    @Slot()
    def cancel_edit(self) -> None:
        """Esc: leave the last message and its reply as they were, give back the draft."""
        if self._editing is None:
            return
        draft = self._editing
        self._end_edit()
        self.prompt_edit.setPlainText(draft)
        self.render_now()

    def _end_edit(self) -> None:
        self._editing = None
        self._edited = None
        for entry in self.entries:
            entry.editing = False
        self.edit_banner.setVisible(False)
        self.send_button.setText("Send")
        self._update_buttons()

    def _last_index(self, role: str) -> int | None:
        return next((i for i in range(len(self.entries) - 1, -1, -1) if self.entries[i].role == role), None)

    def _drop_from(self, index: int) -> None:
        """Remove entries[index:] from memory and their messages from the database."""
        first_stored = next((e.message_id for e in self.entries[index:] if e.message_id is not None), None)
        if first_stored is not None:
            self._save(self._store.delete_messages_from, self.conversation_id, first_stored)
        del self.entries[index:]

    # -- versions -------------------------------------------------------------------------------
    def _keep_as_version(self, index: int) -> None:
        """entries[index:] leave the tab but stay in the store as the older version of their place;
        the next message sent or generated there is the new version."""
        stored = index < len(self.entries) and self.entries[index].message_id is not None
        if not stored or self._unsaved:  # not in the database: nothing to keep
            self._drop_from(index)
            return
        self._save(self._store.start_version, self.conversation_id, self.entries[index].message_id)
        del self.entries[index:]

    @Slot(int, int)
    def select_version(self, index: int, step: int) -> None:
        """Show the version ``step`` places from entry ``index``'s; the conversation continues from it."""
        if self.is_generating or self._editing is not None or self._unsaved:
            self.status_label.setText("Versions can be switched once the reply is done and no edit is open.")
            return
        if not 0 <= index < len(self.entries) or self.entries[index].message_id is None:
            return
        if self._save(self._store.select_version, self.conversation_id, self.entries[index].message_id, step):
            self._reload()
            number, count = self.entries[index].versions or (1, 1)
            what = "reply" if self.entries[index].role == "assistant" else "message"
            self.status_label.setText(f"Showing version {number} of {count} of this {what}.")

    def _reload(self) -> None:
        """The conversation as stored (after a version switch); notices go."""
        try:
            messages = self._store.messages(self.conversation_id)
        except StoreError as exc:
            log.warning("cannot reload conversation %s: %s", self.conversation_id, exc)
            return
        self.entries = [Entry(m.role, m.content, m.status, dict(m.stats), m.id) for m in messages]
        self._refresh_versions()
        self.render_now()

    def _refresh_versions(self) -> None:
        """Mark each entry that has versions with (its number, how many); updates the version bar."""
        try:
            info = self._store.version_info(self.conversation_id)
        except StoreError as exc:
            log.warning("cannot read the versions of %s: %s", self.conversation_id, exc)
            info = {}
        for entry in self.entries:
            entry.versions = info.get(entry.message_id) if entry.message_id is not None else None
        self._update_buttons()

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
        self._set_status(message)

    def _request_reply(self) -> None:
        messages = self.chat_messages()
        last_user = self._last_index("user")
        stored = None  # a question that could not be saved keeps its reply in memory too (no orphan reply)
        if last_user is None or self.entries[last_user].message_id is not None:
            stored = self._save(self._store.add_message, self.conversation_id, "assistant", "", "streaming")
        reply = Entry("assistant", "", "streaming", message_id=stored.id if stored else None)
        if schema_of(self.sampling_overrides) is not None:  # generated under the chat's JSON schema
            reply.stats = {STRUCTURED: True}
        self.entries.append(reply)
        self._last_partial_save = time.monotonic()
        self._n_streamed = 0
        self._set_busy(reply)
        self._refresh_versions()
        self.status_label.setText("waiting for the engine…")
        self.render_now()
        self.generation_requested.emit(self.conversation_id, messages)

    # -- from the worker (routed by the main window) ---------------------------------------------
    def show_prompt_progress(self, done: int, total: int) -> None:
        if self._reply is None:
            return
        self._reply.progress = (done, total)
        self.status_label.setText(
            f"processing prompt {done}/{total}" if done < total else "prompt processed, generating…"
        )
        self.schedule_render()

    def show_waiting_for_memory(self) -> None:
        """The request waits for KV memory (queued behind others, or preempted): say so, not
        "generating"; its next progress or text puts the usual status back."""
        if self._reply is not None:
            self.status_label.setText("waiting for memory…")

    def append_text(self, text: str, n_tokens: int | None = None) -> None:
        """More text of the reply; ``n_tokens``: the tokens it has so far (kept if the app quits)."""
        if self._reply is None:
            return
        self._reply.content += text
        self._reply.progress = None
        if n_tokens is not None:
            self._n_streamed = n_tokens
        self.status_label.setText("generating…")
        now = time.monotonic()
        if self._reply.message_id is not None and now - self._last_partial_save >= SAVE_PARTIAL_EVERY_S:
            self._last_partial_save = now
            self._save(
                self._store.update_message,
                self._reply.message_id,
                content=self._reply.content,
                stats={"n_tokens": self._n_streamed},  # a crash keeps the count with the text
            )
        self.schedule_render()

    def finish_reply(self, result: dict[str, Any]) -> None:
        reply = self._reply
        if reply is None:
            return
        stats = reply_stats(result) | ({STRUCTURED: True} if reply.stats.get(STRUCTURED) else {})
        reply.content = str(result.get("text", reply.content))
        reply.stats, reply.progress = stats, None
        reply.status = FINISH_STATUS.get(stats["finish_reason"], "error")
        if reply.message_id is not None:
            self._save(
                self._store.update_message,
                reply.message_id,
                content=reply.content,
                status=reply.status,
                stats=stats,
            )
        self._set_busy(None)
        self._catch_up()
        if stats.get("error"):
            self._set_status(f"The reply failed: {stats['error']}")
            self._show_problem(str(result.get("error_setting") or ""), None)
        elif stats["context_trimmed"]:
            self.status_label.setText(f"Older messages were left out to fit {tab_limit(stats)}.")
        elif stats["finish_reason"] == "length":
            self.status_label.setText(f"Stopped: {limit_reached(stats)}.")
        else:
            self.status_label.setText("Stopped." if stats["finish_reason"] == "cancelled" else "")
        self.render_now()

    def fail_request(self, message: str, info: Mapping[str, Any] | None = None) -> None:
        """The engine did not take the request (queue full, too long, no model): say so in the tab;
        ``info`` may name the setting that caused it ("setting") and a value that would do ("suggested")."""
        reply = self._reply
        if reply is not None:
            if reply.message_id is not None:
                self._save(self._store.delete_messages_from, self.conversation_id, reply.message_id)
            self.entries.remove(reply)
            self._set_busy(None)
            if reply.message_id is not None and not self._unsaved:
                self._reload()  # a regenerated reply that failed: the one it replaced is chosen again
        self.add_notice(message, "error")
        self._set_status(message)
        info = info or {}
        self._show_problem(str(info.get("setting") or ""), info.get("suggested"))

    def _show_problem(self, setting: str, suggested: int | None) -> None:
        """Offer the buttons that fix the last problem: open Settings at ``setting``, or raise it."""
        self._problem = (setting, suggested)
        key = setting.split(".", 1)[-1]
        self.fix_button.setText(f"Settings: {LABELS.get(key, key)}…")
        self.fix_button.setToolTip("Open Settings at the setting that caused this")
        self.fix_button.setVisible(bool(setting))
        if suggested:
            shown = mib(suggested) if "bytes" in key else f"{suggested:,} tokens"
            self.raise_button.setText(f"Raise to {shown} and send")
            self.raise_button.setToolTip(
                f"Set “{LABELS.get(key, key)}” to {shown} and send the message again"
            )
        self.raise_button.setVisible(bool(setting and suggested))

    @Slot()
    def _on_raise_button_clicked(self) -> None:
        setting, suggested = self._problem
        if setting and suggested:
            self._show_problem("", None)
            self.setting_change_requested.emit(self.conversation_id, setting, int(suggested))

    def _set_status(self, text: str) -> None:
        """A long message in one line beside the buttons (all of it in the tooltip and the transcript)."""
        short = text if len(text) <= STATUS_CHARS else text[: STATUS_CHARS - 1].rsplit(" ", 1)[0] + "…"
        self.status_label.setText(short)
        self.status_label.setToolTip(text if short != text else "")

    def add_notice(self, text: str, kind: str = "info") -> None:
        self.entries.append(Entry("notice", text, kind))
        self.render_now()

    def save_pending(self) -> None:
        """Write what waits for a timer (the system prompt being typed): the tab closes or the app quits."""
        if self._system_save.isActive():
            self._system_save.stop()
            self._save_system_prompt()
        self._catch_up()

    def save_partial_now(self) -> None:
        """The tab closes or the app quits while generating: keep the text so far, marked partial."""
        reply = self._reply
        if reply is None:
            return
        reply.status = "partial"
        reply.stats = {"finish_reason": "cancelled", "n_tokens": self._n_streamed}
        if reply.message_id is not None:
            self._save(
                self._store.update_message,
                reply.message_id,
                content=reply.content,
                status="partial",
                stats=reply.stats,
            )
        self._reply = None
        self._update_buttons()
        self._catch_up()

    # -- store ----------------------------------------------------------------------------------
    def _save(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One store write; on failure the conversation stays in memory and the tab says why."""
        try:
            return write(*args, **kwargs)
        except (StoreError, KeyError) as exc:
            log.warning("store write failed: %s", exc)
            self._unsaved = True
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            self.entries.append(
                Entry("notice", f"{detail}. This conversation is kept in memory only for now.", "error")
            )
            self.schedule_render()
            return None

    def _catch_up(self) -> None:
        """After a failed write, once writing works again (space freed, file writable): store the
        conversation as the tab shows it, so nothing typed or generated meanwhile is lost."""
        if not self._unsaved or self._reply is not None:
            return
        kept = [e for e in self.entries if e.role in ("user", "assistant")]
        try:
            stored = self._store.replace_messages(
                self.conversation_id,
                [(e.role, e.content, e.status, e.stats) for e in kept],
                system_prompt=self.system_prompt,
                settings=self.conversation_settings,
            )
        except (StoreError, KeyError) as exc:  # still failing: the tab's notice already says so
            log.info("conversation %s still not saved: %s", self.conversation_id, exc)
            return
        for entry, message in zip(kept, stored, strict=True):
            entry.message_id = message.id
        self._unsaved = False
        self._refresh_versions()  # stored again as one thread: no versions
        log.info("conversation %s saved again (%d messages)", self.conversation_id, len(stored))

    @Slot()
    def _on_system_edit_changed(self) -> None:
        self._update_system_toggle()
        self._system_save.start()

    @Slot()
    def _save_system_prompt(self) -> None:
        self._save(self._store.set_system_prompt, self.conversation_id, self.system_prompt)

    @Slot(bool)
    def _on_system_toggle_toggled(self, shown: bool) -> None:
        self.system_edit.setVisible(shown)
        self.system_toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)
        if shown:
            self.system_edit.setFocus()

    def _update_system_toggle(self) -> None:
        text = " ".join(self.system_prompt.split()) or "(none)"
        short = text if len(text) <= 90 else text[:87] + "…"
        self.system_toggle.setText(f"System prompt: {short}")
        self.system_toggle.setToolTip("Show or edit this conversation's system prompt")

    def _update_settings_button(self) -> None:
        summary = overrides_summary(self.sampling_overrides)
        short = summary if len(summary) <= 60 else summary[:57] + "…"
        self.settings_button.setText(f"Sampling: {short}")

    def show_token_count(self, text: str, n_tokens: int, limit: int) -> None:
        """The worker counted the prompt box's tokens (``text`` is what it counted), or an attachment's."""
        if not self.attachment_list.counted(text, n_tokens, limit):
            self.token_count.show_count(text, n_tokens, limit)

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self.prompt_edit.fit()  # its cap is a share of the tab's height

    # -- rendering ------------------------------------------------------------------------------
    def schedule_render(self) -> None:
        if not self._render_pending:
            self._render_pending = True
            QTimer.singleShot(RENDER_DELAY_MS, self, self._render_if_visible)

    @Slot()
    def _render_if_visible(self) -> None:
        if self.isVisible():
            self.render_now()  # a hidden tab renders when it is shown again (showEvent)

    def render_now(self) -> None:
        self._render_pending = False
        self.transcript.render(self.entries)

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._render_pending:
            self.render_now()
