"""Every path the app uses, resolved in one place.

``SMALLMIND_HOME`` moves all of them (tests point it at a temporary directory; a portable install
points it next to the program). Without it, the platform's usual user directories are used.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "smallmind"
HOME_ENV = "SMALLMIND_HOME"
MODEL_ENV = "SMALLMIND_MODEL"
# The API server's port: `smallmind serve`, the in-app server and the address a new remote engine
# starts from (one source; the server, the command line and the app read it from here).
DEFAULT_PORT = 8080


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


def models_dir() -> Path:
    return data_dir() / "models"


def cache_dir() -> Path:
    """Things that can be rebuilt: compiled kernels."""
    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
