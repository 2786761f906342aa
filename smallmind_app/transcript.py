"""The transcript of one conversation: a QTextBrowser showing the messages as chat bubbles.

Assistant replies are Markdown (Qt's own parser, ``QTextDocument.setMarkdown``) with monospace code
blocks on a grey background; user messages are plain text. Every bubble has a "Copy" link (the raw
text goes to the clipboard) and every reply a line of numbers: tokens, tokens/s, time to first
token, tokens reused from the KV cache. Each entry's HTML is cached, so while a reply streams only
that reply is converted again, and ``render`` is throttled by the tab.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QByteArray, Qt, QTimer, QUrl, Signal, Slot
from PySide6.QtGui import (
    QDesktopServices,
    QGuiApplication,
    QResizeEvent,
    QShowEvent,
    QTextCursor,
    QTextDocument,
)
from PySide6.QtWidgets import QMessageBox, QTextBrowser, QToolButton, QWidget

from .theme import colors
from .wording import LABELS

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.S)
_IMAGE = re.compile(r"<img\b[^>]*>")
_ALT = re.compile(r'\balt="([^"]*)"')

COPIED_SHOWN_MS = 1500
FINISH_NOTES = {
    "cancelled": "stopped",
    "timeout": "stopped: time limit",
    "error": "failed",
}


@dataclass(eq=False)
class Entry:
    """One bubble: a stored message, the reply being generated, or a notice (never sent to the model)."""

    role: str  # "user", "assistant" or "notice"
    content: str
    status: str = "complete"  # complete | partial | streaming | error (notices: info | error)
    stats: dict[str, Any] = field(default_factory=dict)
    message_id: int | None = None  # None: not in the database (a notice, or a failed save)
    progress: tuple[int, int] | None = None  # prompt tokens processed / total, while prefilling
    editing: bool = False  # the user is changing this message in the prompt box
    copied: bool = False  # its text just went to the clipboard ("Copied ✓" for a moment)

    def cache_key(self) -> tuple[Any, ...]:
        stats = tuple(sorted(self.stats.items()))
        return (self.role, self.content, self.status, stats, self.progress, self.editing, self.copied)


def sanitize(text: str) -> str:
    """Drop control characters a model may emit (they render as boxes or break the layout)."""
    return _CONTROL_CHARS.sub("", text)


MARKDOWN_NO_HTML = QTextDocument.MarkdownFeature(
    QTextDocument.MarkdownFeature.MarkdownDialectGitHub.value
    | QTextDocument.MarkdownFeature.MarkdownNoHTML.value
)
LINK_SCHEMES = ("http", "https")  # the only links of a reply that are opened (in the browser)


def markdown_html(text: str) -> str:
    """Markdown -> the HTML body Qt renders, with code blocks on a grey background.

    A reply is untrusted text (a downloaded model, a remote server): raw HTML in it is shown as
    text, never rendered, so a reply cannot style itself as a "You" message or a notice.
    """
    document = QTextDocument()
    document.setMarkdown(sanitize(text), MARKDOWN_NO_HTML)
    match = _BODY.search(document.toHtml())
    body = match.group(1) if match else html.escape(text)
    body = _IMAGE.sub(lambda m: html.escape(f"[image: {_alt(m[0])}]"), body)  # nothing is loaded
    return body.replace('<pre style="', f'<pre style=" background-color:{colors()["code"]};')


def _alt(tag: str) -> str:
    match = _ALT.search(tag)
    return html.unescape(match[1]) if match and match[1] else "no description"


def plain_html(text: str) -> str:
    escaped = html.escape(sanitize(text)).replace("\n", "<br />")
    return f'<p style="margin:0px; white-space:pre-wrap;">{escaped}</p>'


def stats_line(stats: dict[str, Any]) -> str:
    """'42 tokens · 18.3 tokens/s · first token 120 ms · 96 tokens reused from cache'."""
    parts = []
    if "n_tokens" in stats:
        parts.append(f"{stats['n_tokens']} tokens")
    if stats.get("tokens_per_s"):
        parts.append(f"{stats['tokens_per_s']:.1f} tokens/s")
    if stats.get("tokens_per_step"):
        parts.append(f"{stats['tokens_per_step']:.1f} tokens per step")
    if stats.get("ttft_ms") is not None:
        parts.append(f"first token {stats['ttft_ms']:.0f} ms")
    if "reused_tokens" in stats:
        parts.append(f"{stats['reused_tokens']} of {stats.get('prompt_tokens', '?')} prompt tokens reused")
    reason = str(stats.get("finish_reason", ""))
    note = limit_reached(stats) if reason == "length" else FINISH_NOTES.get(reason)
    if note:
        parts.append(f"stopped: {note}" if reason == "length" else note)
    if stats.get("context_trimmed"):
        parts.append(f"older messages trimmed to fit {tab_limit(stats)}")
    return " · ".join(parts)


def tab_limit(stats: dict[str, Any]) -> str:
    """'the model's context', or 'the 273 tokens a tab may hold (“Memory limit per session”)'."""
    setting = str(stats.get("limit_setting") or "")
    if not setting or "session_limit" not in stats:
        return "the model's context"
    label = LABELS.get(setting.split(".", 1)[1], setting)
    return f"the {int(stats['session_limit']):,} tokens a tab may hold (set by “{label}”)"


