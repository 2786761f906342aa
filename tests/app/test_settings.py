"""smallmind_app.settings.app_settings and paths: round trips, every kind of bad file, failing saves.

Real files under each test's tmp dir (the autouse fixture points SMALLMIND_HOME there); no mocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from engine import BatchingOptions, InferenceOptions, KvCacheOptions
from smallmind_app import paths
from smallmind_app.settings.app_settings import (
    SCHEMA_VERSION,
    AppSettings,
    SettingsError,
    load_settings,
    save_settings,
)

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _custom() -> AppSettings:
    return AppSettings(
        model_path="/models/a model.gguf",
        system_prompt="Réponds en français. 🙂",
        kv_cache={"max_sessions": 12, "dtype": "float16"},
        batching={"enabled": False, "max_batch_wait_ms": 2.5},
        sampling={"temperature": 0.2, "seed": 7, "stop": ["\n\n", "User:"], "max_time_ms": 5000},
    )


def _asides(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


# ---------------------------------------------------------------------------------------------------
# paths


def test_paths_follow_smallmind_home(_isolated_home: Path) -> None:
    assert paths.config_dir() == _isolated_home / "config"
    assert paths.data_dir() == _isolated_home / "data"
    assert paths.log_dir() == _isolated_home / "logs"
    assert paths.settings_file() == _isolated_home / "config" / "settings.json"
    assert paths.database_file() == _isolated_home / "data" / "conversations.sqlite3"
    assert paths.log_file().parent == _isolated_home / "logs"


def test_the_app_paths_are_the_engine_paths() -> None:
    from engine import paths as engine_paths  # one source: the app adds its files, not its own directories

    assert paths.HOME_ENV == engine_paths.HOME_ENV and paths.MODEL_ENV == engine_paths.MODEL_ENV
    for name in ("data_dir", "config_dir", "log_dir", "cache_dir", "models_dir"):
        assert getattr(paths, name) is getattr(engine_paths, name), name


def test_aside_path_never_names_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "settings.json"
    first = paths.aside_path(target)
    first.write_text("taken")
    second = paths.aside_path(target)
    assert second != first and not second.exists()
    assert second.name.startswith("settings.json.corrupt-")


# ---------------------------------------------------------------------------------------------------
# AppSettings


def test_defaults() -> None:
    settings = AppSettings()
    assert settings.schema_version == SCHEMA_VERSION == 3
    assert settings.model_path is None
    assert settings.system_prompt == ""  # none of its own: each model's (SmolLM2's template writes its own)
    assert (settings.max_loaded_model_bytes, settings.model_idle_ttl_s) == (None, 3600.0)
    assert settings.kv_cache["max_bytes_total"] == 1_073_741_824
    assert settings.batching["max_prefill_chunk_tokens"] == 256
    assert settings.sampling["stop"] == () and settings.sampling["seed"] is None


def test_section_keys_and_defaults_are_the_engines() -> None:
    """The settings sections are taken from the engine's option dataclasses (worker.engine_options):
    every name and default (but the options only API requests set), and a typed value of the settings
    is one the engine accepts."""
    from smallmind_app.worker.engine_options import API_ONLY_OPTIONS

    for section, options in (
        ("kv_cache", KvCacheOptions),
        ("batching", BatchingOptions),
        ("sampling", InferenceOptions),
    ):
        defaults = options()  # a field's default may come from a factory (batching.activations)
        engine_defaults = {
            f.name: getattr(defaults, f.name)
            for f in dataclasses.fields(options)
            if f.name not in API_ONLY_OPTIONS
        }
        assert dict(getattr(AppSettings(), section)) == engine_defaults, section
    custom = _custom()
    KvCacheOptions(**custom.kv_cache)
    BatchingOptions(**custom.batching)
    InferenceOptions(**custom.sampling)


def test_settings_are_immutable_and_hashable() -> None:
    settings = AppSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model_path = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.sampling["temperature"] = 1.0  # type: ignore[index]
    assert hash(settings) == hash(AppSettings())
    assert {settings, AppSettings()} == {settings}
    assert _custom() != settings


def test_missing_section_keys_get_defaults_and_ints_are_accepted_as_floats() -> None:
    settings = AppSettings(sampling={"temperature": 1})
    assert settings.sampling["temperature"] == 1.0 and isinstance(settings.sampling["temperature"], float)
    assert settings.sampling["top_k"] == 40


def test_with_changes_merges_sections() -> None:
    changed = AppSettings().with_changes(model_path="/m.gguf", sampling={"top_k": 5})
    assert changed.model_path == "/m.gguf"
    assert changed.sampling["top_k"] == 5 and changed.sampling["temperature"] == 0.7
    assert AppSettings().sampling["top_k"] == 40


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sampling": {"temprature": 0.5}}, "sampling has unknown setting"),
        ({"sampling": {"temperature": "0.5"}}, "sampling.temperature must be a number"),
        ({"sampling": {"top_k": 4.0}}, "sampling.top_k must be an integer"),
        ({"kv_cache": {"enabled": 1}}, "kv_cache.enabled must be true or false"),
        ({"sampling": {"stop": "END"}}, "sampling.stop must be a list of strings"),
        ({"system_prompt": None}, "system_prompt must be a string"),
        ({"schema_version": 99}, "schema_version must be an integer from 1 to 3"),
    ],
)
def test_wrong_types_name_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AppSettings().with_changes(**changes)


def test_json_round_trip() -> None:
    custom = _custom()
    assert AppSettings.from_json(custom.to_json()) == custom
    assert json.loads(custom.to_json())["sampling"]["stop"] == ["\n\n", "User:"]


# ---------------------------------------------------------------------------------------------------
# load_settings / save_settings


def test_save_and_load_round_trip_in_the_config_dir(_isolated_home: Path) -> None:
    save_settings(_custom())
    assert paths.settings_file().is_file()
    assert load_settings() == (_custom(), None)
    assert os.listdir(paths.config_dir()) == ["settings.json"]  # no temp file left behind


def test_missing_file_gives_defaults_without_notice_or_file() -> None:
    assert load_settings() == (AppSettings(), None)
    assert not paths.settings_file().exists()


def _good_json(**overrides: Any) -> str:
    data = AppSettings().to_dict() | overrides
    return json.dumps(data)


CORRUPT_FILES = {
    "truncated JSON": (_good_json()[:40], "not valid JSON"),
    "number as a string": (
        _good_json(sampling={"temperature": "0.7"}),
        "sampling.temperature must be a number, got '0.7'",
    ),
    "list where a dict belongs": (_good_json(batching=[["enabled", True]]), "batching must be an object"),
    "top level is a list": ("[1, 2]", "the top level must be an object"),
    "newer schema_version": (_good_json(schema_version=4), "written by a newer SmallMind"),
    "unknown top-level key": (_good_json(font_size=14), "unknown setting(s) font_size"),
    "null where a bool belongs": (
        _good_json(kv_cache={"enabled": None}),
        "kv_cache.enabled must be true or false",
    ),
    "model_path a number": (_good_json(model_path=3), "model_path must be a string or null"),
    "empty file": ("", "not valid JSON"),
}


@pytest.mark.parametrize("case", CORRUPT_FILES)
def test_bad_file_gives_defaults_a_notice_and_is_kept_aside(case: str) -> None:
    text, reason = CORRUPT_FILES[case]
    path = paths.settings_file()
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")

    settings, notice = load_settings()

    assert settings == AppSettings()
    assert notice is not None and str(path) in notice and reason in notice
    assert not path.exists()
    [aside] = _asides(path)
    assert aside.name in notice
    assert aside.read_text(encoding="utf-8") == text


def test_non_utf8_file_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(b'{"system_prompt": "\xff\xfe"}')
    settings, notice = load_settings(path)
    assert settings == AppSettings()
    assert notice is not None and "not UTF-8" in notice
    [aside] = _asides(path)
    assert aside.read_bytes() == b'{"system_prompt": "\xff\xfe"}'


def test_bad_files_moved_aside_never_overwrite_each_other(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    for text in ("{broken 1", "{broken 2", "{broken 3"):  # likely within one second: same timestamp
        path.write_text(text)
        assert load_settings(path)[1] is not None
    assert sorted(aside.read_text() for aside in _asides(path)) == ["{broken 1", "{broken 2", "{broken 3"]


def test_unknown_engine_keys_are_dropped_with_a_notice_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    data = _custom().to_dict()
    data["sampling"]["typical_p"] = 0.9
    data["kv_cache"]["old_option"] = 1
    del data["batching"]["max_batch_size"]  # missing keys: defaults
    path.write_text(json.dumps(data))

    settings, notice = load_settings(path)

    assert settings == _custom().with_changes(batching={"max_batch_size": 8})
    assert notice is not None and "sampling.typical_p" in notice and "kv_cache.old_option" in notice
    assert str(path) in notice
    assert path.exists() and not _asides(path)


def test_unreadable_path_gives_defaults_and_a_notice(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.mkdir()  # a directory where the file belongs: reading fails with an OSError, not bad content
    settings, notice = load_settings(path)
    assert settings == AppSettings()
    assert notice is not None and "Could not read" in notice and str(path) in notice


def _can_create_files_in(directory: Path) -> bool:
    probe = directory / ".probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return False
    probe.unlink()
    return True


def test_save_into_read_only_config_dir_raises_settings_error(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    previous = _custom().to_json()
    (config / "settings.json").write_text(previous)
    config.chmod(0o555)
    try:
        target = config / "settings.json"
        if _can_create_files_in(config):
            # Running as root (CI containers): permission bits do not stop root, and read-only mounts
            # need privileges. Make the write fail another way: a "config dir" that is a regular file,
            # so creating the temp file in it fails with ENOTDIR, as a read-only dir fails with EACCES.
            target = config / "settings.json" / "settings.json"
        with pytest.raises(SettingsError, match="cannot save the settings to") as raised:
            save_settings(AppSettings(), target)
        assert str(target) in str(raised.value)
    finally:
        config.chmod(0o755)
    assert (config / "settings.json").read_text() == previous  # the old file is untouched
    assert os.listdir(config) == ["settings.json"]


def test_save_where_a_parent_is_a_regular_file_raises_settings_error(tmp_path: Path) -> None:
    (tmp_path / "config").write_text("a file, not a directory")
    with pytest.raises(SettingsError, match=r"not a directory|is a file"):
        save_settings(AppSettings(), tmp_path / "config" / "settings.json")


def test_save_onto_a_directory_raises_and_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "settings.json").mkdir()
    with pytest.raises(SettingsError, match="is a directory"):
        save_settings(AppSettings(), tmp_path / "settings.json")
    assert os.listdir(tmp_path) == ["settings.json"]


def test_save_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "settings.json"
    save_settings(AppSettings(), path)  # creates the directories
    before = path.stat().st_ino
    save_settings(_custom(), path)
    assert path.stat().st_ino != before  # a new file renamed into place, not the old one rewritten
    assert load_settings(path) == (_custom(), None)
