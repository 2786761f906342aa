"""Every path the app uses, resolved in one place.

``SMALLMIND_HOME`` moves all of them to ``$SMALLMIND_HOME/{data,config,logs}`` (tests point it at a
temporary directory); without it, platformdirs' user directories for the app name "smallmind" are used.

This mirrors ``engine/paths.py`` (same variable, same layout) on purpose instead of importing it:
``import engine.paths`` runs ``engine/__init__.py``, which loads the whole engine, and only
``smallmind_app/worker.py`` may import the engine. Change both modules together.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import platformdirs

APP_NAME = "smallmind"
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
HOME_ENV = "SMALLMIND_HOME"


def _home() -> Path | None:
    value = os.environ.get(HOME_ENV, "").strip()
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """Conversations database and downloaded models."""
    home = _home()
    return home / "data" if home else Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def config_dir() -> Path:
    """Settings file."""
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def log_dir() -> Path:
    home = _home()
    return home / "logs" if home else Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    """Things that can be rebuilt: compiled kernels, the KV cache's session files."""
    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


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
def default_system_prompt() -> str:
    """SmolLM2's own default system prompt (the model was trained with it), from resources/.

    Here rather than in settings.py, which takes the engine's options from the worker: the store
    needs the prompt too and stays free of the engine.
    """
    return (RESOURCES_DIR / "default_system_prompt.txt").read_text(encoding="utf-8").strip()