def limit_reached(stats: dict[str, Any]) -> str:
    """Which limit ended a reply: its max new tokens, or a full tab."""
    if stats.get("stopped_by") == "session":
        return f"the conversation reached {tab_limit(stats)}"
    if stats.get("max_new_tokens"):
        return f"“{LABELS['max_new_tokens']}” ({int(stats['max_new_tokens']):,}) reached"
    return "the token limit"


def entry_html(index: int, entry: Entry) -> str:
    muted = colors()["muted"]
    if entry.role == "notice":
        color = colors()["error"] if entry.status == "error" else colors()["notice"]
        return (
            f'<table width="100%" cellpadding="8" cellspacing="0" bgcolor="{color}" '
            f'style="margin-top:6px; margin-bottom:6px;"><tr><td>{plain_html(entry.content)}</td></tr>'
            "</table>"
        )
    user = entry.role == "user"
    name = "You" if user else "Assistant"
    name_color = colors()["user_name"] if user else colors()["assistant_name"]
    if user:
        body = plain_html(entry.content)
    elif entry.content:
        body = markdown_html(entry.content)
    else:
        body = ""
    footer = ""
    if entry.status == "streaming":
        if entry.progress is not None and entry.progress[0] < entry.progress[1]:
            footer = f"processing prompt {entry.progress[0]}/{entry.progress[1]}…"
        else:
            footer = "generating…" if entry.content else "waiting for the engine…"
    elif not user:
        footer = stats_line(entry.stats)
        if entry.stats.get("error"):
            footer += f"<br />{html.escape(str(entry.stats['error']))}"
        elif entry.status == "partial" and "finish_reason" not in entry.stats:
            n_tokens = f"{entry.stats['n_tokens']} tokens · " if entry.stats.get("n_tokens") else ""
            footer = f"{n_tokens}interrupted (the app closed while this reply was generated)"
    copy = "Copied ✓" if entry.copied else "Copy"
    editing = (
        f'&nbsp;&nbsp;<span style="color:{colors()["editing"]};">being edited below (Esc cancels)</span>'
        if entry.editing
        else ""
    )
    header = (
        f'<p style="margin:0px 0px 4px 0px;"><span style="color:{name_color}; font-weight:600;">{name}</span>'
        f'&nbsp;&nbsp;<a href="copy:{index}" style="color:{muted}; text-decoration:none;">{copy}</a>'
        f"{editing}</p>"
    )
    foot = (
        f'<p style="margin:6px 0px 0px 0px; color:{muted}; font-size:small;">{footer}</p>' if footer else ""
    )
    bg = colors()["error"] if entry.status == "error" else colors()["user" if user else "assistant"]
    return (
        f'<table width="100%" cellpadding="10" cellspacing="0" bgcolor="{bg}" '
        f'style="margin-top:6px; margin-bottom:6px;"><tr><td>{header}{body}{foot}</td></tr></table>'
    )


