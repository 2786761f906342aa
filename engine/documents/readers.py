"""From a file's bytes to blocks of text that know where they came from (lines, or a PDF's page).

    blocks = read_blocks("notes/solar.md", data)     # [Block(kind="heading", lines=["# Solar"], ...)]

Plain text, Markdown and code split on blank lines (Markdown headings and fenced code kept whole);
HTML is parsed by the standard library's ``HTMLParser`` (a tokenizer: it fetches nothing, runs
nothing, expands no external entities) with script and style dropped; PDF pages are read by pypdf.
What cannot be read raises ``SkipFile`` with the reason in words, shown to the user as-is.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePath

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown", ".mdown", ".mkd"})
HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
PDF_SUFFIXES = frozenset({".pdf"})
SNIFF_BYTES = 8192
_MAX_CONTROL_FRACTION = 0.01  # more control bytes than this in the first 8 KiB: not text
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\b\x1b")
_MARKDOWN_HEADING = re.compile(r"^ {0,3}#{1,6}(\s|$)")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


class SkipFile(Exception):
    """This file is not indexed; ``reason`` says why in words a user understands."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Block:
    """A paragraph, heading or code block: its lines, where it starts (1-based) and its PDF page."""

    kind: str  # "heading" or "text"
    lines: tuple[str, ...]
    line_start: int | None = None  # None for PDFs (their passages cite pages)
    page: int | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def line_end(self) -> int | None:
        return None if self.line_start is None else self.line_start + len(self.lines) - 1


def read_blocks(path: str | PurePath, data: bytes) -> list[Block]:
    """The blocks of a file whose bytes are ``data``; the suffix picks the reader."""
    suffix = PurePath(path).suffix.lower()
    if suffix in PDF_SUFFIXES:
        return pdf_blocks(data)
    text = decode_text(data)
    if suffix in HTML_SUFFIXES:
        return html_blocks(text)
    return text_blocks(text, markdown=suffix in MARKDOWN_SUFFIXES)


def looks_binary(data: bytes) -> bool:
    """A NUL byte, or more than 1% control bytes, in the first 8 KiB."""
    head = data[:SNIFF_BYTES]
    if b"\x00" in head:
        return True
    controls = sum(1 for byte in head if byte < 0x20 and byte not in _TEXT_CONTROLS)
    return controls > _MAX_CONTROL_FRACTION * max(len(head), 1)


def decode_text(data: bytes) -> str:
    """UTF-8 (a BOM is dropped; UTF-16 with a BOM too), else Windows-1252; binary raises SkipFile."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise SkipFile(f"not readable as UTF-16 text ({exc.reason})") from exc
    if looks_binary(data):
        raise SkipFile("binary file (not text)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def text_blocks(text: str, markdown: bool = False) -> list[Block]:
    """Blank-line separated blocks with their line numbers; Markdown headings are blocks of their own
    and a fenced code block stays one block (its blank lines included)."""
    blocks: list[Block] = []
    current: list[str] = []
    start = 1
    in_fence = False

    def flush(kind: str = "text") -> None:
        nonlocal current
        if any(line.strip() for line in current):
            blocks.append(Block(kind, tuple(current), line_start=start))
        current = []

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if markdown and _FENCE.match(line):
            in_fence = not in_fence
        elif markdown and not in_fence and _MARKDOWN_HEADING.match(line):
            flush()
            start = number
            current = [line]
            flush("heading")
            continue
        if not line.strip() and not in_fence:
            flush()
            continue
        if not current:
            start = number
        current.append(line)
    flush()
    return blocks


_DROPPED_TAGS = frozenset({"script", "style", "noscript", "template", "svg"})
_HEADING_TAGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6", "title"})
_BLOCK_TAG_TEXT = (
    "p div li ul ol br tr td th table section article aside header footer nav main pre blockquote dt "
    "dd dl figcaption hr form fieldset details summary"
)
_BLOCK_TAGS = _HEADING_TAGS | frozenset(_BLOCK_TAG_TEXT.split())


class _HtmlText(HTMLParser):
    """Visible text of an HTML page as blocks, each with the source line where its text starts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self._parts: list[str] = []
        self._line = 1
        self._dropped = 0  # depth inside script/style/...
        self._kind = "text"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROPPED_TAGS:
            self._dropped += 1
        elif tag in _BLOCK_TAGS:
            self._flush()
            self._kind = "heading" if tag in _HEADING_TAGS else "text"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROPPED_TAGS:
            self._dropped = max(0, self._dropped - 1)
        elif tag in _BLOCK_TAGS:
            self._flush()
            self._kind = "text"

    def handle_data(self, data: str) -> None:
        if self._dropped:
            return
        if not any(part.strip() for part in self._parts):
            self._line = self.getpos()[0] + data[: len(data) - len(data.lstrip())].count("\n")
        self._parts.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._parts).split())
        if text:
            self.blocks.append(Block(self._kind, (text,), line_start=self._line))
        self._parts = []

    def close(self) -> None:
        super().close()
        self._flush()


def html_blocks(text: str) -> list[Block]:
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    return parser.blocks


def pdf_blocks(data: bytes) -> list[Block]:
    """Each page's text (pypdf), split on blank lines; the blocks carry the page, not lines."""
    import pypdf  # imported here: only PDFs pay for it
    from pypdf.errors import PdfReadError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _decrypted(reader):
            raise SkipFile("encrypted PDF (it needs a password)")
        pages = list(reader.pages)
    except SkipFile:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
        raise SkipFile(f"not a readable PDF ({type(exc).__name__}: {exc})") from exc
    blocks: list[Block] = []
    for number, page in enumerate(pages, start=1):
        try:
            text = page.extract_text() or ""
        except (PdfReadError, ValueError, KeyError, TypeError, OSError, RecursionError, ZeroDivisionError):
            continue  # a damaged page: the others are still worth indexing
        for block in text_blocks(text):
            blocks.append(Block(block.kind, block.lines, line_start=None, page=number))
    if not blocks:
        raise SkipFile("no text in this PDF (scanned pages are images; they need OCR)")
    return blocks


def _decrypted(reader: object) -> bool:
    """Open a PDF encrypted with an empty user password (common: only printing is restricted)."""
    from pypdf.errors import DependencyError, PdfReadError

    try:
        return bool(reader.decrypt(""))  # type: ignore[attr-defined]
    except (DependencyError, PdfReadError, NotImplementedError):
        return False
