"""The transcript of one conversation: a QTextBrowser showing the messages as chat bubbles.

Assistant replies are Markdown (``code_blocks``: Qt's parser for prose, tables and lists, Pygments
for fenced code blocks, each with its language and a Copy link); user messages are plain text. Every
bubble has a "Copy" link (the raw text goes to the clipboard), a user message an "Edit" link, a
message with versions ‹ 2/3 › under it, and every reply a line of numbers: tokens, tokens/s, time to
first token, tokens reused from the KV cache. Each entry's HTML is cached, so while a reply streams
only that reply is converted again (and only its last part: ``code_blocks`` caches the others), and
``render`` is throttled by the tab. Every color comes from ``theme.colors()``.

The app's own links (Copy, Edit, ‹ ›, a code block's Copy) carry a scheme made of a secret drawn
for each view (``app-<random hex>:edit/0``): a reply cannot spell one, so text in a message never
triggers an action; every other link keeps the rule for links from replies (http(s) only, opened
after the address is shown)."""

from __future__ import annotations

import html
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QByteArray, Qt, QTimer, QUrl, Signal, Slot
from PySide6.QtGui import (
    QDesktopServices,
    QGuiApplication,
    QResizeEvent,
    QShowEvent,
    QTextCursor,
    QTextFrame,
)
from PySide6.QtWidgets import QMessageBox, QTextBrowser, QToolButton, QWidget

from .code_blocks import CodeBlock, code_block_html, code_blocks, prose_html, sanitize, split_markdown
from .theme import colors
from .wording import LABELS

log = logging.getLogger(__name__)

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
    versions: tuple[int, int] | None = None  # (this one, how many) when the message has other versions
    copied_block: int = -1  # the code block whose text just went to the clipboard

    def cache_key(self) -> tuple[Any, ...]:
        stats = tuple(sorted(self.stats.items()))
        return (
            self.role, self.content, self.status, stats, self.progress, self.editing, self.copied,
            self.versions, self.copied_block, tuple(colors().items()),
        )  # fmt: skip


def new_link_scheme() -> str:
    """A scheme for one view's own links that no message can know (64 random bits)."""
    return f"app-{secrets.token_hex(8)}"


def action_href(scheme: str, action: str, *numbers: int) -> str:
    """The href of one of the app's own links: ``<scheme>:<action>/<n>/<n>``."""
    return f"{scheme}:{action}/" + "/".join(str(n) for n in numbers)


def markdown_html(
    text: str, index: int = 0, copied_block: int = -1, bubble: str = "", scheme: str = "app"
) -> list[str]:
    """A reply's Markdown -> HTML parts: prose (one string) and fenced code blocks (a table each, with
    a Copy link ``<scheme>:copycode/<index>/<block>``); see ``code_blocks``."""
    parts: list[str] = []
    n_blocks = 0
    for part in split_markdown(text):
        if isinstance(part, CodeBlock):
            href = action_href(scheme, "copycode", index, n_blocks)
            tables = code_block_html(part, href, copied_block == n_blocks, bubble)
            parts.extend(CODE_MARK + table for table in tables)
            n_blocks += 1
        else:
            parts.append(prose_html(part))
    return parts


CODE_MARK = "<!--code-->"  # starts a part that is a table of its own (a code block)
LINK_SCHEMES = ("http", "https")  # the only links of a reply that are opened (in the browser)


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


def entry_html(index: int, entry: Entry, scheme: str = "app") -> str:
    return "".join(entry_chunks(index, entry, scheme))


