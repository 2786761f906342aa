"""What a conversation uses of the document libraries, kept in its settings, and how citations read.
No Qt: the tab's model stores ``{"documents": {"libraries": [...], "budget_tokens": 1000}}``."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SETTINGS_KEY = "documents"
DEFAULT_BUDGET_TOKENS = 1000  # engine.documents.DEFAULT_BUDGET_TOKENS (a test checks they agree)
BUDGET_CHOICES = (250, 500, 1000, 2000, 4000)


def libraries_of(settings: Mapping[str, Any]) -> list[str]:
    """The libraries a conversation uses (none: documents are off)."""
    chosen = settings.get(SETTINGS_KEY, {})
    names = chosen.get("libraries", []) if isinstance(chosen, Mapping) else []
    return [str(name) for name in names if isinstance(name, str)]


def budget_of(settings: Mapping[str, Any]) -> int:
    chosen = settings.get(SETTINGS_KEY, {})
    value = chosen.get("budget_tokens") if isinstance(chosen, Mapping) else None
    return value if isinstance(value, int) and value > 0 else DEFAULT_BUDGET_TOKENS


def documents_setting(libraries: Sequence[str], budget_tokens: int) -> dict[str, Any]:
    return {"libraries": list(dict.fromkeys(libraries)), "budget_tokens": int(budget_tokens)}


def toggle_text(libraries: Sequence[str], budget_tokens: int) -> str:
    """The tab's Documents button: which libraries, and the budget the passages may take."""
    if not libraries:
        return "Documents: off"
    names = ", ".join(libraries)
    names = names if len(names) <= 30 else names[:29] + "…"
    return f"Documents: {names} · {budget_tokens:,} tokens"


def retrieval_status(citations: Sequence[Mapping[str, Any]], n_tokens: int, budget_tokens: int) -> str:
    """The tab's status line once passages were found for a message."""
    if not citations:
        return "No passage of the chosen documents matches this message; it is sent alone."
    files = len({c.get("path") for c in citations})
    return (f"Documents: {len(citations)} passages from {files} files, {n_tokens:,} of "
            f"{budget_tokens:,} tokens.")  # fmt: skip


def citations_html(stats: Mapping[str, Any], href: Callable[[int], str], link_color: str) -> str:
    """A reply's sources line: "Sources (412 of 1,000 tokens): [1] notes/a.md, lines 3-9 · [2]
    report.pdf, page 4"; ``href(number)`` is the view's own link that opens citation ``number`` in
    the tab's citation panel."""
    style = f"color:{link_color}; text-decoration:none;"
    links = []
    for c in stats.get("citations") or []:
        number = int(c.get("number", 0))
        label = html.escape(str(c.get("label", "")))
        links.append(f'<a href="{href(number)}" style="{style}">[{number}]&nbsp;{label}</a>')
    tokens, budget = stats.get("documents_tokens"), stats.get("documents_budget")
    both = isinstance(tokens, int) and isinstance(budget, int)
    taken = f" ({tokens:,} of {budget:,} tokens)" if both else ""
    return f"Sources{taken}: " + " · ".join(links)


def citation_html(citation: Mapping[str, Any]) -> str:
    """The citation panel's page: where the passage is, its heading, its text."""
    heading = str(citation.get("heading") or "")
    label = html.escape(str(citation.get("label", "")))
    lines = [f"<p><b>[{int(citation.get('number', 0))}] {label}</b></p>",
             f"<p style='color:gray'>{html.escape(str(citation.get('path', '')))}</p>"]  # fmt: skip
    if heading:
        lines.append(f"<p><i>{html.escape(heading)}</i></p>")
    text = html.escape(str(citation.get("text", "")))
    lines.append(f"<pre style='white-space:pre-wrap'>{text}</pre>")
    return "".join(lines)
