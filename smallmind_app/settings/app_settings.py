"""The app's settings: one frozen dataclass, saved as JSON in the config dir.

``AppSettings`` holds the model path, the default system prompt and three sections of engine
options (``kv_cache``, ``batching``, ``sampling``) as read-only mappings whose keys are the engine's
option names; the names, defaults and types come from the engine's option dataclasses (through
``worker/engine_options.py``, beside the app's one door to the engine), never declared here. This module
checks structure and JSON types only (unknown keys, a string where a number belongs); whether a
value is in range is the engine's call, made by the worker.

``load_settings`` never fails: a missing file gives the defaults; a file it cannot use gives the
defaults too, is moved aside to ``settings.json.corrupt-<timestamp>`` (never overwritten) and the
returned notice says so. Its ``check`` argument is the range check (the app passes the engine's, see
``app.settings_problems``): a file with a value out of range is treated as unusable in the same way.
``save_settings`` writes atomically and raises ``SettingsError``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .. import paths
from ..colors import check_choice
from ..engines.endpoints import LOCAL_ENGINE, Endpoint, endpoints_from
from ..paths import default_system_prompt, smollm2_system_prompt
from ..worker.api_server import DEFAULT_PORT
from ..worker.engine_options import engine_options
from .presets import DEFAULT_PRESETS, check_presets

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: the repetition penalty's default became 1.1; 3: each model's own system prompt


MIN_LOADED_MODEL_BYTES = 64 * 2**20  # the smallest memory limit for loaded models (a tiny model's worth)
MAX_IDLE_TTL_S = 30 * 86_400.0


def check_preset_models(value: Any) -> dict[str, str]:
    """``value`` as {preset name: engine id} (a preset tied to a model); ValueError naming the problem."""
    if not isinstance(value, Mapping):
        raise ValueError(f"preset_models must be an object of preset name: engine id, got {value!r}")
    for name, engine_id in value.items():
        if not isinstance(name, str) or not isinstance(engine_id, str) or not engine_id:
            raise ValueError(f"preset_models: {name!r}: {engine_id!r} must be a preset name and an engine id")
    return dict(value)


class SettingsError(Exception):
    """The settings could not be saved; the message says where and why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


def _is_constraint(value: Any) -> bool:
    return value is None or (
        isinstance(value, Mapping)
        and set(value) == {"kind", "value"}
        and all(isinstance(v, str) for v in value.values())
    )


# kind -> (what the JSON value must be, check, normalise)
_KINDS: dict[str, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool), bool),
    "int": ("an integer", _is_int, int),
    "number": ("a number", lambda v: _is_int(v) or isinstance(v, float), float),
    "str": ("a string", lambda v: isinstance(v, str), str),
    "int|null": ("an integer or null", lambda v: v is None or _is_int(v), lambda v: v),
    "str|null": ("a string or null", lambda v: v is None or isinstance(v, str), lambda v: v),
    "str list": ("a list of strings", _is_str_list, tuple),
    "constraint|null": ("an object with 'kind' and 'value', or null", _is_constraint, lambda v: v),
}

# The engine's option types (dataclass annotations) as the JSON kinds above; a new type fails at import.
_KIND_OF_TYPE = {
    "bool": "bool",
    "int": "int",
    "float": "number",
    "str": "str",
    "int | None": "int|null",
    "str | None": "str|null",
    "tuple[str, ...]": "str list",
    "Constraint | None": "constraint|null",  # structured output: {"kind": "json_schema", "value": "..."}
}

# section -> key -> (default, kind): the names, defaults and types of the engine's option dataclasses
# (KvCacheOptions, BatchingOptions, InferenceOptions), handed over by the worker as plain values.
SECTIONS: dict[str, dict[str, tuple[Any, str]]] = {
    section: {name: (default, _KIND_OF_TYPE[type_name]) for name, (default, type_name) in options.items()}
    for section, options in engine_options().items()
}


def section_defaults(section: str) -> Mapping[str, Any]:
    return MappingProxyType({key: default for key, (default, _) in SECTIONS[section].items()})