def entry_chunks(index: int, entry: Entry, scheme: str = "app") -> list[str]:
    """The entry's HTML as top-level tables (a bubble's prose, each code block, ...), in order;
    ``scheme``: the view's own links' (``new_link_scheme``)."""
    if entry.role == "notice":
        color = colors()["error"] if entry.status == "error" else colors()["notice"]
        return [
            f'<table width="100%" cellpadding="8" cellspacing="0" bgcolor="{color}" '
            f'style="margin-top:6px; margin-bottom:6px;"><tr><td>{plain_html(entry.content)}</td></tr>'
            "</table>"
        ]
    user = entry.role == "user"
    bg = colors()["error"] if entry.status == "error" else colors()["user" if user else "assistant"]
    if user:
        parts = [plain_html(entry.content)]
    elif entry.content:
        parts = markdown_html(entry.content, index, entry.copied_block, bg, scheme)
    else:
        parts = []
    footer = _footer(index, entry, scheme)
    if footer:
        muted = colors()["muted"]
        parts.append(f'<p style="margin:6px 0px 0px 0px; color:{muted}; font-size:small;">{footer}</p>')
    # The bubble is a column of top-level tables, so a code block's long lines widen only its own.
    sections: list[str] = [_header(index, entry, scheme)]
    tables: list[str] = []
    for part in parts:
        if part.startswith(CODE_MARK):
            if sections:
                tables.append("".join(sections))
                sections = []
            tables.append(part)
        else:
            sections.append(part)
    tables.append("".join(sections))
    html_parts = []
    for i, table in enumerate(tables):
        if table.startswith(CODE_MARK):
            html_parts.append(table)
            continue
        top = 6 if i == 0 else 0
        bottom = 6 if i == len(tables) - 1 else 0
        padding = "10" if table else "2"
        html_parts.append(
            f'<table width="100%" cellpadding="{padding}" cellspacing="0" border="0" bgcolor="{bg}" '
            f'style="margin-top:{top}px; margin-bottom:{bottom}px;"><tr><td>{table}</td></tr></table>'
        )
    return html_parts


def _header(index: int, entry: Entry, scheme: str) -> str:
    """'You  Copy  Edit' / 'Assistant  Copy'."""
    user = entry.role == "user"
    muted = colors()["muted"]
    name_color = colors()["user_name"] if user else colors()["assistant_name"]
    copy = "Copied ✓" if entry.copied else "Copy"
    link = f"color:{muted}; text-decoration:none;"
    edit_href, copy_href = action_href(scheme, "edit", index), action_href(scheme, "copy", index)
    edit = f'&nbsp;&nbsp;<a href="{edit_href}" style="{link}">Edit</a>' if user and not entry.editing else ""
    editing = (
        f'&nbsp;&nbsp;<span style="color:{colors()["editing"]};">being edited below (Esc cancels)</span>'
        if entry.editing
        else ""
    )
    return (
        f'<p style="margin:0px 0px 4px 0px;"><span style="color:{name_color}; font-weight:600;">'
        f"{'You' if user else 'Assistant'}</span>"
        f'&nbsp;&nbsp;<a href="{copy_href}" style="{link}">{copy}</a>{edit}{editing}</p>'
    )


def _footer(index: int, entry: Entry, scheme: str) -> str:
    """The line under a message: its versions (‹ 2/3 ›), then the reply's figures or its state."""
    user = entry.role == "user"
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
    if entry.versions is None or entry.status == "streaming":
        return footer
    number, count = entry.versions
    link = f"color:{colors()['user_name']}; text-decoration:none; font-weight:600;"
    previous, following = action_href(scheme, "version", index, -1), action_href(scheme, "version", index, 1)
    versions = (
        f'<a href="{previous}" style="{link}">&nbsp;‹&nbsp;</a>{number}/{count}'
        f'<a href="{following}" style="{link}">&nbsp;›&nbsp;</a>'
    )
    return f"{versions}&nbsp;&nbsp;{footer}" if footer else versions


