"""What answers a tab, and how: the engine picker (its choices, the engine the conversation remembers,
its model's loading state), the chat's own sampling (the Sampling button) and its system prompt.

``ChatTab`` owns one ``TabEngine`` and wires the header's widgets to it (``tab_widgets.py`` builds
them); the router sends it the worker's news of the tab's model (``show_model_loading`` and the
others). What is chosen is kept in the tab's ``ConversationModel``; the window's ``TabModels`` turns
it into the sampling each reply is sent with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Slot

from ..engines.endpoints import local_label, model_path_of
from .tab_widgets import overrides_summary

if TYPE_CHECKING:
    from .tab import ChatTab


class TabEngine(QObject):
    """The tab's header, in behaviour; see the module docstring."""

    def __init__(self, tab: ChatTab) -> None:
        super().__init__(tab)
        self.tab = tab
        self.choices: list[tuple[str, str]] = []  # the picker's (engine id, label), local first
        self.model_state: tuple[str, str] = ("", "")  # ("loading" | "ready" | "failed", model name)
        self.model_ready_at = 0.0  # time.perf_counter() when its model last said it was ready

    # -- the engine picker ----------------------------------------------------------------------
    @Slot(str)
    def set_engine(self, engine_id: str) -> None:
        """Answer with ``engine_id`` from the next reply on; remembered with the conversation."""
        tab = self.tab
        tab.model.set_engine(engine_id)
        tab.schedule_render()
        if tab.engine_picker.engine_id != engine_id and self.choices:
            self.set_choices(self.choices)  # a local model not listed yet is added
        tab.engine_changed.emit(tab.conversation_id, engine_id)

    def set_choices(self, choices: list[tuple[str, str]]) -> str:
        """The engines to pick from (local first); returns the engine the tab uses now (its saved
        one, or the local engine when that endpoint is gone: the tab says so)."""
        tab = self.tab
        saved = tab.saved_engine or choices[0][0]
        if (path := model_path_of(saved)) is not None and saved not in dict(choices):
            choices = [*choices[:1], (saved, local_label(path)), *choices[1:]]  # not listed yet: it is loaded
        self.choices = list(choices)
        if not tab.engine_picker.set_choices(choices, saved):
            tab.status_label.setText("This chat's server is no longer in Settings → Engines; "
                                     "the local engine answers.")  # fmt: skip
        return tab.engine_picker.engine_id

    # -- its model (from the worker, routed by the window's router) --------------------------------
    def show_model_loading(self, name: str) -> None:
        """This tab's model is being loaded (picked, or needed for a reply): its next reply waits."""
        self.model_state = ("loading", name)
        self.tab.set_status(f"loading {name}…")

    def show_model_ready(self, name: str) -> None:
        """This tab's model is loaded (``model_ready_at``: when it said so)."""
        tab = self.tab
        was_loading = self.model_state[0] == "loading"
        self.model_state = ("ready", name)
        self.model_ready_at = time.perf_counter()
        if was_loading and tab.status_label.text().startswith("loading "):
            tab.set_status(f"{name} is ready." if not tab.is_generating else "generating…")

    def show_model_failed(self, name: str, reason: str) -> None:
        self.model_state = ("failed", name)
        self.tab.set_status(f"{name} could not be loaded: {reason}")

    # -- the chat's own sampling and system prompt -------------------------------------------------
    def set_sampling_overrides(self, overrides: Mapping[str, Any]) -> None:
        """Use these for the next replies and save them with the conversation."""
        self.tab.model.set_sampling_overrides(overrides)
        self.show_sampling()
        self.tab.schedule_render()  # a failed write adds a notice

    def show_sampling(self) -> None:
        """The Sampling button names what this chat sets itself ("app defaults" when nothing)."""
        summary = overrides_summary(self.tab.sampling_overrides)
        short = summary if len(summary) <= 60 else summary[:57] + "…"
        self.tab.settings_button.setText(f"Sampling: {short}")

    @Slot(str)
    def use_system_prompt(self, text: str) -> None:
        """The system prompt as typed: used from the next reply on (saved when typing stops)."""
        self.tab.model.system_prompt = text

    @Slot()
    def save_system_prompt(self) -> None:
        self.tab.model.save_system_prompt()
        self.tab.schedule_render()  # a failed write adds a notice