def _check_value(name: str, value: Any, kind: str) -> Any:
    expected, check, normalise = _KINDS[kind]
    if not check(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return normalise(value)


def _freeze_section(section: str, values: Any) -> Mapping[str, Any]:
    """The section's defaults overlaid with `values`, type-checked, as a read-only mapping."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{section} must be an object of settings, got {values!r}")
    spec = SECTIONS[section]
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise ValueError(f"{section} has unknown setting(s) {', '.join(map(str, unknown))}")
    merged = {key: values.get(key, default) for key, (default, _) in spec.items()}
    checked = {key: _check_value(f"{section}.{key}", merged[key], spec[key][1]) for key in spec}
    return MappingProxyType(checked)


@dataclass(frozen=True, slots=True)
class AppSettings:
    """Everything the app remembers between runs except conversations. Change with `with_changes`."""

    schema_version: int = SCHEMA_VERSION
    model_path: str | None = None
    system_prompt: str = field(default_factory=default_system_prompt)
    kv_cache: Mapping[str, Any] = field(default_factory=lambda: section_defaults("kv_cache"))
    batching: Mapping[str, Any] = field(default_factory=lambda: section_defaults("batching"))
    sampling: Mapping[str, Any] = field(default_factory=lambda: section_defaults("sampling"))
    server_port: int = DEFAULT_PORT  # Tools → Local server…: the port the in-app API server listens on
    engines: tuple[Endpoint, ...] = ()  # Settings → Engines: remote endpoints (their keys are not here)
    default_engine: str = LOCAL_ENGINE  # the engine of a new tab: "local" or an endpoint id
    theme: str = "system"  # "system" (follow the system's color scheme), "light" or "dark"
    prompt_presets: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(dict(DEFAULT_PRESETS)))
    preset_models: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({})
    )  # preset -> engine id
    max_loaded_model_bytes: int | None = None  # "Loaded models: memory limit" (None: half the memory)
    model_idle_ttl_s: float = 3600.0  # a local model unused this long is unloaded (0: only for room)

    def __post_init__(self) -> None:
        if not _is_int(self.schema_version) or not 1 <= self.schema_version <= SCHEMA_VERSION:
            raise ValueError(
                f"schema_version must be an integer from 1 to {SCHEMA_VERSION}, got {self.schema_version!r}"
            )
        if self.model_path is not None and not isinstance(self.model_path, str):
            raise ValueError(f"model_path must be a string or null, got {self.model_path!r}")
        _check_value("system_prompt", self.system_prompt, "str")
        if not _is_int(self.server_port) or not 1024 <= self.server_port <= 65_535:
            raise ValueError(f"server_port must be a port from 1024 to 65535, got {self.server_port!r}")
        for section in SECTIONS:  # frozen: the only way to store the checked, read-only copies
            object.__setattr__(self, section, _freeze_section(section, getattr(self, section)))
        object.__setattr__(self, "engines", endpoints_from(self.engines))
        if self.default_engine not in (LOCAL_ENGINE, *(e.id for e in self.engines)):
            raise ValueError(
                f"default_engine must be 'local' or an endpoint's id, got {self.default_engine!r}"
            )
        check_choice(self.theme)
        object.__setattr__(self, "prompt_presets", MappingProxyType(check_presets(self.prompt_presets)))
        object.__setattr__(self, "preset_models", MappingProxyType(check_preset_models(self.preset_models)))
        limit = self.max_loaded_model_bytes
        if limit is not None and (not _is_int(limit) or not limit >= MIN_LOADED_MODEL_BYTES):
            raise ValueError(f"max_loaded_model_bytes must be null or at least {MIN_LOADED_MODEL_BYTES:,} "
                             f"bytes, got {limit!r}")  # fmt: skip
        ttl = self.model_idle_ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 <= ttl <= MAX_IDLE_TTL_S:
            raise ValueError(f"model_idle_ttl_s must be from 0 to {MAX_IDLE_TTL_S:g} seconds, got {ttl!r}")
        object.__setattr__(self, "model_idle_ttl_s", float(ttl))

    def __hash__(self) -> int:  # the mappings are unhashable; their items are not
        sections = tuple(tuple(getattr(self, name).items()) for name in SECTIONS)
        engines = (self.engines, self.default_engine)
        presets = (tuple(self.prompt_presets.items()), tuple(self.preset_models.items()))
        models = (self.max_loaded_model_bytes, self.model_idle_ttl_s)
        return hash((self.schema_version, self.model_path, self.system_prompt, self.server_port, sections,
                     engines, self.theme, presets, models))  # fmt: skip

    def with_changes(self, **changes: Any) -> AppSettings:
        """A copy with `changes`; a section given as a dict is merged over the current section."""
        for section in SECTIONS:
            if section in changes:
                changes[section] = {**getattr(self, section), **changes[section]}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (lists, dicts)."""
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "model_path": self.model_path,
            "system_prompt": self.system_prompt,
            "server_port": self.server_port,
            "engines": [endpoint.to_dict() for endpoint in self.engines],
            "default_engine": self.default_engine,
            "theme": self.theme,
            "prompt_presets": dict(self.prompt_presets),
            "preset_models": dict(self.preset_models),
            "max_loaded_model_bytes": self.max_loaded_model_bytes,
            "model_idle_ttl_s": self.model_idle_ttl_s,
        }
        for section in SECTIONS:
            data[section] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in getattr(self, section).items()
            }
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AppSettings:
        """Parse `text`; ValueError says what is wrong. Unknown engine-section keys are dropped (logged)."""
        settings, dropped = _parse(text)
        if dropped:
            logger.warning("ignored unknown settings: %s", ", ".join(dropped))
        return settings


