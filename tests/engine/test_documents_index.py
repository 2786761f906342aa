"""The document index on real folders: libraries, re-indexing what changed, and every file that cannot
be read reported with its reason while the rest is indexed."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from engine.documents import DocumentIndex, IndexOptions, IndexProgress, update_library
from engine.documents import search as search_module
from engine.documents.indexing import MISSING_SOURCE
from engine.errors import DocumentIndexError, LibraryNotFoundError
from tests.fixtures.documents import write_pdf


@pytest.fixture
def library(tmp_path: Path) -> Path:
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "harbour.md").write_text(
        "# Harbour\n\nThe harbour light is green and blinks every four seconds.\n"
    )
    (folder / "sub" / "garden.txt").write_text("Tomatoes need six hours of sun.\n\nWater them at dawn.\n")
    (folder / "tides.html").write_text("<h1>Tides</h1><p>Spring tides follow the full moon.</p>")
    return folder


@pytest.fixture
def index(tmp_path: Path) -> DocumentIndex:
    with DocumentIndex(tmp_path / "index" / "documents.sqlite3") as opened:
        yield opened


def reasons(report) -> dict[str, str]:
    return {Path(s.path).name: s.reason for s in report.skipped}


def test_a_library_is_indexed_and_searched(index: DocumentIndex, library: Path) -> None:
    index.create_library("notes", [library])
    report = update_library(index, "notes")
    assert (report.n_files, report.n_read, report.skipped) == (3, 3, ())
    assert report.folders == (str(library), str(library / "sub"))
    info = index.library("notes")
    assert (info.n_files, info.n_passages, info.n_skipped) == (3, 3, 0)
    assert info.sources == (str(library),)
    hits = index.search(["notes"], "How often does the harbour light blink?")
    assert Path(hits[0].path).name == "harbour.md"
    assert (hits[0].line_start, hits[0].line_end, hits[0].heading) == (1, 3, "Harbour")
    stemmed = index.search(["notes"], "watering")  # Porter stemming: "watering" finds "Water"
    assert [Path(h.path).name for h in stemmed] == ["garden.txt"]


def test_searches_stay_inside_the_libraries_asked_for(
    index: DocumentIndex, library: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "moon.txt").write_text("The full moon rises at sunset.\n")
    index.create_library("notes", [library])
    index.create_library("astronomy", [other])
    update_library(index, "notes")
    update_library(index, "astronomy")
    assert {h.library for h in index.search(["notes"], "full moon")} == {"notes"}
    assert {h.library for h in index.search(["astronomy"], "full moon")} == {"astronomy"}
    assert {h.library for h in index.search(["notes", "astronomy"], "full moon")} == {"notes", "astronomy"}
    with pytest.raises(
        LibraryNotFoundError, match=r"no document library named 'nope' \(libraries: 'astronomy', 'notes'\)"
    ):
        index.search(["nope"], "moon")
    with pytest.raises(ValueError, match="already exists"):
        index.create_library("notes")


def test_only_changed_files_are_read_again(index: DocumentIndex, library: Path) -> None:
    index.create_library("notes", [library])
    update_library(index, "notes")
    again = update_library(index, "notes")
    assert (again.n_read, again.n_unchanged, again.n_removed) == (0, 3, 0)
    # touched, same bytes: read and hashed, not re-split
    garden = library / "sub" / "garden.txt"
    os.utime(garden, ns=(garden.stat().st_atime_ns, garden.stat().st_mtime_ns + 5_000_000_000))
    touched = update_library(index, "notes")
    assert (touched.n_read, touched.n_unchanged) == (0, 3)
    # new content: the index follows, the old words are gone
    garden.write_text("Cucumbers climb the trellis in July.\n")
    changed = update_library(index, "notes")
    assert (changed.n_read, changed.n_unchanged) == (1, 2)
    assert [Path(h.path).name for h in index.search(["notes"], "cucumbers trellis")] == ["garden.txt"]
    assert index.search(["notes"], "tomatoes") == []
    # deleted and added files
    (library / "tides.html").unlink()
    (library / "new.md").write_text("Lanterns were lit at the pier.\n")
    moved = update_library(index, "notes")
    assert (moved.n_read, moved.n_removed) == (1, 1)
    assert index.search(["notes"], "spring tides") == []
    assert index.library("notes").n_files == 3


def test_each_bad_file_is_skipped_with_its_reason_and_the_rest_indexed(
    index: DocumentIndex, library: Path
) -> None:
    (library / "huge.txt").write_text("word " * 2000)
    (library / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (library / "noext").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))  # unknown type: sniffed
    write_pdf(library / "locked.pdf", ["private"], user_password="secret")
    (library / "broken.pdf").write_bytes(b"%PDF-1.4 truncated")
    (library / "loop").symlink_to(library, target_is_directory=True)  # a symlink loop
    (library / "dangling.txt").symlink_to(library / "missing.txt")
    os.mkfifo(library / "pipe.txt")  # opening it would block forever
    (library / ".hidden.txt").write_text("not indexed: hidden")
    (library / "__pycache__").mkdir()
    (library / "__pycache__" / "x.txt").write_text("not indexed: cache")
    index.create_library("notes", [library])
    report = update_library(index, "notes", IndexOptions(max_file_bytes=4096))
    found = reasons(report)
    assert found == {
        "huge.txt": "too large: 9.8 KiB (the limit is 4.0 KiB)",
        "photo.png": "binary file (.png)",
        "noext": "binary file (not text)",
        "locked.pdf": "encrypted PDF (it needs a password)",
        "broken.pdf": found["broken.pdf"],
        "loop": "a link back to a folder already indexed (a symlink loop)",
        "dangling.txt": "a broken link (its target is missing)",
        "pipe.txt": "not a regular file (a pipe, socket or device)",
    }
    assert found["broken.pdf"].startswith("not a readable PDF")
    assert index.library("notes").n_files == 3  # the three good files
    assert {s.path for s in index.skipped("notes")} == {s.path for s in report.skipped}
    assert index.search(["notes"], "hidden cache") == []


def test_huge_files_are_named_with_their_size(index: DocumentIndex, tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * (3 << 20))
    index.create_library("logs", [big])
    report = update_library(index, "logs", IndexOptions(max_file_bytes=1 << 20))
    assert reasons(report) == {"big.log": "too large: 3.0 MiB (the limit is 1.0 MiB)"}


def test_an_unreadable_file_is_skipped(index: DocumentIndex, library: Path) -> None:
    if Path("/proc/self/mem").exists():  # a regular file whose read fails with EIO, even for root
        (library / "unreadable.txt").symlink_to("/proc/self/mem")
    else:
        pytest.skip("no /proc/self/mem")
    index.create_library("notes", [library])
    report = update_library(index, "notes")
    assert reasons(report) == {"unreadable.txt": "could not be read: Input/output error"}
    assert index.library("notes").n_files == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission_is_skipped(index: DocumentIndex, library: Path) -> None:
    secret = library / "secret.txt"
    secret.write_text("no")
    secret.chmod(0)
    index.create_library("notes", [library])
    assert reasons(update_library(index, "notes")) == {"secret.txt": "could not be read: Permission denied"}


def test_a_file_that_vanishes_while_indexing_is_reported(index: DocumentIndex, library: Path) -> None:
    index.create_library("notes", [library])
    update_library(index, "notes")
    victim = library / "tides.html"
    victim.write_text("<p>changed, so it is read again</p>")
    os.utime(victim, ns=(1, 1))

    def delete_it_first(progress: IndexProgress) -> None:
        if progress.n_done == 0:
            victim.unlink()  # between the folder's listing and the file's read

    report = update_library(index, "notes", progress=delete_it_first)
    assert reasons(report) == {"tides.html": "vanished while being indexed (deleted or moved)"}
    assert report.n_removed == 1
    assert index.search(["notes"], "spring tides") == []
    assert index.library("notes").n_files == 2


def test_a_folder_on_a_removed_disk_is_reported_and_its_passages_kept(
    index: DocumentIndex, library: Path, tmp_path: Path
) -> None:
    index.create_library("notes", [library])
    update_library(index, "notes")
    unplugged = tmp_path / "unplugged"
    library.rename(unplugged)
    report = update_library(index, "notes")
    assert reasons(report) == {"notes": MISSING_SOURCE}
    assert "removed disk" in MISSING_SOURCE
    assert report.n_removed == 0
    assert index.library("notes").n_files == 3
    assert index.search(["notes"], "harbour light")  # still answers from what it read
    unplugged.rename(library)
    back = update_library(index, "notes")
    assert (back.n_read, back.n_unchanged, back.skipped) == (0, 3, ())


def test_a_file_name_that_is_not_utf8_is_skipped(index: DocumentIndex, library: Path) -> None:
    raw = os.fsencode(library) + b"/caf\xe9.txt"
    with open(raw, "wb") as f:
        f.write(b"latin-1 name")
    index.create_library("notes", [library])
    report = update_library(index, "notes")
    assert reasons(report) == {"caf\ufffd.txt": "the file name is not valid UTF-8"}
    assert report.n_files == 3


def test_skipped_files_are_not_read_again_until_they_change(index: DocumentIndex, library: Path) -> None:
    binary = library / "data.dat"
    binary.write_bytes(bytes(1000))
    index.create_library("notes", [library])
    update_library(index, "notes")
    read: list[str] = []
    again = update_library(index, "notes", progress=lambda p: read.append(Path(p.path).name))
    assert reasons(again) == {"data.dat": "binary file (not text)"}
    assert again.n_read == 0  # the binary file was remembered, not read
    binary.write_text("now it is text about lanterns\n")
    fixed = update_library(index, "notes")
    assert (fixed.n_read, fixed.skipped) == (1, ())
    assert index.search(["notes"], "lanterns")


def test_an_update_can_be_stopped_and_resumed(index: DocumentIndex, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(20):
        (folder / f"f{i:02}.txt").write_text(f"file number {i} speaks of topic{i}\n")
    index.create_library("many", [folder])
    seen: list[int] = []
    stopped = update_library(index, "many", progress=lambda p: seen.append(p.n_done),
                             should_stop=lambda: len(seen) >= 5)  # fmt: skip
    assert stopped.cancelled and stopped.n_read == 5
    assert index.library("many").n_files == 5  # what was read is kept
    resumed = update_library(index, "many")
    assert (resumed.n_read, resumed.n_unchanged, resumed.cancelled) == (15, 5, False)


def test_sources_can_be_files_and_removed(index: DocumentIndex, library: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.md"
    single.write_text("A lone file about kestrels.\n")
    index.create_library("notes", [library, single, single])
    update_library(index, "notes")
    assert index.library("notes").n_files == 4
    assert index.search(["notes"], "kestrels")[0].path == str(single)
    index.remove_sources("notes", [str(library)])
    assert index.library("notes").n_files == 1
    assert index.search(["notes"], "harbour") == []
    index.delete_library("notes")
    assert index.library_names() == []
    with index.transaction() as db:  # no passage text is left behind
        assert db.execute("SELECT COUNT(*) FROM passage_text").fetchone() == (0,)


def test_a_corrupt_index_file_is_named_in_the_error(tmp_path: Path) -> None:
    bad = tmp_path / "documents.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DocumentIndexError, match=r"documents\.sqlite3: file is not a database"):
        DocumentIndex(bad)


def test_an_index_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "documents.sqlite3"
    DocumentIndex(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(DocumentIndexError, match="newer SmallMind"):
        DocumentIndex(path)


def test_searches_see_the_index_while_another_connection_writes(index: DocumentIndex, library: Path) -> None:
    index.create_library("notes", [library])
    update_library(index, "notes")
    with DocumentIndex(index.path) as writer, writer.transaction() as db:
        db.execute("DELETE FROM skipped")  # a write transaction is open in another connection
        assert index.search(["notes"], "harbour light")  # WAL: readers are not blocked


def test_a_pdf_in_a_library_cites_its_page(index: DocumentIndex, tmp_path: Path) -> None:
    folder = tmp_path / "papers"
    folder.mkdir()
    write_pdf(folder / "report.pdf", ["Introduction to the survey.", "The kestrel nests on cliffs."])
    shutil.copy(folder / "report.pdf", folder / "copy.pdf")
    index.create_library("papers", [folder])
    update_library(index, "papers")
    hit = index.search(["papers"], "where does the kestrel nest")[0]
    assert (hit.page, hit.line_start, hit.text) == (2, None, "The kestrel nests on cliffs.")


def test_words_that_match_too_many_passages_are_left_out_of_the_query(
    index: DocumentIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(10):
        (folder / f"f{i}.txt").write_text(f"A common word in file {i}.\n")
    (folder / "rare.txt").write_text("The rare heron and a common word.\n")
    index.create_library("many", [folder])
    update_library(index, "many")
    assert len(index.search(["many"], "common heron")) == 11  # both words: every passage matches
    monkeypatch.setattr(search_module, "MAX_MATCHED_ROWS", 5)
    assert [Path(h.path).name for h in index.search(["many"], "common heron")] == ["rare.txt"]
    assert len(index.search(["many"], "common")) == 10 + 1  # the rarest word is always kept
    assert index.search(["many"], "xylophone zeppelin") == []
