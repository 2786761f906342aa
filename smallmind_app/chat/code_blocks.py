"""Markdown of a reply -> HTML for the transcript: prose by Qt's Markdown parser, fenced code blocks
highlighted by Pygments, each with its language and a Copy link.

A reply is split into parts at its fences (``split_markdown``): prose parts go through
``QTextDocument.setMarkdown`` (tables, lists, inline code styled here), code parts through Pygments
with a light or a dark style chosen by ``colors.is_dark()``; every color comes from
``colors.colors()``. Both conversions are cached per part (and per theme), so while a reply streams
only its last part is converted again. A code block is shown as tables of 16 lines: a block still
growing is highlighted 16 lines at a time (each group cached), so a render converts and lays out only
its last group; a finished block is highlighted whole once (its lines split into the same tables).

Horizontal scrolling: a QTextBrowser cannot scroll one block by itself. A code block is therefore
its own top-level table with ``white-space:pre``: a long line widens that table only, the prose
around it keeps wrapping at the view's width, and the view's horizontal scroll bar reaches the end
of the line.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from functools import lru_cache

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.lexers.special import TextLexer
from pygments.util import ClassNotFound
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor, QTextDocument

from ..colors import colors, is_dark

LIGHT_STYLE = "default"
DARK_STYLE = "github-dark"
CACHED_PARTS = 1024  # converted prose parts and highlighted code chunks kept (per theme)
LINES_PER_TABLE = 16  # a code block is shown as tables of this many lines (see code_block_html)

_OPEN_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})[ \t]*([^\s`]*)[^`\n]*$")
_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.S)
_IMAGE = re.compile(r"<img\b[^>]*>")
_ALT = re.compile(r'\balt="([^"]*)"')
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class CodeBlock:
    language: str  # as written after the fence ("python"), "" when none
    code: str  # the block's text, exactly what Copy puts on the clipboard
    closed: bool  # False for the last block of a reply still streaming (no closing fence yet)


Part = str | CodeBlock  # prose Markdown, or a fenced code block


def sanitize(text: str) -> str:
    """Drop control characters a model may emit (they render as boxes or break the layout)."""
    return _CONTROL_CHARS.sub("", text)


def split_markdown(text: str) -> list[Part]:
    """The reply's prose and fenced code blocks, in order (CommonMark fences: ``` or ~~~, 0-3 spaces)."""
    parts: list[Part] = []
    prose: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        opened = _OPEN_FENCE.match(lines[i])
        if not opened:
            prose.append(lines[i])
            i += 1
            continue
        indent, fence, language = len(opened[1]), opened[2], opened[3]
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        body = lines[i + 1 : len(lines) if end is None else end]
        if prose:
            parts.append("\n".join(prose))
            prose = []
        code = "\n".join(_unindent(line, indent) for line in body)
        parts.append(CodeBlock(language, code, end is not None))
        i = len(lines) if end is None else end + 1
    if prose:
        parts.append("\n".join(prose))
    return [part for part in parts if not isinstance(part, str) or part.strip()]


def code_blocks(text: str) -> list[CodeBlock]:
    return [part for part in split_markdown(text) if isinstance(part, CodeBlock)]


def _unindent(line: str, indent: int) -> str:
    n = len(line) - len(line.lstrip(" "))
    return line[min(n, indent) :]


def _theme_key() -> tuple[bool, str, str, str]:
    palette = colors()
    return (is_dark(), palette["code"], palette["muted"], palette["text"])


# -- prose ------------------------------------------------------------------------------------------
def prose_html(text: str) -> str:
    """Markdown prose (no fenced code) -> the HTML body Qt renders; cached per text and theme."""
    return _prose_html(text, _theme_key())


MARKDOWN_NO_HTML = QTextDocument.MarkdownFeature(
    QTextDocument.MarkdownFeature.MarkdownDialectGitHub.value
    | QTextDocument.MarkdownFeature.MarkdownNoHTML.value
)


@lru_cache(maxsize=CACHED_PARTS)
def _prose_html(text: str, theme: tuple[bool, str, str, str]) -> str:
    """A reply is untrusted text (a downloaded model, a remote server): raw HTML in it is shown as
    text, never rendered, so a reply cannot style itself as a "You" message or a notice."""
    _dark, code, muted, _text = theme
    document = QTextDocument()
    document.setMarkdown(sanitize(text), MARKDOWN_NO_HTML)
    _style_inline_code(document, code)
    match = _BODY.search(document.toHtml())
    body = match.group(1) if match else html.escape(text)
    body = _IMAGE.sub(lambda m: html.escape(f"[image: {_alt(m[0])}]"), body)  # nothing is loaded
    body = body.replace('<table border="1" style="', f'<table border="1" style=" border-color:{muted};')
    return body.replace('<pre style="', f'<pre style=" background-color:{code};')  # indented code