class TranscriptView(QTextBrowser):
    """Read-only view of a list of entries; ``render`` rebuilds only the entries that changed.

    It follows the conversation like every chat app: while the user is at the bottom (``following``)
    the view stays there as a reply grows (also when the layout grows later, ``rangeChanged``);
    scrolling up stops following and shows the "Jump to latest" button, which scrolls back down.
    """

    copied = Signal(int)  # index of the entry whose text went to the clipboard
    following_changed = Signal(bool)
    link_refused = Signal(str)  # a link of a reply that is not opened (not http/https): its address

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("transcriptView")
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setAccessibleName("Conversation transcript")
        self.document().setDocumentMargin(12)
        self._entries: list[Entry] = []
        self._cache: dict[int, tuple[tuple[Any, ...], str]] = {}
        self._rendering = False
        self.following = True
        self.blocked_resources: list[str] = []  # what a reply asked to load (nothing is)
        self.jump_button = QToolButton(self, objectName="jumpToLatestButton")
        self.jump_button.setText("↓ Jump to latest")
        self.jump_button.setToolTip("Scroll to the newest message and follow the reply again")
        self.jump_button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.jump_button.setStyleSheet(
            "QToolButton { background: #1d4ed8; color: white; border-radius: 12px; padding: 4px 12px; }"
        )
        self.jump_button.clicked.connect(self.jump_to_latest)
        self.jump_button.hide()
        bar = self.verticalScrollBar()
        bar.valueChanged.connect(self._on_scroll_bar_value_changed)
        bar.rangeChanged.connect(self._on_scroll_bar_range_changed)
        self.anchorClicked.connect(self._on_anchor_clicked)

    # -- following the latest message ---------------------------------------------------------
    def at_bottom(self) -> bool:
        bar = self.verticalScrollBar()
        return bar.value() >= bar.maximum() - 4

    @Slot()
    def jump_to_latest(self) -> None:
        self._set_following(True)
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def _set_following(self, following: bool) -> None:
        self.jump_button.setVisible(not following)
        if following != self.following:
            self.following = following
            self.following_changed.emit(following)
        self._place_jump_button()

    @Slot(int)
    def _on_scroll_bar_value_changed(self, _value: int) -> None:
        if not self._rendering:  # the user scrolled (wheel, keys, drag): follow only at the bottom
            self._set_following(self.at_bottom())

    @Slot(int, int)
    def _on_scroll_bar_range_changed(self, _minimum: int, maximum: int) -> None:
        if self.following:  # the document grew (a reply, a late layout pass): stay at the bottom
            self._rendering, was = True, self._rendering
            self.verticalScrollBar().setValue(maximum)
            self._rendering = was

    def _place_jump_button(self) -> None:
        hint = self.jump_button.sizeHint()
        viewport = self.viewport().geometry()
        self.jump_button.setGeometry(
            viewport.right() - hint.width() - 16,
            viewport.bottom() - hint.height() - 12,
            hint.width(),
            hint.height(),
        )
        self.jump_button.raise_()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._place_jump_button()
        if self.following:
            self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def showEvent(self, event: QShowEvent) -> None:
        self._rendering = True  # QTextEdit scrolls to the text cursor (the top) on its first show
        try:
            super().showEvent(event)
        finally:
            self._rendering = False
        if self.following:  # a restored or switched-to tab shows its latest message
            self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def render(self, entries: list[Entry]) -> None:
        self._entries = list(entries)
        parts = []
        for index, entry in enumerate(self._entries):
            key = entry.cache_key()
            cached = self._cache.get(index)
            if cached is None or cached[0] != key:
                cached = (key, entry_html(index, entry))
                self._cache[index] = cached
            parts.append(cached[1])
        for stale in [i for i in self._cache if i >= len(self._entries)]:
            del self._cache[stale]
        bar = self.verticalScrollBar()
        position = bar.value()
        cursor = self.textCursor()
        selection = (cursor.anchor(), cursor.position()) if cursor.hasSelection() else None
        before = self.toPlainText() if selection else ""
        self._rendering = True
        try:
            self.setHtml("".join(parts) if parts else self._placeholder())
            if selection is not None:  # a streaming reply must not take away what the user is selecting
                self._restore_selection(*selection, before)
            bar.setValue(bar.maximum() if self.following else position)
        finally:
            self._rendering = False

    def _restore_selection(self, anchor: int, position: int, before: str) -> None:
        """Select ``anchor``..``position`` again when the text up to there is unchanged."""
        end = max(anchor, position)
        if self.toPlainText()[:end] != before[:end]:
            return
        cursor = QTextCursor(self.document())
        cursor.setPosition(anchor)
        cursor.setPosition(position, QTextCursor.MoveMode.KeepAnchor)
        self.setTextCursor(cursor)

    def copy_entry(self, index: int) -> None:
        """The entry's text to the clipboard; its link says "Copied ✓" for a moment."""
        if 0 <= index < len(self._entries):
            entry = self._entries[index]
            QGuiApplication.clipboard().setText(entry.content)
            entry.copied = True
            self.render(self._entries)
            QTimer.singleShot(COPIED_SHOWN_MS, self, lambda: self._uncopy(entry))
            self.copied.emit(index)

    def _uncopy(self, entry: Entry) -> None:
        entry.copied = False
        if entry in self._entries:
            self.render(self._entries)

    def _placeholder(self) -> str:
        return (
            f'<p align="center" style="color:{colors()["muted"]}; margin-top:40px;">'
            "Type a message below and press Enter.<br />Shift+Enter starts a new line.</p>"
        )

    def loadResource(self, kind: int, name: QUrl) -> Any:
        """Nothing is loaded for a reply: no local files, no network (an image shows as its text)."""
        self.blocked_resources.append(name.toString())
        return QByteArray()  # not None: for None, QTextDocument reads a local file itself

    @Slot(QUrl)
    def _on_anchor_clicked(self, url: QUrl) -> None:
        if url.scheme() == "copy":
            self.copy_entry(int(url.path() or -1))
        elif url.scheme() in LINK_SCHEMES and url.host():
            self.ask_to_open(url)
        else:
            self.link_refused.emit(url.toString())

    def ask_to_open(self, url: QUrl) -> QMessageBox:
        """Show the address before it goes to the browser; Cancel is the default button."""
        address = url.toString(QUrl.ComponentFormattingOption.FullyEncoded)
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "Open link",
            f"Open this address in your browser?\n\n{address}",
            QMessageBox.StandardButton.Open | QMessageBox.StandardButton.Cancel,
            self,
        )
        box.setObjectName("openLinkDialog")
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.accepted.connect(lambda: open_in_browser(QUrl(address)))
        box.open()
        return box


def open_in_browser(url: QUrl) -> bool:
    """The system's browser (tests replace this)."""
    return QDesktopServices.openUrl(url)