def _parse(text: str) -> tuple[AppSettings, list[str]]:
    """The settings in `text` and the dotted names of the unknown engine-section keys dropped from it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"it is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"the top level must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(AppSettings)})
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if _is_int(version) and version > SCHEMA_VERSION:
        raise ValueError(
            f"it was written by a newer SmallMind (schema_version {version}; this one reads {SCHEMA_VERSION})"
        )
    if _is_int(version) and version < SCHEMA_VERSION:
        _upgrade(data, version)
    dropped: list[str] = []
    for section in SECTIONS:
        values = data.get(section)
        if isinstance(values, dict):
            dropped += [f"{section}.{key}" for key in values if key not in SECTIONS[section]]
            data[section] = {key: v for key, v in values.items() if key in SECTIONS[section]}
    return AppSettings(**data), dropped


def _upgrade(data: dict[str, Any], version: int) -> None:
    """A file of an older SmallMind: version 1 saved the old default repetition penalty (1.0, off) with
    every other value, so 1.0 there means "the default" and becomes the new one (1.1). Versions 1-2
    saved SmolLM2's system prompt as the default one: it becomes none, so each model's own applies
    (a base model such as Gemma 3 270M must not be sent SmolLM2's)."""
    sampling = data.get("sampling")
    if version < 2 and isinstance(sampling, dict) and sampling.get("repetition_penalty") == 1.0:
        sampling["repetition_penalty"] = SECTIONS["sampling"]["repetition_penalty"][0]
    if version < 3 and data.get("system_prompt") == smollm2_system_prompt():
        data["system_prompt"] = ""
    data["schema_version"] = SCHEMA_VERSION


def load_settings(
    path: Path | str | None = None, check: Callable[[AppSettings], Mapping[str, str]] | None = None
) -> tuple[AppSettings, str | None]:
    """(settings, notice): the defaults when the file is missing or unusable; notice is for the user.

    ``check(settings)`` returns {setting name: what is wrong} for values out of range; any makes the
    file unusable (kept aside, defaults used), as a value of the wrong type does.
    """
    path = Path(path) if path is not None else paths.settings_file()
    try:
        settings, dropped = _parse(path.read_text(encoding="utf-8"))
        problems = dict(check(settings)) if check is not None else {}
        if problems:
            raise ValueError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    except FileNotFoundError:
        return AppSettings(), None
    except UnicodeDecodeError:
        return AppSettings(), _move_corrupt_aside(path, "it is not UTF-8 text")
    except ValueError as exc:
        return AppSettings(), _move_corrupt_aside(path, str(exc))
    except OSError as exc:
        logger.warning("cannot read %s: %s", path, exc)
        return (
            AppSettings(),
            f"Could not read the settings file {path} ({_describe(exc)}); using the defaults.",
        )
    if dropped:
        return settings, f"Ignored unknown settings in {path}: {', '.join(dropped)}."
    return settings, None


def _move_corrupt_aside(path: Path, reason: str) -> str:
    logger.warning("settings file %s is unusable: %s", path, reason)
    try:
        aside = paths.aside_path(path)
        os.replace(path, aside)
    except OSError as exc:
        logger.error("cannot move %s aside: %s", path, exc)
        return (
            f"The settings file {path} is unusable ({reason}) and could not be moved aside "
            f"({_describe(exc)}); using the defaults."
        )
    return (
        f"The settings file {path} is unusable ({reason}); "
        f"it was moved to {aside.name} and the defaults are used."
    )


def save_settings(settings: AppSettings, path: Path | str | None = None) -> None:
    """Write `settings` atomically (temp file in the same dir, fsync, os.replace); SettingsError if not."""
    path = Path(path) if path is not None else paths.settings_file()
    text = settings.to_json()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                tmp.write(text)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise SettingsError(f"cannot save the settings to {path}: {_describe(exc)}") from exc


_ERRNO_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.EISDIR: "the path is a directory",
    errno.ENOTDIR: "a parent of the path is not a directory",
    errno.EEXIST: "a parent of the path is a file, not a directory",
}


def _describe(exc: OSError) -> str:
    return _ERRNO_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
