"""Remote engines as the app remembers them: an endpoint is a name, a base URL and a model (Jan and
GPT4All's "custom provider"); its API key is kept apart, by ``ApiKeyStore``, never in the settings
file, the conversations database or the log.

Keys go to the OS keyring (``keyring``: Keychain, Windows Credential Locker, Secret Service). When no
keyring backend works (a headless Linux box), or when ``SMALLMIND_HOME`` moves the app's files (tests,
portable installs: everything of the app stays under that directory), they go to
``<config dir>/api_keys.json``, a file only its owner may read or write (mode 0600).

Engine ids: ``"local"`` is the default local model; ``"model:<path>"`` another local model (a file);
an endpoint's id is a short random hex string, so a renamed endpoint keeps its conversations and its key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import paths

log = logging.getLogger(__name__)

LOCAL_ENGINE = "local"  # the default local model (Settings → Model)
MODEL_PREFIX = "model:"  # another local model: "model:<path of its GGUF file>"
ENGINE_KEY = (
    "engine"  # a conversation's engine, in its settings JSON ("local", "model:<path>" or an endpoint id)
)


def model_engine_id(path: str) -> str:
    """The engine id of the local model in ``path``."""
    return MODEL_PREFIX + path


def model_path_of(engine_id: str) -> str | None:
    """The model file an engine id names ("model:<path>"), else None ("local" or an endpoint id)."""
    return engine_id[len(MODEL_PREFIX) :] if engine_id.startswith(MODEL_PREFIX) else None


def is_local(engine_id: str) -> bool:
    """Whether the engine id names a model of this computer (the default one, or another)."""
    return engine_id == LOCAL_ENGINE or engine_id.startswith(MODEL_PREFIX)


def local_label(path: str) -> str:
    """A local model's label in the tabs' pickers."""
    return f"Local · {Path(path).stem}"


KEYRING_SERVICE = "SmallMind"
KEY_FILE_NAME = "api_keys.json"
MAX_NAME_CHARS = 80


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An OpenAI-compatible server the tabs may use (the key is not part of it)."""

    id: str
    name: str
    base_url: str
    model: str = ""

    def __post_init__(self) -> None:
        for name in ("id", "name", "base_url", "model"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"engines: {name} must be a string, got {getattr(self, name)!r}")
        if not self.id or self.id == LOCAL_ENGINE:
            raise ValueError(f"engines: id {self.id!r} is not allowed (empty, or the local engine's)")
        if not self.name.strip() or len(self.name) > MAX_NAME_CHARS:
            raise ValueError(f"engines: name must be 1 to {MAX_NAME_CHARS} characters, got {self.name!r}")
        problem = url_problem(self.base_url)
        if problem:
            raise ValueError(f"engines: {self.name}: {problem}")

    @classmethod
    def new(cls, name: str, base_url: str, model: str = "") -> Endpoint:
        return cls(uuid.uuid4().hex[:12], name, base_url, model)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Endpoint:
        if not isinstance(data, Mapping):
            raise ValueError(f"engines: each endpoint must be an object, got {data!r}")
        unknown = sorted(set(data) - {"id", "name", "base_url", "model"})
        if unknown:  # an "api_key" here would be a key in the settings file: refuse it loudly
            raise ValueError(f"engines: unknown field(s) {', '.join(map(str, unknown))}")
        return cls(**{k: data[k] for k in ("id", "name", "base_url", "model") if k in data})

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "base_url": self.base_url, "model": self.model}

    @property
    def label(self) -> str:
        """How the tab's engine picker shows it: ``name · model``."""
        return f"{self.name} · {self.model or 'server default model'}"


def url_problem(url: str) -> str:
    """What is wrong with a base URL, in words ("" when it is usable)."""
    text = url.strip()
    if not text:
        return "the base URL is empty"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"the base URL {text!r} must start with http:// or https:// and name a host"
    if parts.query or parts.fragment:
        return f"the base URL {text!r} must not have a query (?…) or fragment (#…)"
    return ""


def endpoints_from(data: Any) -> tuple[Endpoint, ...]:
    """The settings file's ``engines`` list, checked; ValueError names the bad entry."""
    if not isinstance(data, list | tuple):
        raise ValueError(f"engines must be a list of endpoints, got {data!r}")
    found = tuple(e if isinstance(e, Endpoint) else Endpoint.from_dict(e) for e in data)
    ids = [e.id for e in found]
    if len(set(ids)) != len(ids):
        raise ValueError(f"engines: endpoint ids must be unique, got {ids}")
    return found


class ApiKeyStore:
    """Endpoint id -> API key, in the OS keyring or the owner-only fallback file (see the docstring)."""

    def __init__(self, fallback_file: Path | None = None, keyring_backend: Any = None) -> None:
        self.fallback_file = fallback_file or paths.config_dir() / KEY_FILE_NAME
        self._keyring = keyring_backend
        if keyring_backend is None and not os.environ.get(paths.HOME_ENV, "").strip():
            self._keyring = _usable_keyring()

    @property
    def where(self) -> str:
        """Where the keys are kept, for the settings page."""
        if self._keyring is not None:
            return f"the system keyring ({type(self._keyring).__name__})"
        return f"{self.fallback_file} (readable only by you)"

    def get(self, endpoint_id: str) -> str:
        if self._keyring is not None:
            with contextlib.suppress(Exception):  # a locked or broken keyring: no key, said in the log
                return self._keyring.get_password(KEYRING_SERVICE, endpoint_id) or ""
            log.warning("the keyring could not be read for endpoint %s", endpoint_id)
            return ""
        return str(self._read_file().get(endpoint_id, ""))

    def set(self, endpoint_id: str, key: str) -> None:
        """Keep ``key`` for the endpoint ("" forgets it). Raises OSError when it cannot be saved."""
        if not key:
            self.delete(endpoint_id)
            return
        if self._keyring is not None:
            self._keyring.set_password(KEYRING_SERVICE, endpoint_id, key)
            return
        keys = self._read_file()
        keys[endpoint_id] = key
        self._write_file(keys)

    def delete(self, endpoint_id: str) -> None:
        if self._keyring is not None:
            with contextlib.suppress(Exception):  # there was none
                self._keyring.delete_password(KEYRING_SERVICE, endpoint_id)
            return
        keys = self._read_file()
        if keys.pop(endpoint_id, None) is not None:
            self._write_file(keys)

    def _read_file(self) -> dict[str, str]:
        try:
            data = json.loads(self.fallback_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("the API key file %s cannot be read: %s", self.fallback_file, type(exc).__name__)
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_file(self, keys: dict[str, str]) -> None:
        """Atomically, created 0600 (mkstemp's mode) so it is never readable by others, even briefly."""
        folder = self.fallback_file.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.fallback_file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(keys, out)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR)
            os.replace(tmp, self.fallback_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _usable_keyring() -> Any:
    """The OS keyring when a real backend is there (priority > 0, not keyring's "fail" one), else None."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:  # a backend that fails while it is probed
        return None
    if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) <= 0:
        return None
    return backend
