"""Bring a library's index up to date with its folders and files: read only what changed.

    report = update_library(index, "notes", progress=print)   # UpdateReport: counts, skipped files

A file is re-read when its mtime or size changed, and re-split only when its SHA-256 changed too
(a ``touch`` or a copy costs one read, no re-indexing). Files gone from an available folder leave
the index; a folder that is not there at all (a removed disk, an unmounted share) is reported and its
files are kept until it is back. Whatever goes wrong with one file (unreadable, too large, binary,
an encrypted PDF, a symlink loop, vanished while indexing) is a ``SkippedFile`` with its reason, and
the update goes on. Changes are committed in batches, so searches see them as the update proceeds.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .passages import CountTokens, PassageOptions, split_passages
from .readers import SNIFF_BYTES, SkipFile, looks_binary, read_blocks
from .store import DocumentIndex, FileState, SkippedFile

log = logging.getLogger(__name__)

MIB = 1 << 20
# Known binary formats: skipped by name, without reading them.
_BINARY_SUFFIX_TEXT = (
    ".png .jpg .jpeg .gif .bmp .ico .webp .tif .tiff .mp3 .mp4 .m4a .wav .flac .ogg .avi .mov .mkv "
    ".zip .gz .tgz .bz2 .xz .7z .rar .tar .exe .dll .so .dylib .o .a .pyc .class .jar .whl .gguf "
    ".bin .npy .npz .sqlite .sqlite3 .db .woff .woff2 .ttf .otf .docx .xlsx .pptx .odt .iso .dmg"
)
BINARY_SUFFIXES = frozenset(_BINARY_SUFFIX_TEXT.split())
IGNORED_FOLDERS = frozenset({"__pycache__", "node_modules"})  # besides hidden ones (.git, .venv...)
COMMIT_EVERY_S = 0.5
MISSING_SOURCE = (
    "not found (a removed disk or an unmounted share?); its indexed files are kept until it is back"
)


@dataclass(frozen=True, slots=True)
class IndexOptions:
    max_file_bytes: int = 32 * MIB
    passages: PassageOptions = field(default_factory=PassageOptions)
    include_hidden: bool = False  # files and folders whose names start with "." inside a folder

    def __post_init__(self) -> None:
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1, got {self.max_file_bytes}")


@dataclass(frozen=True, slots=True)
class IndexProgress:
    library: str
    n_done: int
    n_total: int
    path: str  # the file being read now ("" when done)


@dataclass(frozen=True, slots=True)
class UpdateReport:
    library: str
    n_files: int  # files found (indexed, unchanged or skipped)
    n_read: int  # files read and split again
    n_unchanged: int
    n_removed: int  # files gone from the index (deleted, now too large...)
    n_passages: int  # passages written by this update
    skipped: tuple[SkippedFile, ...]
    elapsed_s: float
    cancelled: bool = False
    folders: tuple[str, ...] = ()  # the folders walked (what a file watcher may watch)


@dataclass(slots=True)
class _Found:
    source: str
    path: str
    stat: os.stat_result


@dataclass(slots=True)
class _Walk:
    files: list[_Found] = field(default_factory=list)
    skipped: list[tuple[str, str, int | None, int | None]] = field(default_factory=list)
    missing_sources: set[str] = field(default_factory=set)
    folders: list[str] = field(default_factory=list)


def update_library(
    index: DocumentIndex,
    name: str,
    options: IndexOptions | None = None,
    progress: Callable[[IndexProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    count_tokens: CountTokens | None = None,
) -> UpdateReport:
    """Index what changed in library ``name`` since its last update."""
    options = options or IndexOptions()
    started = time.perf_counter()
    library_id = index.library_id(name)
    walk = walk_sources(index.library(name).sources, options.include_hidden)
    known = index.file_states(library_id)
    was_skipped = index.skipped_states(library_id)
    updater = _Updater(index, library_id, options, count_tokens, known, was_skipped)
    last_commit = time.monotonic()
    cancelled = False
    for n_done, found in enumerate(walk.files):
        if should_stop is not None and should_stop():
            cancelled = True
            break
        if progress is not None:
            progress(IndexProgress(name, n_done, len(walk.files), found.path))
        updater.update(found)
        if time.monotonic() - last_commit > COMMIT_EVERY_S:
            updater.commit()
            last_commit = time.monotonic()
    updater.commit()
    if not cancelled:
        updater.finish(walk)
    if progress is not None:
        progress(IndexProgress(name, len(walk.files), len(walk.files), ""))
    skipped = tuple(SkippedFile(path, reason) for path, reason, *_ in [*walk.skipped, *updater.skipped])
    return UpdateReport(
        library=name, n_files=len(walk.files), n_read=updater.n_read, n_unchanged=updater.n_unchanged,
        n_removed=updater.n_removed, n_passages=updater.n_passages, skipped=skipped,
        elapsed_s=time.perf_counter() - started, cancelled=cancelled, folders=tuple(walk.folders),
    )  # fmt: skip


class _Updater:
    """One update's work on the files found: each file read, skipped, kept or replaced."""

    def __init__(self, index: DocumentIndex, library_id: int, options: IndexOptions,
                 count_tokens: CountTokens | None, known: dict[str, FileState],
                 was_skipped: dict[str, tuple[str, int | None, int | None]]) -> None:  # fmt: skip
        self.index, self.library_id, self.options = index, library_id, options
        self.count_tokens = count_tokens
        self.known, self.was_skipped = known, was_skipped
        self.skipped: list[tuple[str, str, int | None, int | None]] = []
        self.seen: set[str] = set()
        self.pending: list[Callable[[], None]] = []  # writes waiting for the next commit
        self.n_read = self.n_unchanged = self.n_removed = self.n_passages = 0

    def update(self, found: _Found) -> None:
        path, st = found.path, found.stat
        self.seen.add(path)
        old = self.known.get(path)
        if old is not None and (old.mtime_ns, old.size) == (st.st_mtime_ns, st.st_size):
            self.n_unchanged += 1
            return
        previous = self.was_skipped.get(path)
        if old is None and previous is not None and previous[1:] == (st.st_mtime_ns, st.st_size):
            self.skipped.append((path, previous[0], st.st_mtime_ns, st.st_size))  # same file, same reason
            return
        try:
            data = self._read(path, st)
            digest = hashlib.sha256(data).hexdigest()
            if old is not None and old.sha256 == digest:
                self.pending.append(lambda: self.index.touch_file(old.file_id, st))
                self.n_unchanged += 1
                return
            passages = split_passages(read_blocks(path, data), self.options.passages, self.count_tokens)
        except SkipFile as exc:
            self.skipped.append((path, exc.reason, st.st_mtime_ns, st.st_size))
            self._forget(old)
            return
        self.n_read += 1
        self.n_passages += len(passages)
        self.pending.append(
            lambda: self.index.put_file(self.library_id, found.source, path, st, digest, passages)
        )

    def _read(self, path: str, st: os.stat_result) -> bytes:
        cap = self.options.max_file_bytes
        if st.st_size > cap:
            raise SkipFile(f"too large: {size_text(st.st_size)} (the limit is {size_text(cap)})")
        suffix = os.path.splitext(path)[1].lower()
        if suffix in BINARY_SUFFIXES:
            raise SkipFile(f"binary file ({suffix})")
        try:
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
                if suffix != ".pdf" and looks_binary(head):
                    raise SkipFile("binary file (not text)")
                data = head + f.read(cap + 1 - len(head))
        except FileNotFoundError as exc:
            raise SkipFile("vanished while being indexed (deleted or moved)") from exc
        except OSError as exc:
            raise SkipFile(f"could not be read: {exc.strerror or exc}") from exc
        if len(data) > cap:
            raise SkipFile(f"too large: grew past the limit of {size_text(cap)} while being read")
        return data

    def _forget(self, old: FileState | None) -> None:
        if old is not None:
            self.n_removed += 1
            self.pending.append(lambda: self.index.delete_files([old.file_id]))

    def commit(self) -> None:
        if not self.pending:
            return
        with self.index.transaction():
            for write in self.pending:
                write()
        self.pending.clear()

    def finish(self, walk: _Walk) -> None:
        """Files no longer found leave the index, except under a source that is missing as a whole."""
        gone = [state for path, state in self.known.items()
                if path not in self.seen and state.source not in walk.missing_sources]  # fmt: skip
        self.n_removed += len(gone)
        with self.index.transaction():
            self.index.delete_files(state.file_id for state in gone)
            self.index.replace_skipped(self.library_id, [*walk.skipped, *self.skipped])
            self.index.mark_updated(self.library_id)


