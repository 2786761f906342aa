"""Document libraries for the window: indexing and retrieval on threads of their own.

Two worker objects, each moved to a long-lived QThread (Qt for Python's worker pattern):
``IndexingWorker`` runs library updates (a minute for 50 MB: it must never hold up anything else),
``RetrievalWorker`` answers the tabs' retrievals and the dialog's listings (tens of milliseconds).
Both call ``engine.documents`` and send plain values back (dicts, lists). ``DocumentsClient`` is the
GUI thread's handle: commands go out as queued signals; an update is stopped through a
``threading.Event`` (a queued "stop" would wait behind the update it should stop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

from engine.documents import (
    DocumentIndex,
    IndexProgress,
    default_index_path,
    messages_with_passages,
    retrieve,
    update_library,
)
from engine.errors import EngineError

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.1  # progress signals at most ten times a second
SHUTDOWN_TIMEOUT_MS = 30_000
MAX_FILES_REPORTED = 4000  # the indexed files sent back for the window to watch
TokenizerSource = Callable[[str], Any]  # a conversation's model's tokenizer, or None (estimate)


def library_rows(index: DocumentIndex) -> list[dict[str, Any]]:
    """Each library as the dialog shows it: counts, sources and its skipped files with reasons."""
    rows = []
    for info in index.libraries():
        skipped = [(s.path, s.reason) for s in index.skipped(info.name)]
        rows.append({"name": info.name, "sources": list(info.sources), "n_files": info.n_files,
                     "n_passages": info.n_passages, "skipped": skipped,
                     "updated_s": info.updated_s})  # fmt: skip
    return rows


class IndexingWorker(QObject):
    """Library updates, one at a time, on the indexing thread."""

    progressed = Signal(str, int, int, str)  # library, files done, files, the file being read
    finished = Signal(str, dict)  # library, the update's report (counts, skipped, folders)
    failed = Signal(str, str)  # library, why

    def __init__(self, stop: threading.Event, closing: threading.Event) -> None:
        super().__init__()
        self._stop, self._closing = stop, closing

    def _should_stop(self) -> bool:
        return self._stop.is_set() or self._closing.is_set()

    @Slot(str, list)
    def add_library(self, name: str, sources: list) -> None:
        """Create ``name`` (or add to it) with ``sources``, then index it."""
        try:
            with DocumentIndex(default_index_path()) as index:
                if name not in index.library_names():
                    index.create_library(name)
                index.add_sources(name, sources)
        except (EngineError, ValueError, OSError) as exc:
            self.failed.emit(name, str(exc))
            return
        self.update([name])

    @Slot(str)
    def remove_library(self, name: str) -> None:
        try:
            with DocumentIndex(default_index_path()) as index:
                index.delete_library(name)
        except (EngineError, ValueError, OSError) as exc:
            self.failed.emit(name, str(exc))
            return
        self.finished.emit(name, {"removed": True})

    @Slot(list)
    def update(self, names: list) -> None:
        """Index what changed in ``names`` (every library when empty)."""
        self._stop.clear()
        try:
            with DocumentIndex(default_index_path()) as index:
                for name in names or index.library_names():
                    if self._should_stop():
                        break
                    self._update_one(index, name)
        except (EngineError, OSError) as exc:
            self.failed.emit(", ".join(names), str(exc))

    def _update_one(self, index: DocumentIndex, name: str) -> None:
        last = 0.0

        def progress(p: IndexProgress) -> None:
            nonlocal last
            if time.monotonic() - last >= PROGRESS_EVERY_S or p.n_done == p.n_total:
                last = time.monotonic()
                self.progressed.emit(p.library, p.n_done, p.n_total, p.path)

        try:
            report = update_library(index, name, progress=progress, should_stop=self._should_stop)
        except (EngineError, OSError) as exc:
            self.failed.emit(name, str(exc))
            return
        self.finished.emit(name, {
            "n_files": report.n_files, "n_read": report.n_read, "n_removed": report.n_removed,
            "n_passages": report.n_passages, "skipped": [(s.path, s.reason) for s in report.skipped],
            "folders": list(report.folders), "elapsed_s": report.elapsed_s, "cancelled": report.cancelled,
            "files": sorted(index.file_states(index.library_id(name)))[:MAX_FILES_REPORTED],
        })  # fmt: skip


class RetrievalWorker(QObject):
    """Retrievals for the tabs and listings for the dialog, on their own thread."""

    retrieved = Signal(str, list, list, int, int)  # request id, messages, citations, tokens, budget
    retrieval_failed = Signal(str, list, str)  # request id, the messages as they were, why
    listed = Signal(list)  # library_rows()

    def __init__(self, tokenizer: TokenizerSource) -> None:
        super().__init__()
        self._tokenizer = tokenizer
        self._index: DocumentIndex | None = None

    def _open(self) -> DocumentIndex:
        if self._index is None:
            self._index = DocumentIndex(default_index_path())
        return self._index

    @Slot()
    def list_libraries(self) -> None:
        try:
            self.listed.emit(library_rows(self._open()))
        except (EngineError, OSError) as exc:
            log.warning("the document libraries cannot be listed: %s", exc)
            self.listed.emit([])

    @Slot(str, list, list, int)
    def retrieve(self, conversation_id: str, messages: list, libraries: list, budget_tokens: int) -> None:
        """The passages for the last message, added after it (``messages_with_passages``)."""
        tokenizer = self._tokenizer(conversation_id.rpartition("#")[0] or conversation_id)  # "<id>#<n>"
        count = None if tokenizer is None else (lambda text: len(tokenizer.encode(text, parse_special=False)))
        try:
            found = retrieve(self._open(), libraries, str(messages[-1]["content"]), budget_tokens, count)
            with_passages = messages_with_passages(messages, found.passages)
        except (EngineError, ValueError, OSError) as exc:
            self.retrieval_failed.emit(conversation_id, messages, str(exc))
            return
        citations = [c.as_dict() for c in found.passages]
        self.retrieved.emit(conversation_id, with_passages, citations, found.n_tokens, found.budget_tokens)

    @Slot()
    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None


def local_tokenizer(engine_worker: Any) -> TokenizerSource:
    """The tokenizer of the conversation's local model when it is loaded, else the default model's
    (None while none is loaded)."""

    def tokenizer(conversation_id: str) -> Any:
        local = engine_worker.local
        pool, model_id = local.pool, local.model_of(conversation_id)
        engine = pool.loaded_engine(model_id) if pool is not None and model_id is not None else None
        engine = engine or local.engine
        return None if engine is None else engine.tokenizer

    return tokenizer


class DocumentsClient(QObject):
    """The GUI thread's handle on the two documents workers (see the module docstring)."""

    add_requested = Signal(str, list)
    remove_requested = Signal(str)
    update_requested = Signal(list)
    retrieve_requested = Signal(str, list, list, int)
    list_requested = Signal()
    close_requested = Signal()

    def __init__(self, tokenizer: TokenizerSource, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._stop, self._closing = threading.Event(), threading.Event()
        self.indexing_thread, self.retrieval_thread = QThread(), QThread()
        self.indexing_thread.setObjectName("smallmind-indexing")
        self.retrieval_thread.setObjectName("smallmind-retrieval")
        self.indexer = IndexingWorker(self._stop, self._closing)
        self.indexer.moveToThread(self.indexing_thread)
        self.retriever = RetrievalWorker(tokenizer)
        self.retriever.moveToThread(self.retrieval_thread)
        self.add_requested.connect(self.indexer.add_library)
        self.remove_requested.connect(self.indexer.remove_library)
        self.update_requested.connect(self.indexer.update)
        self.retrieve_requested.connect(self.retriever.retrieve)
        self.list_requested.connect(self.retriever.list_libraries)
        self.close_requested.connect(self.retriever.close)
        self.indexing_thread.start()
        self.retrieval_thread.start()
        self._stopped = False

    def add_library(self, name: str, sources: list[str]) -> None:
        self.add_requested.emit(name, list(sources))

    def remove_library(self, name: str) -> None:
        self.remove_requested.emit(name)

    def update(self, names: list[str] | None = None) -> None:
        self.update_requested.emit(list(names or []))

    def stop_update(self) -> None:
        """Stop the update running now (between two files; what was indexed is kept)."""
        self._stop.set()

    def list_libraries(self) -> None:
        self.list_requested.emit()

    def retrieve(self, conversation_id: str, messages: list[dict[str, str]], libraries: list[str],
                 budget_tokens: int) -> None:  # fmt: skip
        self.retrieve_requested.emit(conversation_id, messages, list(libraries), budget_tokens)

    def shutdown(self, timeout_ms: int = SHUTDOWN_TIMEOUT_MS) -> bool:
        """Stop an update between two files, close the index, join both threads."""
        if self._stopped:
            return True
        self._stopped = True
        self._closing.set()
        self.close_requested.emit()
        ended = True
        for thread in (self.indexing_thread, self.retrieval_thread):
            thread.quit()
            ended = thread.wait(timeout_ms) and ended
        return ended
