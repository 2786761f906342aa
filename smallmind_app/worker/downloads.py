"""Model files for the Models and first-run dialogs: the catalog and the GGUF files at hand, and
downloads on a plain Python thread (the same code as ``smallmind models pull KEY``).

No Qt: the worker hands in the functions that emit its signals (they are thread-safe).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import EngineError, download

log = logging.getLogger(__name__)

DOWNLOAD_PROGRESS_S = 0.1  # at most 10 progress signals a second
DOWNLOAD_JOIN_S = 8.0  # pull_model stops pip within 5 s of a cancel


class ModelDownloads:
    """One download at a time; ``progressed(phase, done, total)``, ``finished(path)`` and
    ``failed(message)`` are called from its thread."""

    def __init__(
        self,
        progressed: Callable[[str, int, int], None],
        finished: Callable[[str], None],
        failed: Callable[[str], None],
    ) -> None:
        self._progressed, self._finished, self._failed = progressed, finished, failed
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.pull_model: Callable[..., Path] = download.pull_model  # tests swap in a fake (no network)

    def start(self, key: str = "", accept_license: bool = False) -> None:
        """Fetch catalog model `key` ("" = the default). A license that must be accepted is remembered
        when `accept_license`; without it, and not accepted before, the download fails at once."""
        if self._thread is not None and self._thread.is_alive():
            return
        spec = download.CATALOG.get(key or download.DEFAULT_MODEL.key)
        if spec is None:
            self._failed(f"no model {key!r} in the catalog")
            return
        try:
            if accept_license and not download.license_accepted(spec):
                download.accept_license(spec)
        except OSError as exc:
            self._failed(f"could not remember the license acceptance: {exc}")
            return
        if not download.license_accepted(spec):
            self._failed(f"the {spec.license} of {spec.name} has not been accepted")
            return
        self._cancel = threading.Event()
        self._thread = threading.Thread(
            target=self._main, args=(spec, self._cancel), name="smallmind-download", daemon=True
        )
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def stop(self) -> None:
        """Cancel the download and wait for its thread (shutdown)."""
        self.cancel()
        if self._thread is not None:
            self._thread.join(DOWNLOAD_JOIN_S)

    def _main(self, spec: download.ModelSpec, cancel: threading.Event) -> None:
        last = [0.0, ""]

        def progress(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            if phase != last[1] or now - float(last[0]) >= DOWNLOAD_PROGRESS_S or (total and done >= total):
                last[0], last[1] = now, phase
                self._progressed(phase, int(done), int(total))

        pip_args = download.find_links_args(os.environ.get(download.FIND_LINKS_ENV, "").strip())
        try:
            path = self.pull_model(spec, progress=progress, cancel=cancel, pip_args=pip_args)
        except EngineError as exc:
            self._failed(str(exc))
        except Exception as exc:  # report anything; the dialog must not hang on a lost error
            log.exception("model download failed")
            self._failed(f"{type(exc).__name__}: {exc}")
        else:
            self._finished(str(path))


def list_models(known_paths: list[str], loaded_path: str) -> list[dict[str, Any]]:
    """What the Models dialog lists, as plain dicts: each catalog model (installed = present with its
    size and SHA-256), then every other GGUF file in `known_paths`, the loaded one and the models dir.

    Keys: key ("" for a file), name, path, size_bytes, license, license_url, license_acceptance (it
    must be accepted before a download), license_accepted (it was, or need not be), installed, loaded.
    A catalog file is verified from its SHA-256 sidecar; one without a sidecar is hashed once here.
    """
    loaded = str(Path(loaded_path).resolve()) if loaded_path else ""
    rows: list[dict[str, Any]] = []
    for spec in download.CATALOG.values():
        path = download.default_model_path(spec)
        rows.append(
            {
                "key": spec.key, "name": spec.name, "path": str(path), "size_bytes": spec.size_bytes,
                "license": spec.license, "license_url": spec.license_url,
                "license_acceptance": spec.license_acceptance,
                "license_accepted": download.license_accepted(spec),
                "installed": download.verify_installed(spec),
            }
        )  # fmt: skip
    listed = {str(Path(row["path"]).resolve()) for row in rows}
    files = [Path(p) for p in (*known_paths, loaded_path) if p]
    files += [model.path for model in download.installed_models()]
    for path in files:
        resolved = str(path.resolve())
        if resolved in listed or not path.is_file():
            continue
        listed.add(resolved)
        rows.append(
            {
                "key": "", "name": path.stem, "path": str(path), "size_bytes": path.stat().st_size,
                "license": "", "license_url": "", "license_acceptance": False, "license_accepted": True,
                "installed": True,
            }
        )  # fmt: skip
    for row in rows:
        row["loaded"] = bool(loaded) and str(Path(row["path"]).resolve()) == loaded
    return rows


def default_model_description() -> dict[str, Any]:
    """What the first-run dialog offers to download."""
    spec = download.DEFAULT_MODEL
    return {"name": spec.name, "size_bytes": spec.size_bytes, "license": spec.license}
