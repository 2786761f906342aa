"""What the settings and their dialogs need from the engine's option classes, as plain values.

No Qt here (the settings dataclass and its file use it without a window). The engine's option
dataclasses (``KvCacheOptions``, ``BatchingOptions``, ``InferenceOptions``) are the judges of every
value: ``engine_options`` gives their names, defaults and types, ``validate_settings`` their verdict
on a set of values, ``session_limits`` the tokens one conversation may hold under KV options.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from engine import BatchingOptions, InferenceOptions, KvCacheOptions
from engine.constraints import Constraint, ConstraintError
from engine.kv_cache import KV_DTYPES, Q8_BLOCK, ModelShape

from .. import paths

_SETTINGS_SECTIONS: dict[str, Any] = {
    "kv_cache": KvCacheOptions,
    "batching": BatchingOptions,
    "sampling": InferenceOptions,
}


# What only API requests set (the server reads them from a request; the app has no setting for them).
API_ONLY_OPTIONS = frozenset(
    {"presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "prompt_logprobs"}
)


def engine_options() -> dict[str, dict[str, tuple[Any, str]]]:
    """Each settings section's engine options: {section: {name: (default, type as annotated)}}.

    The types are the dataclass annotations as text ("int", "float", "int | None", ...).
    """
    return {section: _options_of(cls) for section, cls in _SETTINGS_SECTIONS.items()}


def _options_of(cls: Any) -> dict[str, tuple[Any, str]]:
    defaults = cls()
    fields = [f for f in dataclasses.fields(cls) if f.name not in API_ONLY_OPTIONS]
    return {f.name: (getattr(defaults, f.name), str(f.type)) for f in fields}


def json_schema_problem(text: str) -> str:
    """'' when ``text`` is a JSON schema the engine can enforce on a reply, else what is wrong with it
    (the Sampling dialog's Structured output checks it as it is typed)."""
    try:
        Constraint.json_schema(text).check()
    except ConstraintError as exc:
        return str(exc)
    return ""


# validate_settings's section names: the settings sections, "kv_cache" as "kv"
_OPTION_CLASSES: dict[str, Any] = {
    "kv" if section == "kv_cache" else section: cls for section, cls in _SETTINGS_SECTIONS.items()
}
_CLASS_PREFIX = re.compile(rf"^({'|'.join(cls.__name__ for cls in _OPTION_CLASSES.values())})\.")


def validate_settings(
    kv: Mapping[str, Any], batching: Mapping[str, Any], sampling: Mapping[str, Any]
) -> dict:
    """Every problem with these option values, as {"<section>.<field name>": message}; {} when valid.

    The engine's option classes are the judges; an invalid field is reset to its default and the
    rest checked again, so several problems are reported at once.
    """
    errors: dict[str, str] = {}
    for section, values in (("kv", kv), ("batching", batching), ("sampling", sampling)):
        cls = _OPTION_CLASSES[section]
        names = [f.name for f in dataclasses.fields(cls)]
        defaults = cls()
        current = {k: v for k, v in values.items() if k in names}
        for unknown in sorted(set(values) - set(names)):
            errors[f"{section}.{unknown}"] = f"unknown setting {unknown!r}"
        for _ in range(len(names) + 1):
            try:
                cls(**current)
                break
            except (ValueError, TypeError) as exc:
                message = _CLASS_PREFIX.sub("", str(exc))
                field = _field_named(message, names) or next(iter(current), names[0])
                errors[f"{section}.{field}"] = message
                current[field] = getattr(defaults, field)
    return errors


def _field_named(message: str, names: list[str]) -> str | None:
    """The field an engine message is about: the option name it mentions first."""
    found = [(m.start(), name) for name in names if (m := re.search(rf"\b{name}\b", message))]
    return min(found)[1] if found else None


def session_limits(kv: Mapping[str, Any], model_info: Mapping[str, Any]) -> tuple[int, int]:
    """(tokens one conversation may hold, KV bytes per token) for these KV options and this model."""
    dtype = str(kv.get("dtype", "float32"))
    head_dim = int(model_info["head_dim"])
    if dtype not in KV_DTYPES or (dtype == "q8_0" and head_dim % Q8_BLOCK):  # the engine says why
        dtype = "float32"
    shape = ModelShape(int(model_info["n_layers"]), int(model_info["n_kv_heads"]), head_dim, dtype)
    context = int(model_info["context_length"])
    if not kv.get("enabled", True):
        return context, shape.bytes_per_token
    by_tokens = int(kv.get("max_tokens_per_session", context))
    by_bytes = int(kv.get("max_bytes_per_session", 0)) // shape.bytes_per_token
    return max(0, min(by_tokens, by_bytes, context)), shape.bytes_per_token


def with_disk_dir(options: KvCacheOptions) -> KvCacheOptions:
    """The options with the app's KV folder (in its cache dir) when the settings name none."""
    if options.disk_dir is not None:
        return options
    return dataclasses.replace(options, disk_dir=str(paths.kv_disk_dir()))
