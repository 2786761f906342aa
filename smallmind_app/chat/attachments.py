"""Text files attached to a message: read and checked here, added to the prompt as a fenced block.

A file is attached when it is text (UTF-8, no NUL bytes) of at most ``MAX_ATTACHMENT_BYTES``; the
block names the file and fences its text with the language Pygments knows for the name
(``notes.md:`` then a fence). Whether it fits the context is known once the worker has counted its
tokens: ``AttachmentList`` (the line above the prompt box) shows each file's count and says when one
does not fit. Refusals are ``AttachmentError`` with a sentence naming the file and the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Signal, Slot
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QLabel, QPlainTextEdit

from ..colors import colors
from .code_blocks import language_of

MAX_ATTACHMENT_BYTES = 256 * 1024
_BACKTICKS = re.compile(r"`{3,}")


class AttachmentError(Exception):
    """The file cannot be attached; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class Attachment:
    name: str  # the file's name (no folder)
    text: str  # its content
    block: str  # what goes into the message: the name, then the text in a fence


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 20):.1f} MiB" if n_bytes >= 1 << 20 else f"{n_bytes / 1024:.0f} KiB"


def read_attachment(path: Path | str, max_bytes: int = MAX_ATTACHMENT_BYTES) -> Attachment:
    """The file as an attachment, or ``AttachmentError``: too big, binary, not UTF-8, unreadable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise AttachmentError(f"Cannot attach “{path.name}”: it is not a file.")
        if size > max_bytes:
            raise AttachmentError(
                f"Cannot attach “{path.name}”: it is {size_text(size)}; files up to "
                f"{size_text(max_bytes)} can be attached."
            )
        data = path.read_bytes()
    except OSError as exc:
        raise AttachmentError(f"Cannot attach “{path.name}”: {exc.strerror or exc}.") from exc
    if b"\x00" in data:
        raise AttachmentError(
            f"Cannot attach “{path.name}”: it is a binary file (it contains NUL bytes); "
            "only text files (code, Markdown, plain text) can be attached."
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AttachmentError(
            f"Cannot attach “{path.name}”: it is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"offset {exc.start}); only text files (code, Markdown, plain text) can be attached."
        ) from exc
    if not text.strip():
        raise AttachmentError(f"Cannot attach “{path.name}”: it is empty.")
    return Attachment(path.name, text, fenced(path.name, text))


def fenced(name: str, text: str) -> str:
    """'name:' and the text in a fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{name}:\n{fence}{language_of(name)}\n{body}{fence}"


class AttachmentList(QLabel):
    """Attaches files to ``prompt`` and shows them above it: 'Attached: app.py · 120 tokens'.

    ``count_wanted(block)`` asks for an attachment's token count (the worker counts); ``counted``
    takes the answer and, when the file cannot fit the tab, takes it out of the prompt again.
    ``refused(sentence)``: a file was not attached, the sentence names it and says why.
    """

    count_wanted = Signal(str)
    refused = Signal(str)

    def __init__(self, prompt: QPlainTextEdit) -> None:
        super().__init__(objectName="attachmentList")
        self._prompt = prompt
        self.setWordWrap(True)
        self.items: dict[str, tuple[str, int | None]] = {}  # block -> (file name, tokens once counted)
        self.setVisible(False)
        prompt.textChanged.connect(self._on_prompt_text_changed)

    @Slot(list)
    def attach(self, paths: list[str]) -> None:
        """Add each text file to the prompt as a fenced block with its name; refuse binary or big ones."""
        for path in paths:
            try:
                attachment = read_attachment(path)
            except AttachmentError as exc:
                self.refused.emit(str(exc))
                continue
            text = self._prompt.toPlainText()
            separator = "\n\n" if text.strip() else ""
            self._prompt.setPlainText(text.rstrip("\n") + separator + attachment.block)
            self._prompt.moveCursor(QTextCursor.MoveOperation.End)
            self.items[attachment.block] = (attachment.name, None)
            self._show()
            self.count_wanted.emit(attachment.block)
        self._prompt.setFocus()

    def counted(self, block: str, n_tokens: int, limit: int) -> bool:
        """The worker counted ``block`` (False: not an attachment shown here); over ``limit``, the
        file cannot fit the tab: it leaves the prompt and ``refused`` says so."""
        if block not in self.items:
            return False
        name = self.items[block][0]
        if limit and n_tokens > limit:
            del self.items[block]
            self._prompt.setPlainText(self._prompt.toPlainText().replace(block, "").strip())
            self.refused.emit(
                f"Cannot attach “{name}”: it is {n_tokens:,} tokens, more than the {limit:,} a tab holds."
            )
        else:
            self.items[block] = (name, n_tokens)
        self._show()
        return True

    @Slot()
    def _on_prompt_text_changed(self) -> None:
        """Forget the files whose block left the prompt (the user deleted it, or the message was sent)."""
        prompt = self._prompt.toPlainText()
        gone = [block for block in self.items if block not in prompt]
        for block in gone:
            del self.items[block]
        if gone:
            self._show()

    def _show(self) -> None:
        shown = [
            f"{name} · {'counting…' if n is None else f'{n:,} tokens'}" for name, n in self.items.values()
        ]
        self.setText("Attached: " + "   ".join(shown) if shown else "")
        self.setStyleSheet(f"color: {colors()['muted']};")
        self.setVisible(bool(shown))
