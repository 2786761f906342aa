"""The widgets of a conversation tab and where they sit: header (system prompt, engine, sampling),
transcript, the row of actions under it, the edit banner, attachments, the prompt box and its
buttons. ``ChatTab`` (``tab.py``) connects them to its conversation; a new button goes here first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..colors import colors
from ..engines.engine_picker import EnginePicker
from .attachments import AttachmentList
from .prompt_box import PromptEdit, TokenCount
from .structured_output import CONSTRAINT_KEY
from .transcript import TranscriptView
from .versions import VersionBar

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


class TabWidgets(QWidget):
    """A tab's widgets, laid out; no behaviour (see ``ChatTab``)."""

    def __init__(self, system_prompt: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("chatTab")
        self._build_header(system_prompt)
        self._build_transcript()
        self._build_prompt()
        self._build_buttons()
        self._lay_out()

    def _build_header(self, system_prompt: str) -> None:
        self.system_toggle = QToolButton(objectName="systemPromptToggle")
        self.system_toggle.setCheckable(True)
        self.system_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.system_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.system_toggle.setAutoRaise(True)
        self.system_toggle.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.system_edit = QPlainTextEdit(objectName="systemPromptEdit")
        self.system_edit.setPlainText(system_prompt)
        self.system_edit.setPlaceholderText(
            "The system prompt of this conversation (sent before every turn); empty: the model's own"
        )
        self.system_edit.setMaximumHeight(90)
        self.system_edit.setVisible(False)
        self.settings_button = QToolButton(objectName="chatSettingsButton")
        self.settings_button.setAutoRaise(True)
        self.settings_button.setToolTip("This chat's own sampling settings (temperature, max tokens, …)")
        self.engine_picker = EnginePicker(self)

    def _build_transcript(self) -> None:
        self.transcript = TranscriptView(self)
        self.version_bar = VersionBar()
        self.status_label = QLabel(objectName="tabStatus")
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_label.setWordWrap(True)

    def _build_prompt(self) -> None:
        self.prompt_edit = PromptEdit(objectName="promptEdit")
        self.prompt_edit.setPlaceholderText("Message the model…  (Enter sends, Shift+Enter for a new line)")
        self.prompt_edit.setAccessibleName("Message")
        self.token_count = TokenCount(self.prompt_edit)
        self.attachment_list = AttachmentList(self.prompt_edit)
        self.attach_button = QToolButton(objectName="attachButton")
        self.attach_button.setText("Attach…")
        self.attach_button.setToolTip(
            "Add a text file (code, Markdown, plain text) to the message; you can also drop files on the box"
        )
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

    def _build_buttons(self) -> None:
        self.send_button = QPushButton("Send", objectName="sendButton")
        self.send_button.setDefault(True)
        self.stop_button = QPushButton("Stop", objectName="stopButton")
        self.regenerate_button = QPushButton("Regenerate", objectName="regenerateButton")
        self.regenerate_button.setToolTip("Generate the last reply again (the old one stays: ‹ › switches)")
        self.continue_button = QPushButton("Continue", objectName="continueButton")
        self.continue_button.setToolTip(
            "Go on with the last reply from where it stopped (its token limit, or Stop): the prompt is "
            "not computed again, the reply grows in place"
        )
        self.edit_button = QPushButton("Edit last message", objectName="editLastButton")
        self.edit_button.setToolTip("Put your last message back in the prompt box to change and resend it")
        buttons = (
            self.send_button,
            self.stop_button,
            self.regenerate_button,
            self.continue_button,
            self.edit_button,
        )
        for button in buttons:
            button.setMinimumWidth(96)
        self.fix_button = QPushButton(
            objectName="openSettingsButton"
        )  # shown when a setting caused a problem
        self.raise_button = QPushButton(objectName="raiseLimitButton")

    def _lay_out(self) -> None:
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
        actions_row.addWidget(self.continue_button)
        actions_row.addWidget(self.edit_button)
        actions_row.addWidget(self.version_bar)
        actions_row.addSpacing(12)
        actions_row.addWidget(self.status_label, 1)
        actions_row.addWidget(self.raise_button)
        actions_row.addWidget(self.fix_button)
        header = QHBoxLayout()
        header.addWidget(self.system_toggle, 1)
        header.addWidget(self.engine_picker)
        header.addWidget(self.settings_button)
        self.header_row = header  # the main window adds its presets button here
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 10)
        layout.setSpacing(6)
        layout.addLayout(header)
        layout.addWidget(self.system_edit)
        self.transcript_row = QSplitter(Qt.Orientation.Horizontal)  # documents add their citation panel
        self.transcript_row.setChildrenCollapsible(False)
        self.transcript_row.addWidget(self.transcript)
        layout.addWidget(self.transcript_row, 1)
        layout.addLayout(actions_row)
        layout.addWidget(self.edit_banner)
        layout.addWidget(self.attachment_list)
        layout.addLayout(prompt_row)