def _style_inline_code(document: QTextDocument, background: str) -> None:
    """`inline code`: Qt marks it fixed-pitch only; give it a monospace font and the code background."""
    spans = []
    block = document.begin()
    while block.isValid():
        if not block.blockFormat().nonBreakableLines():  # not an indented code block
            fragments = block.begin()
            while not fragments.atEnd():
                fragment = fragments.fragment()
                if fragment.isValid() and fragment.charFormat().fontFixedPitch():
                    spans.append((fragment.position(), fragment.position() + fragment.length()))
                fragments += 1
        block = block.next()
    style = QTextCharFormat()
    style.setFontFamilies(["monospace"])
    style.setBackground(QColor(background))
    for start, end in spans:
        cursor = QTextCursor(document)
        cursor.setPosition(start)
        cursor.setPosition(end, QTextCursor.MoveMode.KeepAnchor)
        cursor.mergeCharFormat(style)


def _alt(tag: str) -> str:
    match = _ALT.search(tag)
    return html.unescape(match[1]) if match and match[1] else "no description"


# -- code -------------------------------------------------------------------------------------------
def highlighted(block: CodeBlock) -> list[str]:
    """The block's code as lines of HTML spans colored by Pygments (light or dark style, by the
    theme). A block still growing is highlighted in groups of ``LINES_PER_TABLE`` lines, each cached,
    so only its last group is new; a finished block is highlighted whole (once, cached)."""
    theme = _theme_key()
    if block.closed:
        return _highlight(block.code, block.language, theme).split("\n")
    lines = block.code.split("\n")
    groups = ["\n".join(lines[i : i + LINES_PER_TABLE]) for i in range(0, len(lines), LINES_PER_TABLE)]
    return [line for group in groups for line in _highlight(group, block.language, theme).split("\n")]


@lru_cache(maxsize=CACHED_PARTS)
def _highlight(code: str, language: str, theme: tuple[bool, str, str, str]) -> str:
    formatter = HtmlFormatter(nowrap=True, noclasses=True, style=DARK_STYLE if theme[0] else LIGHT_STYLE)
    spans = highlight(code, lexer_for(language), formatter)
    return spans[:-1] if spans.endswith("\n") and not code.endswith("\n") else spans  # Pygments adds one


@lru_cache(maxsize=64)
def lexer_for(language: str) -> Lexer:
    try:
        if language:
            return get_lexer_by_name(language, stripnl=False, ensurenl=False)
    except ClassNotFound:
        pass
    return TextLexer(stripnl=False, ensurenl=False)  # keeps blank first and last lines


def language_of(filename: str) -> str:
    """The fence language for a file name ("app.py" -> "python"), "" when Pygments has no lexer."""
    try:
        lexer = get_lexer_for_filename(filename)
    except ClassNotFound:
        return ""
    return str(lexer.aliases[0]) if lexer.aliases and not isinstance(lexer, TextLexer) else ""


def code_block_html(block: CodeBlock, href: str, copied: bool, bubble: str) -> list[str]:
    """Top-level tables (the bubble's background around them) holding the language, Copy and the
    code, ``LINES_PER_TABLE`` lines each: a growing block changes only its last table."""
    palette = colors()
    label = html.escape(block.language or "code")
    copy = "Copied ✓" if copied else "Copy"
    header = (
        f'<tr><td style="padding-left:8px; padding-right:8px; padding-top:4px; padding-bottom:2px;">'
        f'<span style="color:{palette["muted"]}; font-size:small;">{label}&nbsp;&nbsp;&nbsp;'
        f'<a href="{href}" style="color:{palette["user_name"]}; text-decoration:none;">{copy}</a>'
        "</span></td></tr>"  # on the left: a long line must not push Copy out of sight
    )
    lines = highlighted(block)
    starts = range(0, len(lines), LINES_PER_TABLE)
    tables = []
    for n, start in enumerate(starts):
        first, last = n == 0, n == len(starts) - 1
        code = "\n".join(lines[start : start + LINES_PER_TABLE])
        tables.append(
            f'<table width="100%" cellpadding="0" cellspacing="0" border="0" bgcolor="{bubble}" '
            f'style="margin:0px;"><tr><td style="padding-left:10px; padding-right:10px; '
            f'padding-top:{2 if first else 0}px; padding-bottom:{2 if last else 0}px;">'
            f'<table width="100%" cellpadding="0" cellspacing="0" border="0" bgcolor="{palette["code"]}" '
            f'style="margin:0px;">{header if first else ""}'
            f'<tr><td style="padding-left:8px; padding-right:8px; padding-top:{2 if first else 0}px; '
            f'padding-bottom:{8 if last else 0}px;"><pre style="margin:0px; white-space:pre; '
            f'font-family:monospace; color:{palette["text"]};">{code}</pre></td></tr></table>'
            "</td></tr></table>"
        )
    return tables
