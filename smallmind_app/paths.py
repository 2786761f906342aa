"""Every path the app uses: the engine's directories (``engine/paths.py``, moved by ``SMALLMIND_HOME``)
and the app's own files in them.

``SMALLMIND_HOME`` moves all of them to ``$SMALLMIND_HOME/{data,config,logs,cache}`` (tests point it
at a temporary directory); without it, platformdirs' user directories for "smallmind" are used.
The directories are the engine's own functions (one source); this module adds the app's files, the
KV cache's folder and the app's resources (icon, default system prompt, desktop entry).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from engine.paths import (
    APP_NAME,
    DEFAULT_PORT,
    HOME_ENV,
    MODEL_ENV,
    cache_dir,
    config_dir,
    data_dir,
    log_dir,
    models_dir,
)

__all__ = [
    "APP_NAME",
    "DEFAULT_PORT",
    "HOME_ENV",
    "MODEL_ENV",
    "RESOURCES_DIR",
    "aside_path",
    "cache_dir",
    "config_dir",
    "data_dir",
    "database_file",
    "default_system_prompt",
    "kv_disk_dir",
    "log_dir",
    "log_file",
    "models_dir",
    "settings_file",
    "smollm2_system_prompt",
]


def _resources_dir() -> Path:
    """The repository's top-level ``resources/``: installed by the wheel as ``smallmind_app/resources``
    (pyproject.toml maps it there), read in place from a source checkout or an editable install."""
    package = Path(__file__).resolve().parent
    installed = package / "resources"
    return installed if installed.is_dir() else package.parent / "resources"


RESOURCES_DIR = _resources_dir()


def kv_disk_dir() -> Path:
    """The KV cache's disk tier (``kv_cache.disk_dir`` when the settings leave it unset)."""
    return cache_dir() / "kv"


def settings_file() -> Path:
    return config_dir() / "settings.json"


def database_file() -> Path:
    return data_dir() / "conversations.sqlite3"


def log_file() -> Path:
    return log_dir() / "smallmind.log"


def aside_path(path: Path, tag: str = "corrupt") -> Path:
    """A free sibling name for moving `path` aside: ``<name>.<tag>-<YYYYmmdd-HHMMSS>[-n]``, never existing."""
    stem = f"{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate = path.with_name(stem)
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{stem}-{n}")
        n += 1
    return candidate


@functools.cache
def smollm2_system_prompt() -> str:
    """SmolLM2's own default system prompt (its chat template writes it), from resources/: the app's
    built-in default before each model brought its own (the settings and the store upgrade it to "")."""
    return (RESOURCES_DIR / "default_system_prompt.txt").read_text(encoding="utf-8").strip()


def default_system_prompt() -> str:
    """The system prompt of a new conversation: none of its own, so its model's default applies (the
    chat template's own, if any: SmolLM2's writes one, a base model such as Gemma 3 270M has none)."""
    return ""