def size_text(n_bytes: int) -> str:
    """1.5 MiB, 12.0 KiB, 300 bytes."""
    if n_bytes >= MIB:
        return f"{n_bytes / MIB:.1f} MiB"
    return f"{n_bytes / 1024:.1f} KiB" if n_bytes >= 1024 else f"{n_bytes} bytes"


def walk_sources(sources: tuple[str, ...], include_hidden: bool = False) -> _Walk:
    """Every regular file under ``sources`` (folders followed through symlinks, each folder once)."""
    walk = _Walk()
    visited_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    for source in sources:
        try:
            st = os.stat(source)
        except OSError as exc:
            walk.missing_sources.add(source)
            walk.skipped.append((source, _missing_reason(exc), None, None))
            continue
        if stat.S_ISDIR(st.st_mode):
            for path, file_stat in _walk_folder(source, st, visited_dirs, include_hidden, walk):
                if (file_stat.st_dev, file_stat.st_ino) not in seen_files:
                    seen_files.add((file_stat.st_dev, file_stat.st_ino))
                    walk.files.append(_Found(source, path, file_stat))
        elif stat.S_ISREG(st.st_mode):
            if (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                walk.files.append(_Found(source, source, st))
        else:
            walk.skipped.append((source, "not a regular file (a pipe, socket or device)", None, None))
    return walk


def _missing_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return MISSING_SOURCE
    if exc.errno == errno.ELOOP:
        return "a symlink loop"
    return f"cannot be opened: {exc.strerror or exc}"


def _entry_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "a broken link (its target is missing)"
    if exc.errno == errno.ELOOP:
        return "a symlink loop"
    return f"cannot be read: {exc.strerror or exc}"


def _walk_folder(root: str, root_stat: os.stat_result, visited: set[tuple[int, int]],
                 include_hidden: bool, walk: _Walk) -> Iterator[tuple[str, os.stat_result]]:  # fmt: skip
    """Depth-first, in name order; a folder reached twice (a symlink loop) is walked once."""
    stack = [(root, root_stat)]
    while stack:
        folder, folder_stat = stack.pop()
        key = (folder_stat.st_dev, folder_stat.st_ino)
        if key in visited:
            walk.skipped.append(
                (folder, "a link back to a folder already indexed (a symlink loop)", None, None)
            )
            continue
        visited.add(key)
        try:
            with os.scandir(folder) as entries:
                listed = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            walk.skipped.append((folder, f"folder cannot be listed: {exc.strerror or exc}", None, None))
            continue
        walk.folders.append(folder)
        subfolders = []
        for entry in listed:
            if (not include_hidden and entry.name.startswith(".")) or entry.name in IGNORED_FOLDERS:
                continue
            path = _printable(entry.path)
            if path is None:
                walk.skipped.append((_shown(entry.path), "the file name is not valid UTF-8", None, None))
                continue
            try:
                st = entry.stat()  # follows symlinks
            except OSError as exc:
                walk.skipped.append((path, _entry_reason(exc), None, None))
                continue
            if stat.S_ISDIR(st.st_mode):
                subfolders.append((path, st))
            elif stat.S_ISREG(st.st_mode):
                yield path, st
            else:
                walk.skipped.append((path, "not a regular file (a pipe, socket or device)", None, None))
        stack.extend(reversed(subfolders))


def _printable(path: str) -> str | None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return path


def _shown(path: str) -> str:
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
