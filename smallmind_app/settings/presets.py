"""System prompt presets: named system prompts the user saves and picks, kept in the app settings.

``DEFAULT_PRESETS`` are the ones a new install starts with; ``check_presets`` is the settings file's
check of them. No Qt: their menus are ``chat/preset_menu.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_PRESETS: Mapping[str, str] = {
    "Helpful assistant": "You are a helpful AI assistant. Answer clearly and accurately.",
    "Concise": "You are a concise assistant. Answer in as few words as possible, without preamble.",
    "Code reviewer": (
        "You are an experienced code reviewer. Point out bugs, unclear names and missing tests first, "
        "then suggest concrete improvements with short code examples."
    ),
    "Translator": (
        "You are a translator. Translate the user's text into English (or, if it is English, into "
        "French), keeping its meaning and tone. Reply with the translation only."
    ),
    "Writing editor": (
        "You are a careful editor. Improve the user's text for clarity and grammar, keep their voice, "
        "and list the main changes briefly."
    ),
}
MAX_NAME_CHARS = 60


def check_presets(value: Any) -> dict[str, str]:
    """``value`` as {name: prompt}; ValueError naming the problem (names: non-empty, at most 60 chars)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"prompt_presets must be an object of name: prompt, got {value!r}")
    presets = {}
    for name, text in value.items():
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"prompt_presets: a name must be 1 to {MAX_NAME_CHARS} characters, got {name!r}")
        if not isinstance(text, str):
            raise ValueError(f"prompt_presets[{name!r}] must be a string, got {text!r}")
        presets[name] = text
    return presets


def clean_name(name: str) -> str:
    return " ".join(name.split())[:MAX_NAME_CHARS]
