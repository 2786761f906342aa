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

from PySide6.QtWidgets import QLabel, QWidget

from .code_blocks import language_of
from .theme import colors

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
    """'Attached: app.py · 120 tokens   notes.md · counting…' above the prompt box."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent, objectName="attachmentList")
        self.setWordWrap(True)
        self.items: dict[str, tuple[str, int | None]] = {}  # block -> (file name, tokens once counted)
        self.setVisible(False)

    def add(self, attachment: Attachment) -> None:
        self.items[attachment.block] = (attachment.name, None)
        self._show()

    def counted(self, block: str, n_tokens: int) -> bool:
        """The worker counted ``block``; False when it is not an attachment shown here."""
        if block not in self.items:
            return False
        self.items[block] = (self.items[block][0], n_tokens)
        self._show()
        return True

    def remove(self, block: str) -> None:
        self.items.pop(block, None)
        self._show()

    def forget_missing(self, prompt: str) -> None:
        """Drop the files whose block is no longer in the prompt (the user deleted it, or sent it)."""
        for block in [block for block in self.items if block not in prompt]:
            del self.items[block]
        self._show()

    def _show(self) -> None:
        shown = [
            f"{name} · {'counting…' if n is None else f'{n:,} tokens'}" for name, n in self.items.values()
        ]
        self.setText("Attached: " + "   ".join(shown) if shown else "")
        self.setStyleSheet(f"color: {colors()['muted']};")
        self.setVisible(bool(shown))
