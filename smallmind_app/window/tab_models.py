"""Which model answers each tab, as the window sees it: the pickers' choices (the default model, the
other local models, the servers of Settings → Engines), a model's own defaults, the sampling a tab's
reply is sent with, and the loaded models' options from the settings. No Qt: the main window holds
one ``TabModels`` and fills ``local_models`` from the worker's list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engines.endpoints import LOCAL_ENGINE, local_label, model_engine_id, model_path_of
from ..settings.app_settings import AppSettings, section_defaults

if TYPE_CHECKING:
    from ..chat.tab import ChatTab


def models_options(settings: AppSettings) -> dict[str, Any]:
    """The local models' pool options from the settings (the engine's default limit when unset)."""
    limit = settings.max_loaded_model_bytes
    return {"idle_ttl_s": settings.model_idle_ttl_s, **({"max_loaded_bytes": limit} if limit else {})}


class TabModels:
    """``settings`` and ``default_model`` (the running default model's ``model_info``) are read when
    needed; ``local_models`` are the worker's rows (``LocalEngine.models()``)."""

    def __init__(
        self, settings: Callable[[], AppSettings], default_model: Callable[[], Mapping[str, Any]]
    ) -> None:
        self._settings = settings
        self._default = default_model
        self.local_models: list[dict[str, Any]] = []

    def engine_choices(self) -> list[tuple[str, str]]:
        """The tabs' engine pickers: (engine id, label): the default model first ("local"), the other
        local models (installed or opened: "model:<path>"), then the servers of Settings → Engines."""
        info = self._default()
        name = Path(info["file_name"]).stem if info else "no model loaded"
        default_path = info.get("path", "")
        local = [(model_engine_id(m["path"]), local_label(m["path"]))
                 for m in self.local_models if m["path"] != default_path]  # fmt: skip
        remote = [(e.id, e.label) for e in self._settings().engines]
        return [(LOCAL_ENGINE, f"Local · {name}"), *local, *remote]

    def engine_label(self, engine_id: str) -> str:
        """An engine id's label in the pickers ("Local · gemma-3-270m-q4_k_m", a server's name)."""
        return dict(self.engine_choices()).get(engine_id) or (
            local_label(path) if (path := model_path_of(engine_id)) else engine_id
        )

    def model_defaults_for(self, engine_id: str) -> dict[str, Any]:
        """The defaults of the local model ``engine_id`` names ({} for a server, or a model not listed)."""
        info = self._default()
        path = info.get("path", "") if engine_id == LOCAL_ENGINE else model_path_of(engine_id) or ""
        row: Mapping[str, Any] | None = next(
            (m for m in self.local_models if path and m["path"] == path), None
        )
        if row is None and engine_id == LOCAL_ENGINE:
            row = info
        return dict((row or {}).get("model_defaults") or {})

    def sampling_for(self, tab: ChatTab) -> dict[str, Any]:
        """The global sampling settings where the user set them, else the tab's model's own (its
        file's recommended settings, if any), overridden by the tab's own (conversation settings)."""
        settings = self._settings()
        defaults = section_defaults("sampling")
        own = self.model_defaults_for(tab.engine_picker.engine_id).get("sampling", {})
        chosen = {key: value for key, value in settings.sampling.items() if value != defaults.get(key)}
        sampling = {**settings.sampling, **own, **chosen, **tab.conversation_settings.get("sampling", {})}
        sampling["stop"] = list(sampling.get("stop", ()))
        return sampling

    def keep_tabs_on_their_model(self, tabs: list[ChatTab], current: object) -> None:
        """The default model is about to change: every tab but ``current`` that answers with it
        ("local") keeps its model ("model:<path>"); only the current tab and new ones take the new one."""
        path = self._default().get("path")
        if not path:
            return
        for tab in tabs:
            if tab is not current and tab.engine_picker.engine_id == LOCAL_ENGINE:
                tab.set_engine(model_engine_id(path))
