"""The KV store's disk tier: evicted sessions' K/V in one file each, loaded back when they return.

``DiskKvTier`` sits under ``LruKvCacheStore``: an evicted session's buffer is handed to ``put`` (no
copy; a background thread writes it, so no engine step waits for the disk) and ``find`` gives back
the K/V of a session on disk (or still waiting to be written) for ``prepare`` to copy into its entry.
The tier has its own LRU by bytes (``max_bytes``); the oldest files go first.

A file is never trusted: it records the model's identity (file size + a digest of the GGUF header
and of sampled tensor bytes), the KV dtype and layout, the token ids and a CRC-32 of the payload.
A file that does not match the model is ignored; one that is truncated or corrupt is deleted; both
with a log line, and the session is recomputed. Writes go to a temp file in the same folder, are
fsynced and renamed over the old file (``os.replace``), so a crash mid-write (even SIGKILL) leaves
at most a stray ``.tmp`` file, deleted at the next start. ``index.json`` keeps the LRU order across
restarts; it is only a hint (every file's header is read at start).

File layout (little-endian): ``MAGIC`` | header length u32 | header CRC-32 u32 | header JSON |
zero padding to a multiple of 64 | token ids int32 (n) | K/V (n_layers, 2, n_kv_heads, n, head_dim).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import queue
import struct
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .kv_cache import KV_DTYPES, ModelShape

log = logging.getLogger(__name__)

MAGIC = b"SMKVDSK1"
VERSION = 1
ALIGN = 64
SUFFIX = ".kv"
INDEX_NAME = "index.json"
PREAMBLE = struct.Struct("<8sII")  # magic, header length, header CRC-32
MAX_HEADER_BYTES = 1 << 20
MAX_TOKENS = 1 << 24  # a header's n_tokens (a session holds at most the model's context)
MAX_DIM = 1 << 16  # a header's n_layers, n_kv_heads, head_dim
MAX_NAME_CHARS = 16_384  # a header's session_id and model identity (more than any HTTP header holds)
MAX_PENDING_BYTES = 512 << 20  # handed-over buffers waiting for the writer; past this an eviction is dropped
_IDENTITY_SAMPLES = 16  # tensor-data blocks hashed into a model's identity
_IDENTITY_BLOCK = 4096

_ERRNO_WORDS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the folder is on a read-only file system",
    errno.ENOTDIR: "a parent of the folder is a file",
    errno.EEXIST: "a file is in the folder's place",
}


def describe_os_error(exc: OSError) -> str:
    return _ERRNO_WORDS.get(exc.errno or 0, exc.strerror or str(exc))


def model_identity(path: str | os.PathLike[str], data_offset: int) -> str:
    """A model file's identity without hashing every byte: its size, a digest of its header (all the
    metadata and tensor infos, up to ``data_offset``) and of 16 blocks of tensor data spread over it."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(data_offset))
        span = max(0, size - data_offset - _IDENTITY_BLOCK)
        for i in range(_IDENTITY_SAMPLES):
            f.seek(data_offset + span * i // max(1, _IDENTITY_SAMPLES - 1))
            digest.update(f.read(_IDENTITY_BLOCK))
    return f"{size}-{digest.hexdigest()}"


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if differ.size else n


def _useful(token_ids: np.ndarray, prompt_ids: Sequence[int] | np.ndarray, longer_than: int) -> bool:
    """Whether the saved tokens give more than ``longer_than`` reusable tokens of the prompt (at most
    all but its last, whose logits are computed)."""
    return min(common_prefix(token_ids, prompt_ids), len(prompt_ids) - 1) > longer_than


@dataclass(frozen=True, slots=True)
class DiskStats:
    sessions: int
    bytes: int
    max_bytes: int
    writes: int
    write_failures: int
    dropped: int  # evictions not written: the writer was too far behind, or the session too big
    rejected_files: int  # files ignored or deleted: another model, corrupt, truncated


@dataclass(slots=True)
class _Record:
    """One session's file as the index knows it."""

    session_id: str
    path: Path
    n_bytes: int
    header: dict[str, Any]
    token_ids: np.ndarray  # read at scan or write time; checked against the payload CRC on load
    last_used: float = field(default_factory=time.time)


@dataclass(slots=True)
class _Write:
    session_id: str
    header: dict[str, Any]  # without the CRC (the writer adds it)
    token_ids: np.ndarray
    buffer: np.ndarray  # (L, 2, KVH, capacity, Hd), handed over: nobody writes to it any more
    n_bytes: int


def _layout(shape: ModelShape) -> dict[str, Any]:
    return {"dtype": shape.dtype, "n_layers": shape.n_layers, "n_kv_heads": shape.n_kv_heads,
            "head_dim": shape.head_dim}  # fmt: skip


def _payload_bytes(shape: ModelShape, n_tokens: int) -> int:
    return n_tokens * (4 + shape.bytes_per_token)


def _preamble(header: dict[str, Any]) -> bytes:
    text = json.dumps(header, sort_keys=True).encode("utf-8")
    head = PREAMBLE.pack(MAGIC, len(text), zlib.crc32(text)) + text
    return head + b"\0" * (-len(head) % ALIGN)


def _shape_of(header: dict[str, Any]) -> ModelShape:
    return ModelShape(header["n_layers"], header["n_kv_heads"], header["head_dim"], header["dtype"])


# Every header field, its type and its range: a file is checked against all of them before any is used.
_WHOLE_FIELDS = {"version": (VERSION, VERSION), "n_tokens": (1, MAX_TOKENS), "n_layers": (1, MAX_DIM),
                 "n_kv_heads": (1, MAX_DIM), "head_dim": (1, MAX_DIM)}  # fmt: skip
_TEXT_FIELDS = {"session_id": MAX_NAME_CHARS, "model": MAX_NAME_CHARS}
_FIELDS = {*_WHOLE_FIELDS, *_TEXT_FIELDS, "dtype", "payload_crc32"}


def check_header(header: Any) -> dict[str, Any]:
    """The header if every field has the right type and range; CorruptFile naming the first that does not."""
    if not isinstance(header, dict):
        raise CorruptFile(f"the header is a JSON {type(header).__name__}, not an object")
    if set(header) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(header)), sorted(set(header) - _FIELDS)
        raise CorruptFile(f"header fields missing {missing} or unknown {[k[:40] for k in extra[:5]]}")
    for name, (low, high) in _WHOLE_FIELDS.items():
        value = header[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CorruptFile(
                f"header field {name!r} = {str(value)[:40]!r} is not a whole number in [{low}, {high}]"
            )
    for name, max_chars in _TEXT_FIELDS.items():
        value = header[name]
        if not isinstance(value, str) or not 0 < len(value) <= max_chars:
            raise CorruptFile(f"header field {name!r} is not a text of 1 to {max_chars} characters")
    if header["dtype"] not in KV_DTYPES:
        raise CorruptFile(f"header field 'dtype' = {str(header['dtype'])[:40]!r} is not one of {KV_DTYPES}")
    crc = header["payload_crc32"]
    if not isinstance(crc, str) or len(crc) != 8 or any(c not in "0123456789abcdef" for c in crc):
        raise CorruptFile("header field 'payload_crc32' is not 8 hex digits")
    return header


class CorruptFile(Exception):
    """A session file that must not be used (the message says why)."""


def read_header(f: io.BufferedReader, file_size: int) -> tuple[dict[str, Any], int]:
    """(header, payload offset); CorruptFile when the preamble, a header field or the size is wrong."""
    raw = f.read(PREAMBLE.size)
    if len(raw) < PREAMBLE.size:
        raise CorruptFile(f"truncated: {file_size} bytes is shorter than the preamble")
    magic, n_text, crc = PREAMBLE.unpack(raw)
    if magic != MAGIC:
        raise CorruptFile(f"not a SmallMind KV file (magic {magic!r})")
    if n_text > MAX_HEADER_BYTES:
        raise CorruptFile(f"header length {n_text:,} is implausible")
    text = f.read(n_text)
    if len(text) < n_text or zlib.crc32(text) != crc:
        raise CorruptFile("the header's checksum does not match")
    try:
        header = check_header(json.loads(text))
    except (ValueError, RecursionError) as exc:  # JSON's errors are ValueErrors
        raise CorruptFile(f"unreadable header: {str(exc)[:80]}") from exc
    offset = PREAMBLE.size + n_text + (-(PREAMBLE.size + n_text) % ALIGN)
    expected = offset + _payload_bytes(_shape_of(header), header["n_tokens"])
    if file_size != expected:
        raise CorruptFile(f"truncated or padded: {file_size:,} bytes, the header says {expected:,}")
    return header, offset


def _read_exactly(f: io.BufferedReader, array: np.ndarray) -> None:
    view = array.data.cast("B")
    n = f.readinto(view)
    if n != len(view):
        raise CorruptFile(f"truncated: read {n:,} of {len(view):,} payload bytes")


class DiskKvTier:
    """Session files in ``directory`` within ``max_bytes``; see the module docstring. Thread-safe."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self._max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._records: OrderedDict[str, _Record] = OrderedDict()  # least recently used first
        self._pending: dict[str, _Write] = {}  # handed over, not yet on disk
        self._pending_bytes = 0
        self._idle = threading.Condition(self._lock)
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._writes = self._write_failures = self._dropped = self._rejected = 0
        self._warned: set[str] = set()
        self._thread: threading.Thread | None = None
        self.usable = self._open()

    # -- opening ------------------------------------------------------------------------------
    def _open(self) -> bool:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            self._warn("open", f"KV disk tier off: cannot use {self.directory}: {describe_os_error(exc)}")
            return False
        order = self._read_index()
        found: dict[str, _Record] = {}
        for name in names:
            path = self.directory / name
            if name.endswith(".tmp"):  # a write cut short (a crash): never complete, never read
                self._unlink(path, "an unfinished write")
            elif name.endswith(SUFFIX):
                record = self._scan(path, found)
                if record is not None:
                    record.last_used = order.get(name, record.last_used)
                    found[record.session_id] = record
        for record in sorted(found.values(), key=lambda r: r.last_used):
            self._records[record.session_id] = record
        self._trim_to_budget(keep=None)
        log.info("KV disk tier at %s: %d sessions, %.1f MiB", self.directory, len(self._records),
                 self._bytes() / 2**20)  # fmt: skip
        return True

    def _read_index(self) -> dict[str, float]:
        try:
            data = json.loads((self.directory / INDEX_NAME).read_text(encoding="utf-8"))
            order = {str(row["file"]): float(row["last_used"]) for row in data["sessions"]}
            return {name: when for name, when in order.items() if math.isfinite(when)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.warning("KV disk index %s is unreadable (%s); rebuilt from the files", INDEX_NAME, exc)
            return {}

    def _scan(self, path: Path, seen: Mapping[str, object]) -> _Record | None:
        try:
            with open(path, "rb") as f:
                header, offset = read_header(f, os.fstat(f.fileno()).st_size)
                ids = np.empty(int(header["n_tokens"]), dtype=np.int32)
                f.seek(offset)
                _read_exactly(f, ids)
                mtime = os.fstat(f.fileno()).st_mtime
        except CorruptFile as exc:
            self._rejected += 1
            self._unlink(path, f"corrupt ({exc})")
            return None
        except OSError as exc:
            log.warning("cannot read KV file %s: %s", path, describe_os_error(exc))
            return None
        size = offset + _payload_bytes(_shape_of(header), len(ids))
        if header["session_id"] in seen:  # two files claim one session: neither is trusted
            self._rejected += 1
            self._unlink(path, f"another file holds session {header['session_id'][:40]!r} too")
            return None
        return _Record(header["session_id"], path, size, header, ids, mtime)

    # -- the store's entry points ---------------------------------------------------------------
    def can_take(self, n_bytes: int) -> bool:
        """Whether ``put`` of a session this big would be written now (else the eviction drops it)."""
        with self._lock:
            ok = (
                self.usable
                and n_bytes <= self._max_bytes
                and self._pending_bytes + n_bytes <= MAX_PENDING_BYTES
            )
            if not ok:
                self._dropped += 1
            return ok

    def put(
        self, session_id: str, model: str, shape: ModelShape, token_ids: np.ndarray, buffer: np.ndarray
    ) -> None:
        """Write a session in the background; ``buffer`` (L, 2, KVH, capacity, Hd) is handed over and
        its first ``len(token_ids)`` positions are written. Call ``can_take`` first."""
        n = len(token_ids)
        header = {"version": VERSION, "session_id": session_id, "model": model, "n_tokens": n}
        ids = np.array(token_ids, dtype=np.int32)
        job = _Write(session_id, header | _layout(shape), ids, buffer, _payload_bytes(shape, n))
        with self._lock:
            old = self._pending.pop(session_id, None)
            if old is not None:
                self._pending_bytes -= old.n_bytes
            self._pending[session_id] = job
            self._pending_bytes += job.n_bytes
            self._start_writer()
        self._jobs.put(("write", job))

    def find(
        self,
        session_id: str,
        model: str,
        shape: ModelShape,
        prompt_ids: Sequence[int] | np.ndarray,
        longer_than: int = 0,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(token ids, K/V (L, 2, KVH, n, Hd)) of the session, checked, or None; None too when they
        hold no more than ``longer_than`` tokens of the prompt (the index's token ids tell, so no file
        is read for nothing). Not a copy to keep: the caller copies what it uses before the next call."""
        with self._lock:
            job = self._pending.get(session_id)
            record = self._records.get(session_id)
            if record is not None:
                self._records.move_to_end(session_id)
                record.last_used = time.time()
        if job is not None:
            if job.header["model"] != model or _shape_of(job.header) != shape:
                return None
            if not _useful(job.token_ids, prompt_ids, longer_than):
                return None
            n = len(job.token_ids)
            return job.token_ids, job.buffer[:, :, :, :n]
        if record is None or not self._usable_for(record, model, shape):
            return None
        if not _useful(record.token_ids, prompt_ids, longer_than):
            return None
        try:
            return self._load(record)
        except CorruptFile as exc:
            self._rejected += 1
            self._forget_record(record, f"corrupt ({exc}); the session is recomputed")
        except OSError as exc:
            log.warning("cannot read KV file %s (%s); the session is recomputed", record.path,
                        describe_os_error(exc))  # fmt: skip
        return None

    def prefetch(self, session_id: str) -> bool:
        """Ask the OS to read the session's file into its page cache now, in the background (a tab was
        opened: by the time its next message is sent, the load reads memory, not the disk)."""
        with self._lock:
            record = self._records.get(session_id)
        if record is None or not hasattr(os, "posix_fadvise"):
            return False
        try:
            fd = os.open(record.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)  # returns at once; the kernel reads ahead
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def has(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._pending or session_id in self._records

    def _usable_for(self, record: _Record, model: str, shape: ModelShape) -> bool:
        header = record.header
        if header["model"] != model or _shape_of(header) != shape:
            what = "another model" if header["model"] != model else f"{header['dtype']} K/V or another layout"
            self._warn(f"mismatch {record.path}", f"KV file {record.path.name} is from {what}; ignored")
            self._rejected += 1
            return False
        return True

    def _load(self, record: _Record) -> tuple[np.ndarray, np.ndarray]:
        with open(record.path, "rb") as f:
            header, offset = read_header(f, os.fstat(f.fileno()).st_size)
            if header != record.header:
                raise CorruptFile("the file changed since it was indexed")
            shape, n = _shape_of(header), int(header["n_tokens"])
            ids = np.empty(n, dtype=np.int32)
            kv = np.empty(shape.buffer_shape(n), dtype=shape.storage_dtype)
            f.seek(offset)
            _read_exactly(f, ids)
            _read_exactly(f, kv)
        if zlib.crc32(kv.data, zlib.crc32(ids.data)) != int(header["payload_crc32"], 16):
            raise CorruptFile("the payload's checksum does not match")
        return ids, kv

    def wait_for_room(self, n_bytes: int, timeout_s: float = 30.0) -> None:
        """Let the writer catch up when ``n_bytes`` more would pass the pending limit (used when the
        app closes: every session should be saved, and no step is waiting)."""
        with self._lock:
            behind = self._pending_bytes + n_bytes > MAX_PENDING_BYTES
        if behind:
            self.flush(timeout_s)

    def forget(self, session_id: str) -> None:
        """Delete a session's file (a deleted conversation), after any write of it still queued."""
        self._start_writer()
        self._jobs.put(("forget", session_id))

    def clear(self) -> None:
        """Delete every session file (Settings → Clear)."""
        self._start_writer()
        self._jobs.put(("clear", None))

    def set_max_bytes(self, max_bytes: int) -> None:
        with self._lock:
            self._max_bytes = int(max_bytes)
            self._start_writer()
        self._jobs.put(("trim", None))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued write and deletion is done; False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._jobs.put(("mark", done))
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Finish the queued writes (up to ``timeout_s``) and stop the writer thread."""
        finished = self.flush(timeout_s)
        if self._thread is not None:
            self._jobs.put(("stop", None))
            self._thread.join(max(0.0, timeout_s))
            self._thread = None
        return finished

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(len(self._records), self._bytes(), self._max_bytes, self._writes,
                             self._write_failures, self._dropped, self._rejected)  # fmt: skip

    # -- the writer thread ----------------------------------------------------------------------
    def _start_writer(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._writer_main, name="smallmind-kv-disk", daemon=True)
            self._thread.start()

    def _writer_main(self) -> None:
        while True:
            kind, arg = self._jobs.get()
            try:
                if kind == "stop":
                    return
                elif kind == "write":
                    self._write(arg)
                elif kind == "forget":
                    with self._lock:
                        record = self._records.get(arg)
                    if record is not None:
                        self._forget_record(record, "its conversation was deleted", level=logging.DEBUG)
                elif kind == "clear":
                    self._clear_files()
                elif kind == "trim":
                    self._trim_to_budget(keep=None)
                    self._write_index()
                elif kind == "mark":
                    arg.set()
            except Exception:  # a bug must not kill the writer: the next jobs still run
                log.exception("KV disk tier: %s failed", kind)

    def _write(self, job: _Write) -> None:
        with self._lock:
            superseded = self._pending.get(job.session_id) is not job
        if superseded:  # a newer version of the session is queued behind this one: write that only
            return
        name = hashlib.blake2b(job.session_id.encode(), digest_size=16).hexdigest()
        path = self.directory / f"{name}{SUFFIX}"
        try:
            size = self._write_file(path, job)
        except OSError as exc:
            self._write_failures += 1
            self._warn(f"write {exc.errno}", f"cannot write a KV session to {self.directory}: "
                       f"{describe_os_error(exc)}; it will be recomputed when it comes back")  # fmt: skip
        else:
            record = _Record(job.session_id, path, size, job.header, job.token_ids)
            with self._lock:
                self._records.pop(job.session_id, None)
                self._records[job.session_id] = record
                self._writes += 1
            self._trim_to_budget(keep=job.session_id)
            self._write_index()
        finally:
            with self._lock:
                if self._pending.get(job.session_id) is job:
                    del self._pending[job.session_id]
                    self._pending_bytes -= job.n_bytes

    def _write_file(self, path: Path, job: _Write) -> int:
        """Temp file, fsync, rename: the final name only ever holds a whole, checked file."""
        self.directory.mkdir(parents=True, exist_ok=True)  # deleted by hand meanwhile: made again
        header = job.header | {"payload_crc32": "00000000"}
        n, buffer = len(job.token_ids), job.buffer
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_preamble(header))
                crc = zlib.crc32(job.token_ids.data)
                f.write(job.token_ids.tobytes())
                for layer in range(buffer.shape[0]):
                    block = np.ascontiguousarray(buffer[layer, :, :, :n])  # (2, KVH, n, Hd)
                    crc = zlib.crc32(block.data, crc)
                    f.write(block.data)
                header["payload_crc32"] = f"{crc:08x}"
                f.seek(0)
                f.write(_preamble(header))  # same length: the CRC is 8 hex digits either way
                f.flush()
                os.fsync(f.fileno())
                size = f.seek(0, os.SEEK_END)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        job.header = header
        self._fsync_directory()
        return size

    def _fsync_directory(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some file systems refuse to fsync a directory; the rename is still atomic
        finally:
            os.close(fd)

    def _write_index(self) -> None:
        with self._lock:
            rows = [
                {"file": r.path.name, "session_id": r.session_id, "n_tokens": len(r.token_ids),
                 "n_bytes": r.n_bytes, "last_used": r.last_used}
                for r in self._records.values()
            ]  # fmt: skip
        text = json.dumps({"version": VERSION, "sessions": rows}, indent=1)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".index.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.directory / INDEX_NAME)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self._warn(f"index {exc.errno}", f"cannot write the KV disk index: {describe_os_error(exc)}")

    # -- bookkeeping ----------------------------------------------------------------------------
    def _bytes(self) -> int:
        return sum(r.n_bytes for r in self._records.values())

    def _trim_to_budget(self, keep: str | None) -> None:
        """Delete the least recently used files until the rest fit ``max_bytes``."""
        while True:
            with self._lock:
                if self._bytes() <= self._max_bytes:
                    return
                victim = next((r for sid, r in self._records.items() if sid != keep), None)
            if victim is None:
                return
            self._forget_record(victim, "the disk budget is full", level=logging.DEBUG)

    def _forget_record(self, record: _Record, why: str, level: int = logging.WARNING) -> None:
        with self._lock:
            if self._records.get(record.session_id) is record:
                del self._records[record.session_id]
        self._unlink(record.path, why, level)

    def _clear_files(self) -> None:
        with self._lock:
            records, self._records = list(self._records.values()), OrderedDict()
        for record in records:
            self._unlink(record.path, "cleared", logging.DEBUG)
        self._write_index()
        log.info("KV disk tier cleared: %d session files deleted", len(records))

    def _unlink(self, path: Path, why: str, level: int = logging.WARNING) -> None:
        log.log(level, "deleting KV file %s: %s", path.name, why)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete %s: %s", path, describe_os_error(exc))

    def _warn(self, key: str, message: str) -> None:
        """A warning once per kind of problem (a full disk must not flood the log)."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
        else:
            log.debug(message)
