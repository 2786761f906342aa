"""What the settings dialog checks besides the engine's option classes: sizes typed as text, a memory
budget above this computer's memory, a reply limit that leaves no room for the conversation.

``SizeField`` is the dialog's box for a size in MiB. Unlike a plain spin box it never changes what
the user typed: "abc", "-" or a number past its range stay in the box, and ``problem()`` says what is
wrong, so the dialog shows it in red like any other invalid value (a spin box would cut 99,999,999
to its maximum, or put the old value back, without a word).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QFocusEvent, QKeyEvent, QValidator
from PySide6.QtWidgets import QDoubleSpinBox, QWidget

from ..wording import LABELS, MiB, mib
from ..worker.engine_options import session_limits

GiB = 1 << 30
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_UNBOUNDED = 1e15  # the spin box itself never clamps; the range is checked by ``problem``


class SizeField(QDoubleSpinBox):
    """A size in MiB, typed freely; ``problem()`` is "" when the text is a size within the range."""

    def __init__(self, minimum: float, maximum: float, decimals: int) -> None:
        super().__init__(minimum=-_UNBOUNDED, maximum=_UNBOUNDED, decimals=decimals)
        self.allowed = (minimum, maximum)

    def typed(self) -> str:
        """The text in the box, without its suffix and group separators."""
        return (
            self.lineEdit()
            .text()
            .removesuffix(self.suffix())
            .replace(self.locale().groupSeparator(), "")
            .strip()
        )

    def number(self) -> float | None:
        text = self.typed().replace(self.locale().decimalPoint(), ".")
        return float(text) if _NUMBER.match(text) else None

    def problem(self) -> str:
        """What is wrong with the text ("" when nothing is): not a number, or out of the range."""
        number, (low, high) = self.number(), self.allowed
        if number is None:
            typed = self.typed()
            return f"“{typed}” is not a size: type a number of MiB" if typed else "type a number of MiB"
        if not low <= number <= high:
            return f"{number:,.{self.decimals()}f}".rstrip("0").rstrip(".") + (
                f" MiB is out of range: from {low:,.0f} to {high:,.0f} MiB"
            )
        return ""

    # -- what a spin box does on its own, undone: the text stays as typed ---------------------------
    def validate(self, text: str, pos: int) -> object:
        return (QValidator.State.Acceptable, text, pos)

    def fixup(self, text: str) -> str:
        return text

    def valueFromText(self, text: str) -> float:
        number = self.number()
        return self.value() if number is None else number

    def focusOutEvent(self, event: QFocusEvent) -> None:
        if self.number() is None:  # a spin box would put the last number back: keep what was typed
            QWidget.focusOutEvent(self, event)
            return
        super().focusOutEvent(event)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if self.number() is None and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            event.ignore()  # the same on Enter; the dialog's message says what is wrong
            return
        super().keyPressEvent(event)


def setting_warnings(
    values: Mapping[str, Mapping[str, Any]], model_info: Mapping[str, Any], errors: Mapping[str, str]
) -> str:
    """Values the engine takes but that are probably not meant, one per line ("" when none): a budget
    above this computer's memory, a reply limit that leaves the conversation little room."""
    kv = values["kv"]
    warnings = [] if "kvMaxBytesTotal" in errors else [memory_warning(kv, physical_memory())]
    if model_info:
        tokens, per_token = session_limits(kv, model_info)
        label = limit_label(kv, tokens, per_token, int(model_info["context_length"]))
        warnings.append(reply_room_warning(int(values["sampling"]["max_new_tokens"]), tokens, label))
    return "\n".join(warning for warning in warnings if warning)


def physical_memory() -> int:
    """This computer's memory in bytes (0 when the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def gib(n_bytes: int) -> str:
    return f"{n_bytes / GiB:,.1f} GiB"


def memory_warning(kv: Mapping[str, Any], ram: int) -> str:
    """A budget above this computer's memory: the cache could push programs (or SmallMind) out."""
    total = int(kv.get("max_bytes_total", 0))
    if not ram or total <= ram:
        return ""
    return (
        f"{LABELS['max_bytes_total']}: {mib(total)} is more than this computer's memory ({gib(ram)}); "
        "a cache that large would push other programs, or SmallMind, out of memory."
    )


def reply_room_warning(max_new_tokens: int, tab_limit: int, limit_label: str) -> str:
    """Max new tokens at half the tab's limit or more: a prompt keeps only the rest of the tab (the
    engine keeps room for the reply, up to half the tab), so older messages are left out early."""
    if not tab_limit or max_new_tokens < tab_limit // 2:
        return ""
    room = tab_limit - tab_limit // 2
    return (
        f"{LABELS['max_new_tokens']}: {max_new_tokens:,} leaves the conversation only {room:,} of the "
        f"{tab_limit:,} tokens a tab may hold ({limit_label}): older messages are left out of every prompt "
        "past that. Lower it, or raise the tab's limit."
    )


def limit_label(kv: Mapping[str, Any], tab_limit: int, per_token: int, context: int) -> str:
    """Which setting sets the tab's token limit, in the dialog's words."""
    if tab_limit >= context:
        return "the model's context"
    if tab_limit == int(kv.get("max_tokens_per_session", 0)):
        return f"set by “{LABELS['max_tokens_per_session']}”"
    if per_token and tab_limit == int(kv.get("max_bytes_per_session", 0)) // per_token:
        return f"set by “{LABELS['max_bytes_per_session']}”"
    return "the model's context"


__all__ = ["MiB", "SizeField", "physical_memory", "setting_warnings"]