class TranscriptView(QTextBrowser):
    """Read-only view of a list of entries; ``render`` rebuilds only the entries that changed.

    It follows the conversation like every chat app: while the user is at the bottom (``following``)
    the view stays there as a reply grows (also when the layout grows later, ``rangeChanged``);
    scrolling up stops following and shows the "Jump to latest" button, which scrolls back down.
    """

    copied = Signal(int)  # index of the entry whose text went to the clipboard
    following_changed = Signal(bool)
    link_refused = Signal(str)  # a link of a reply that is not opened (not http/https): its address
    version_requested = Signal(int, int)  # entry index, step (-1 the previous version, 1 the next)
    edit_requested = Signal(int)  # entry index of a user message to change

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("transcriptView")
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setAccessibleName("Conversation transcript")
        self.link_scheme = new_link_scheme()  # this view's own links (module docstring)
        self.document().setDocumentMargin(12)
        self._entries: list[Entry] = []
        self._cache: dict[int, tuple[tuple[Any, ...], list[str]]] = {}
        self._shown: list[str] = []  # the chunks in the document, in order
        self._starts: list[int] = []  # the document position where each shown chunk begins
        self._entry_chunks: list[int] = []  # how many chunks (top-level tables) each entry has
        self.document().setUndoRedoEnabled(False)  # rendering edits the document; nothing to undo
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
                cached = (key, entry_chunks(index, entry, self.link_scheme))
                self._cache[index] = cached
            parts.extend(cached[1])
        self._entry_chunks = [len(self._cache[index][1]) for index in range(len(self._entries))]
        for stale in [i for i in self._cache if i >= len(self._entries)]:
            del self._cache[stale]
        bar = self.verticalScrollBar()
        position = bar.value()
        cursor = self.textCursor()
        selection = (cursor.anchor(), cursor.position()) if cursor.hasSelection() else None
        before = self.toPlainText() if selection else ""
        self._rendering = True
        try:
            self._show_chunks(parts)
            if selection is not None:  # a streaming reply must not take away what the user is selecting
                self._restore_selection(*selection, before)
            bar.setValue(bar.maximum() if self.following else position)
        finally:
            self._rendering = False

    def entry_frames(self, index: int) -> list[QTextFrame]:
        """The top-level frames (tables) showing entry ``index``, in order: one per bubble, and one
        more per 16 lines of each code block in it."""
        if not 0 <= index < len(self._entry_chunks):
            return []
        first = sum(self._entry_chunks[:index])
        return self.document().rootFrame().childFrames()[first : first + self._entry_chunks[index]]

    def invalidate(self) -> None:
        """Forget what the document shows: the next ``render`` builds it all again."""
        self._shown, self._starts = [], []

    def _show_chunks(self, chunks: list[str]) -> None:
        """Make the document show ``chunks``: only those from the first that differs are replaced, so
        a streaming reply costs the layout of its changed part, not of the whole conversation."""
        if not chunks:
            self.setHtml(self._placeholder())
            self._shown, self._starts = [], []
            return
        same = 0
        while same < min(len(chunks), len(self._shown)) and chunks[same] == self._shown[same]:
            same += 1
        if same == len(chunks) == len(self._shown):
            return
        if not self._shown:
            self.clear()
        cursor = QTextCursor(self.document())
        cursor.beginEditBlock()
        if same < len(self._starts):
            cursor.setPosition(self._starts[same])
            cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
            cursor.removeSelectedText()
        else:
            cursor.movePosition(QTextCursor.MoveOperation.End)
        del self._starts[same:]
        for chunk in chunks[same:]:
            self._starts.append(cursor.position())
            cursor.insertHtml(chunk)
        cursor.endEditBlock()
        self._shown = list(chunks)

    def restyle(self) -> None:
        """The theme changed: convert every entry again with its colors."""
        self._cache.clear()
        self.render(self._entries)

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

    def copy_code(self, index: int, block: int) -> None:
        """Exactly the code of the entry's ``block``-th code block to the clipboard ("Copied ✓")."""
        if not 0 <= index < len(self._entries):
            return
        entry = self._entries[index]
        blocks = code_blocks(entry.content)
        if 0 <= block < len(blocks):
            QGuiApplication.clipboard().setText(blocks[block].code)
            entry.copied_block = block
            self.render(self._entries)
            QTimer.singleShot(COPIED_SHOWN_MS, self, lambda: self._uncopy(entry))
            self.copied.emit(index)

    def _uncopy(self, entry: Entry) -> None:
        entry.copied = False
        entry.copied_block = -1
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
        if url.scheme() == self.link_scheme:  # one of the app's own links: only this view makes them
            self._act(url.path())
        elif url.scheme() in LINK_SCHEMES and url.host():
            self.ask_to_open(url)
        else:  # edit:0, version:1:1, file:, javascript: ... written in a message: never acted on
            self.link_refused.emit(url.toString())

    def _act(self, path: str) -> None:
        action, _, rest = path.partition("/")
        try:
            numbers = [int(n) for n in rest.split("/")]
        except ValueError:
            log.warning("an app link with a malformed path %r was ignored", path[:80])
            return
        if action == "copy" and len(numbers) == 1:
            self.copy_entry(numbers[0])
        elif action == "copycode" and len(numbers) == 2:
            self.copy_code(*numbers)
        elif action == "version" and len(numbers) == 2:
            self.version_requested.emit(*numbers)
        elif action == "edit" and len(numbers) == 1:
            self.edit_requested.emit(numbers[0])
        else:
            log.warning("an app link with an unknown action %r was ignored", path[:80])

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
