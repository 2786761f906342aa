"""A transcript entry as HTML: the chat bubble, its links and the line under it. No widgets here.

Each entry becomes one or more top-level tables (a bubble's prose, then each code block in a table
of its own, so that a code block's long lines widen only its own table): ``entry_chunks``. The
links are ``copy:``, ``copycode:``, ``edit:`` and ``version:`` addresses, handled by the view
(``transcript.py``); a button under a reply is a link in ``_footer``. Replies are Markdown
(``code_blocks``); user messages are plain text. Every color comes from ``colors.colors()``.

The app's own links (Copy, Edit, ‹ ›, a code block's Copy, a document's [1]) carry a scheme made of
a secret drawn for each view (``app-<random hex>:edit/0``): a reply cannot spell one, so text in a
message never triggers an action; every other link keeps the rule for links from replies (http(s) only, opened
after the address is shown).
"""

from __future__ import annotations

import functools
import html
import json
import secrets
from typing import Any

from ..colors import colors
from ..documents.choices import citations_html
from ..wording import FINISH_NOTES, limit_reached, tab_limit
from .code_blocks import CodeBlock, code_block_html, prose_html, sanitize, split_markdown
from .conversation_model import Entry
from .structured_output import STRUCTURED, displayed_markdown


def cache_key(entry: Entry) -> tuple[Any, ...]:
    """What an entry's HTML depends on (the view converts an entry again only when this changes)."""
    stats = json.dumps(entry.stats, sort_keys=True, default=str)  # citations are lists of dicts
    return (
        entry.role, entry.content, entry.status, stats, entry.progress, entry.editing, entry.copied,
        entry.versions, entry.copied_block, entry.model, entry.engine, tuple(colors().items()),
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
    if stats.get("continued"):
        parts.append("continued" + (f" {stats['continued']} times" if stats["continued"] > 1 else ""))
    reason = str(stats.get("finish_reason", ""))
    note = limit_reached(stats) if reason == "length" else FINISH_NOTES.get(reason)
    if note:
        parts.append(f"stopped: {note}" if reason == "length" else note)
    if stats.get("context_trimmed"):
        parts.append(f"older messages trimmed to fit {tab_limit(stats)}")
    return " · ".join(parts)


def author(entry: Entry) -> str:
    """Who said a reply: 'SmolLM2-135M-Instruct.Q4_1 (local)', 'gpt-4o (Team box)' ("" when unknown)."""
    if not entry.model and not entry.engine:
        return ""
    name = html.escape(entry.model or "unknown model")
    return f"{name} ({html.escape(entry.engine)})" if entry.engine else name


def displayed(entry: Entry) -> str:
    """The Markdown shown for an entry: a reply made under a JSON schema as a highlighted JSON block."""
    return displayed_markdown(entry.content, bool(entry.stats.get(STRUCTURED)))


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
        parts = markdown_html(displayed(entry), index, entry.copied_block, bg, scheme)
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
        footer = " · ".join(part for part in (author(entry), stats_line(entry.stats)) if part)
        if entry.stats.get("error"):
            footer += f"<br />{html.escape(str(entry.stats['error']))}"
        elif entry.status == "partial" and "finish_reason" not in entry.stats:
            n_tokens = f"{entry.stats['n_tokens']} tokens · " if entry.stats.get("n_tokens") else ""
            footer = f"{n_tokens}interrupted (the app closed while this reply was generated)"
        if entry.stats.get("citations"):  # the document passages it was given: each opens in a panel
            href = functools.partial(action_href, scheme, "cite", index)  # + the citation's number
            footer += "<br />" + citations_html(entry.stats, href, colors()["user_name"])
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
