"""Endpoints in the settings (never with a key) and the API key store: the OS keyring when a backend
works, else a file only its owner can read."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from smallmind_app import paths
from smallmind_app.engines.endpoints import KEYRING_SERVICE, ApiKeyStore, Endpoint, _usable_keyring
from smallmind_app.settings.app_settings import AppSettings, load_settings, save_settings


class MemoryKeyring:
    """Keyring's backend methods over a dict, standing in for the OS keyring this headless machine does
    not have (not a KeyringBackend subclass: those register themselves as the process's keyring)."""

    def __init__(self) -> None:
        self.passwords: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.passwords.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.passwords[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        del self.passwords[(service, username)]


def test_without_a_keyring_keys_go_to_an_owner_only_file(tmp_path: Path) -> None:
    assert _usable_keyring() is None  # this machine: no Secret Service, keyring's "fail" backend
    store = ApiKeyStore()  # SMALLMIND_HOME is set by the tests: the file under it in any case
    assert store.fallback_file == paths.config_dir() / "api_keys.json"
    assert "readable only by you" in store.where
    store.set("a1", "sk-one")
    store.set("b2", "sk-two")
    assert stat.S_IMODE(store.fallback_file.stat().st_mode) == 0o600
    assert ApiKeyStore().get("a1") == "sk-one" and store.get("b2") == "sk-two" and store.get("zz") == ""
    store.set("a1", "")  # an empty key forgets it
    assert json.loads(store.fallback_file.read_text()) == {"b2": "sk-two"}
    store.delete("b2")
    assert store.get("b2") == "" and list(store.fallback_file.parent.glob(".api_keys*")) == []


def test_a_damaged_key_file_gives_no_keys_and_is_replaced_on_the_next_save(tmp_path: Path) -> None:
    store = ApiKeyStore(tmp_path / "keys.json")
    store.fallback_file.write_text("{not json", encoding="utf-8")
    assert store.get("a1") == ""
    store.set("a1", "sk")
    assert store.get("a1") == "sk" and stat.S_IMODE(store.fallback_file.stat().st_mode) == 0o600


def test_with_a_keyring_keys_go_there_and_no_file_is_written(tmp_path: Path) -> None:
    ring = MemoryKeyring()
    store = ApiKeyStore(tmp_path / "keys.json", keyring_backend=ring)
    store.set("a1", "sk-ring")
    assert ring.passwords == {(KEYRING_SERVICE, "a1"): "sk-ring"} and store.get("a1") == "sk-ring"
    assert not store.fallback_file.exists() and "keyring" in store.where
    store.delete("a1")
    store.delete("never-there")  # no error
    assert ring.passwords == {} and store.get("a1") == ""


def test_endpoints_round_trip_through_the_settings_file_without_keys() -> None:
    box = Endpoint.new("GPU box", "https://gpu.example:8000/v1", "Qwen/Qwen2.5-7B-Instruct")
    settings = AppSettings(engines=(box,), default_engine=box.id)
    save_settings(settings)
    data = json.loads(paths.settings_file().read_text(encoding="utf-8"))
    assert data["engines"] == [box.to_dict()] and data["default_engine"] == box.id
    assert "api_key" not in json.dumps(data)
    loaded, notice = load_settings()
    assert notice is None and loaded == settings and hash(loaded) == hash(settings)
    assert loaded.engines[0].label == "GPU box · Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.parametrize(
    ("engines", "default", "problem"),
    [
        ([{"id": "x1", "name": "a", "base_url": "http://h/v1", "api_key": "sk"}], "local", "unknown field"),
        ([{"id": "x1", "name": "a", "base_url": "h:80"}], "local", "must start with http"),
        ([{"id": "local", "name": "a", "base_url": "http://h"}], "local", "not allowed"),
        ([], "x9", "default_engine"),
        ("http://h", "local", "must be a list"),
    ],
)
def test_a_settings_file_with_bad_endpoints_is_set_aside(engines: Any, default: str, problem: str) -> None:
    path = paths.settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"engines": engines, "default_engine": default}), encoding="utf-8")
    settings, notice = load_settings()
    assert settings == AppSettings() and notice is not None and problem in notice
