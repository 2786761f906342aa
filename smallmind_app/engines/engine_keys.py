"""The remote engines' API keys as the window uses them: kept by ``ApiKeyStore`` (keyring, or a
0600 file), and those the store refused kept in memory until the app closes. No Qt."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from .endpoints import ApiKeyStore, Endpoint

log = logging.getLogger(__name__)


class EngineKeys:
    def __init__(self, store: ApiKeyStore | None = None) -> None:
        self.store = store or ApiKeyStore()
        self._unsaved: dict[str, str] = {}  # keys the key store refused: used until the app closes
        self.changed = False  # a key changed since the worker was last given the endpoints

    def key_of(self, endpoint_id: str) -> str:
        return self._unsaved.get(endpoint_id) or self.store.get(endpoint_id)

    def endpoints_with_keys(self, endpoints: Iterable[Endpoint]) -> list[dict[str, str]]:
        """The endpoints, each with its key, for the worker (which makes their engines)."""
        return [{**e.to_dict(), "api_key": self.key_of(e.id)} for e in endpoints]

    def choose(self, keys: Mapping[str, str], known: Iterable[str]) -> list[str]:
        """Keep the endpoints' keys and forget those of removed endpoints (ids in ``known``, not in
        ``keys``); the names of the errors of keys that could not be kept (they are used anyway)."""
        keys = {**keys, **{endpoint_id: "" for endpoint_id in set(known) - set(keys)}}
        failed = []
        for endpoint_id, key in keys.items():
            if key == self.key_of(endpoint_id):
                continue
            self.changed = True
            try:
                self.store.set(endpoint_id, key)
                self._unsaved.pop(endpoint_id, None)
            except Exception as exc:  # keyring errors are of many kinds; none may lose the other settings
                log.warning("API key not saved: %s", type(exc).__name__)
                self._unsaved[endpoint_id] = key
                failed.append(type(exc).__name__)
        return failed
