"""The app's colors: one palette per theme, read by every widget that paints its own colors.

``colors()`` is the current theme's named colors (the transcript's bubbles, code, muted text, the
dock's sparklines, error rows); ``is_dark()`` says whether the current theme is dark (code
highlighting picks its style from it). ``set_current(name)`` switches the table; applying a theme to
the running app (QPalette, re-rendering the widgets, following the system) builds on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

THEMES = ("light", "dark")
CHOICES = {"system": "Follow system", "light": "Light", "dark": "Dark"}  # the setting's value -> shown label

LIGHT: Mapping[str, str] = MappingProxyType(
    {
        "text": "#111827",
        "background": "#ffffff",
        "user": "#e8effd",
        "assistant": "#f7f7f8",
        "notice": "#fff4e5",
        "error": "#fdecec",
        "error_text": "#b91c1c",
        "muted": "#6b7280",
        "code": "#eceef1",
        "user_name": "#1d4ed8",
        "assistant_name": "#047857",
        "editing": "#b45309",
        "busy": "#047857",
        "plot_border": "#d1d5db",
        "plot_background": "#ffffff",
        "plot_label": "#4b5563",
        "plot_value": "#111827",
        "search_hit": "#fde68a",
        "search_hit_text": "#111827",
        "error_field": "#fde2e2",
        "notice_text": "#92400e",
        "window": "#f3f4f6",
        "base": "#ffffff",
        "alternate_base": "#f7f7f8",
        "button": "#f3f4f6",
        "highlight": "#2563eb",
        "highlight_text": "#ffffff",
        "link": "#1d4ed8",
        "disabled_text": "#9ca3af",
        "sparkline_tokens": "#2563eb",
        "sparkline_memory": "#7c3aed",
        "sparkline_batch": "#059669",
    }
)

DARK: Mapping[str, str] = MappingProxyType(
    {
        "text": "#e5e7eb",
        "background": "#1f2125",
        "user": "#1e2a44",
        "assistant": "#26282d",
        "notice": "#3b2f1a",
        "error": "#4a1f22",
        "error_text": "#f87171",
        "muted": "#9ca3af",
        "code": "#16181c",
        "user_name": "#93b4f8",
        "assistant_name": "#6ee7b7",
        "editing": "#fbbf24",
        "busy": "#6ee7b7",
        "plot_border": "#4b5563",
        "plot_background": "#1f2125",
        "plot_label": "#9ca3af",
        "plot_value": "#e5e7eb",
        "search_hit": "#854d0e",
        "search_hit_text": "#fef3c7",
        "error_field": "#5b2126",
        "notice_text": "#fcd34d",
        "window": "#26282d",
        "base": "#1f2125",
        "alternate_base": "#2b2e33",
        "button": "#30333a",
        "highlight": "#3b82f6",
        "highlight_text": "#ffffff",
        "link": "#93b4f8",
        "disabled_text": "#6b7280",
        "sparkline_tokens": "#60a5fa",
        "sparkline_memory": "#a78bfa",
        "sparkline_batch": "#34d399",
    }
)

_PALETTES = {"light": LIGHT, "dark": DARK}
_current = "light"


def colors() -> Mapping[str, str]:
    """The current theme's named colors."""
    return _PALETTES[_current]


def is_dark() -> bool:
    return _current == "dark"


def current() -> str:
    return _current


def set_current(name: str) -> None:
    """Make ``name`` ("light" or "dark") the theme ``colors()`` answers with."""
    global _current
    if name not in _PALETTES:
        raise ValueError(f"unknown theme {name!r}: expected one of {', '.join(THEMES)}")
    _current = name


def check_choice(choice: str) -> str:
    """The ``theme`` setting: "system" (follow the system's color scheme), "light" or "dark"."""
    if choice not in CHOICES:
        raise ValueError(f"theme must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice
