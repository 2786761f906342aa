"""The disk tier's faults, each made with a real file: flipped bytes, a truncated file, another model's
file, the wrong dtype, a full disk, a read-only folder and a process killed mid-write. In every case
the file is ignored or deleted with a log line and the session is recomputed: the logits equal the
uncached forward, nothing crashes.

Full and read-only disks are real when the tests may mount a tmpfs (root with CAP_SYS_ADMIN, as in
the project's containers), or a read-only folder by permissions when not root; otherwise the OS call
fails as the kernel would (ENOSPC from ``os.fsync``, EROFS from ``os.open``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import KvCacheOptions, LruKvCacheStore, Model, Tokenizer
from engine.kv_disk import DiskKvTier
from tests.engine.conftest import rel_diff
from tests.engine.test_kv_disk import A, disk_store, random_ids, save_session, turn
from tests.engine.test_kv_store import TOL
from tests.fixtures import kv_disk_child
from tests.fixtures.tiny_model import write_tiny_model

PROMPT = random_ids(120, 11)
NEXT = [*PROMPT, 5, 6, 7]
LOGGER = "engine.kv_disk"


def kv_file(directory: Path) -> Path:
    (path,) = directory.glob("*.kv")
    return path


def assert_recomputed(model: Model, store: LruKvCacheStore) -> None:
    """The session's next turn recomputes everything and gets the uncached forward's logits."""
    logits, n_reused, _ = turn(model, store, A, NEXT)
    assert n_reused == 0 and store.get_stats().disk_hits == 0
    assert rel_diff(logits, model.forward(NEXT)) <= TOL


# ---------------------------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["payload", "token ids", "header"])
def test_flipped_bytes_are_caught(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    model, _ = tiny
    save_session(model, tmp_path, A, PROMPT, "float32")
    path = kv_file(tmp_path)
    data = bytearray(path.read_bytes())
    size = len(data)
    at = {"payload": size - 10_000, "token ids": size - 120 * (512 + 4) + 8, "header": 40}[where]
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    store = disk_store(model, tmp_path)
    assert_recomputed(model, store)
    assert not path.exists()  # deleted: at the start (header) or when it was read (payload, ids)
    assert "corrupt" in caplog.text and "checksum" in caplog.text
    store.close()


def test_truncated_file_is_deleted(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = tiny
    save_session(model, tmp_path, A, PROMPT, "float32")
    path = kv_file(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)
    store = disk_store(model, tmp_path)
    assert store.get_stats().disk_sessions == 0 and not path.exists()
    assert "truncated" in caplog.text
    assert_recomputed(model, store)
    store.close()


def test_another_models_file_is_never_loaded_and_each_model_keeps_its_own(
    tiny: tuple[Model, Tokenizer], tmp_path: Path
) -> None:
    """A conversation used with another model (same layout, other weights) has that model's file: it is
    never loaded for this one, and this model's K/V go to a file of their own, so that loading the
    other model again (Tools → Models) finds its file as it left it, and so does this one."""
    model, _ = tiny
    other = Model.from_gguf(write_tiny_model(tmp_path / "other.gguf", seed=2).path)
    disk = tmp_path / "kv"
    save_session(other, disk, A, PROMPT, "float32")
    store = disk_store(model, disk)
    assert_recomputed(model, store)
    store.remove(A, to_disk=True)
    assert store.close()
    assert len(list(disk.glob("*.kv"))) == 2  # one per model
    for each, saved in ((other, len(PROMPT)), (model, len(NEXT) - 1)):  # each model back: warm
        again = disk_store(each, disk)
        logits, n_reused, _ = turn(each, again, A, NEXT)
        assert n_reused == saved and again.get_stats().disk_hits == 1
        assert rel_diff(logits, each.forward(NEXT)[n_reused:]) <= TOL
        again.close()
    store = disk_store(model, disk)
    store.forget(A)  # a deleted conversation: every model's file goes
    assert store.close() and list(disk.glob("*.kv")) == []


def test_a_file_from_before_files_were_per_model_is_still_loaded(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A session saved under its plain key (before each model had its own file) comes back warm when
    it is this model's; another model's such file is ignored with a log line."""
    model, _ = tiny
    store = disk_store(model, tmp_path)
    _, _, entry = turn(model, store, A, PROMPT)
    buffer, ids = entry.detach()
    legacy = DiskKvTier(tmp_path, 1 << 30)
    legacy.put(A.key, model.identity or "", entry.shape, ids, buffer)  # the name the old version used
    assert legacy.close()
    store.close()
    restarted = disk_store(model, tmp_path)
    logits, n_reused, _ = turn(model, restarted, A, NEXT)
    assert n_reused == len(PROMPT) and rel_diff(logits, model.forward(NEXT)[n_reused:]) <= TOL
    restarted.close()
    other = Model.from_gguf(write_tiny_model(tmp_path / "other.gguf", seed=2).path)
    with_other = disk_store(other, tmp_path)
    assert turn(other, with_other, A, NEXT)[1] == 0
    assert "from another model; ignored" in caplog.text
    with_other.close()


def test_a_pool_store_finds_the_same_files_as_a_store_of_one_model(
    tiny: tuple[Model, Tokenizer], tmp_path: Path
) -> None:
    """One file name per session and model, whoever names the model: a store of one model (its
    identity) and the pool's shared store (no identity; the session's ``SessionId.model``) write and
    read the same file, and the pool also loads a file saved under the plain key (before files were
    per model) when its header names the session's model, never for another model."""
    model, _ = tiny
    identity = model.identity or ""
    save_session(model, tmp_path, A, PROMPT, "float32")  # a store of one model: "A RS identity"
    pool_store = LruKvCacheStore(KvCacheOptions(disk_dir=str(tmp_path)))  # the pool's: no identity
    scoped = A.for_model(identity)
    assert pool_store.prefetch(scoped) and not pool_store.prefetch(A.for_model("another-model"))
    logits, n_reused, _ = turn(model, pool_store, scoped, NEXT)
    assert n_reused == len(PROMPT) and rel_diff(logits, model.forward(NEXT)[n_reused:]) <= TOL
    assert pool_store.remove(scoped, to_disk=True) and pool_store.close()
    assert [p.name for p in tmp_path.glob("*.kv")] == [kv_file(tmp_path).name]  # the same one file
    store = disk_store(model, tmp_path)
    store.forget(A)  # the plain key's forget: every model's file goes
    assert store.close() and list(tmp_path.glob("*.kv")) == []
    store = disk_store(model, tmp_path)
    _, _, entry = turn(model, store, A, PROMPT)
    buffer, ids = entry.detach()
    legacy = DiskKvTier(tmp_path, 1 << 30)
    legacy.put(A.key, identity, entry.shape, ids, buffer)  # the name the old version used
    assert legacy.close()
    store.close()
    pool_store = LruKvCacheStore(KvCacheOptions(disk_dir=str(tmp_path)))
    assert turn(model, pool_store, A.for_model("another-model"), NEXT)[1] == 0
    assert turn(model, pool_store, scoped, NEXT)[1] == len(PROMPT)
    pool_store.close()


def test_a_file_of_the_other_dtype_is_ignored(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = tiny
    save_session(model, tmp_path, A, PROMPT, "float32")
    store = disk_store(model, tmp_path, "float16")
    logits, n_reused, _ = turn(model, store, A, NEXT)
    assert n_reused == 0 and store.get_stats().disk_hits == 0
    assert rel_diff(logits, model.forward(NEXT)) <= 1e-2
    assert "float32 K/V or another layout; ignored" in caplog.text
    store.close()


# ---------------------------------------------------------------------------------------------
# Full disk, read-only folder
# ---------------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path``; False when not allowed (or SMALLMIND_TEST_NO_MOUNT=1 asks for the
    other techniques, to try them where mounting works)."""
    if os.geteuid() != 0 or os.environ.get("SMALLMIND_TEST_NO_MOUNT") == "1":
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def full_disk(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``directory`` on a 1 MiB tmpfs nearly filled (real ENOSPC), else fsync failing with ENOSPC."""
    if _mount_tmpfs(directory, "size=1m"):
        try:
            (directory / "filler").write_bytes(b"\0" * (1024 * 1024 - 32 * 1024))
            yield "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(directory)], check=False)
        return

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    yield "fsync"


def test_full_disk_is_logged_and_recomputed(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    model, _ = tiny
    disk = tmp_path / "small"
    with full_disk(disk, monkeypatch):
        store = disk_store(model, disk)
        turn(model, store, A, PROMPT)  # 62 KiB of K/V: more than the 32 KiB left
        store.remove(A, to_disk=True)
        assert store.flush_disk()
        stats = store.get_stats()
        assert (stats.disk_write_failures, stats.disk_sessions) == (1, 0)
        assert "the disk is full" in caplog.text
        assert sorted(p.name for p in disk.iterdir()) in ([], ["filler"])  # no partial file left
        assert_recomputed(model, store)
        store.close()


@contextlib.contextmanager
def read_only_folder(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An existing, empty, read-only folder: a read-only tmpfs, or mode 0o500 when not root, else
    ``os.open`` refusing to create files there with EROFS."""
    if _mount_tmpfs(directory, "ro,size=1m"):
        try:
            yield "ro tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(directory)], check=False)
        return
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield "mode 0o500"
        finally:
            directory.chmod(0o700)
        return
    real_open = os.open

    def refuse(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(os.fsdecode(path)).parent == directory and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    yield "os.open"


def test_read_only_folder_is_logged_and_recomputed(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    model, _ = tiny
    disk = tmp_path / "read-only"
    with read_only_folder(disk, monkeypatch):
        store = disk_store(model, disk)
        turn(model, store, A, PROMPT)
        store.remove(A, to_disk=True)
        assert store.flush_disk()
        assert store.get_stats().disk_write_failures == 1 and not list(disk.iterdir())
        assert "cannot write a KV session" in caplog.text
        assert_recomputed(model, store)
        store.close()


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-write
# ---------------------------------------------------------------------------------------------
def test_sigkill_mid_write_leaves_nothing_read_as_valid(tmp_path: Path) -> None:
    """A real process killed while it writes a 138 MB session (its temp file seen growing, not yet
    renamed): a fresh tier finds no session and deletes the unfinished temp file. The next test shows
    that the same child, left alone, writes a file that is read back whole."""
    n_tokens = 3000
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.kv_disk_child", str(tmp_path), str(n_tokens)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 120
        partial = None
        while partial is None and time.monotonic() < deadline and child.poll() is None:
            temps = [p for p in tmp_path.glob(".*.tmp") if not p.name.startswith(".index")]
            sizes = [p.stat().st_size for p in temps if p.exists()]
            partial = next((s for s in sizes if s > 0), None)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    assert partial is not None, "the child finished or died before its write was seen"
    left = [p.name for p in tmp_path.iterdir()]
    assert any(name.endswith(".tmp") for name in left) and not any(name.endswith(".kv") for name in left)

    tier = DiskKvTier(tmp_path, 1 << 40)
    assert not list(tmp_path.glob(".*.tmp"))  # the unfinished write is deleted at start
    prompt = [*kv_disk_child.session_kv(n_tokens)[0], 1]  # the whole session and one token more
    found = tier.find(kv_disk_child.SESSION, kv_disk_child.MODEL, kv_disk_child.SHAPE, prompt)
    assert found is None and tier.stats().sessions == 0
    tier.close()


def test_sigkill_test_child_writes_a_valid_file_when_left_alone(tmp_path: Path) -> None:
    """The premise of the test above: the child's session, once written, is read back whole."""
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.kv_disk_child", str(tmp_path), "50"],
        cwd=root, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert [child.stdout.readline().strip() for _ in range(2)] == ["writing", "written"]
    finally:
        child.kill()
        child.wait(30)
    tier = DiskKvTier(tmp_path, 1 << 40)
    ids, kv = kv_disk_child.session_kv(50)
    found = tier.find(kv_disk_child.SESSION, kv_disk_child.MODEL, kv_disk_child.SHAPE, [*ids, 1])
    assert found is not None and np.array_equal(found[0], ids) and np.array_equal(found[1], kv)
    tier.close()


def test_files_of_unknown_sessions_or_garbage_do_not_stop_the_tier(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stray file with the suffix, a garbage index and an unfinished temp file: all handled at start."""
    model, _ = tiny
    save_session(model, tmp_path, A, PROMPT, "float32")
    (tmp_path / f"{uuid.uuid4().hex}.kv").write_bytes(b"garbage" * 100)
    (tmp_path / "index.json").write_text("{not json")
    (tmp_path / ".abc.tmp").write_bytes(b"half a file")
    store = LruKvCacheStore(KvCacheOptions(disk_dir=str(tmp_path)))
    store.set_model_identity(model.identity)
    assert store.get_stats().disk_sessions == 1
    assert "not a SmallMind KV file" in caplog.text and "rebuilt from the files" in caplog.text
    assert turn(model, store, A, NEXT)[1] == len(PROMPT)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".kv"]
    store.close()
