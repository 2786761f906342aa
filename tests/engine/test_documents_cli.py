"""``smallmind documents``: libraries from the command line, in the app's index (SMALLMIND_HOME)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.documents import DocumentIndex, default_index_path
from smallmind_cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]


def test_add_search_update_list_and_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "bridge.md").write_text("# Bridge\n\nThe stone bridge was built in 1702.\n")
    (notes / "photo.png").write_bytes(b"\x89PNG\r\n")
    assert cli_main(["documents", "add", "notes", str(notes)]) == 0
    out = capsys.readouterr().out
    assert "notes: 2 files (1 read, 0 unchanged, 0 removed), 1 new passages, 1 skipped" in out
    assert f"skipped {notes / 'photo.png'}: binary file (.png)" in out
    assert cli_main(["documents", "search", "notes", "When was the bridge built?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] notes/bridge.md, lines 1-3 (") and "built in 1702" in out
    (notes / "bridge.md").write_text("# Bridge\n\nThe iron bridge opened in 1890.\n")
    assert cli_main(["documents", "update"]) == 0
    assert "notes: 2 files (1 read, 0 unchanged, 0 removed)" in capsys.readouterr().out
    assert cli_main(["documents", "list"]) == 0
    assert capsys.readouterr().out == f"notes: 1 files, 1 passages, 1 skipped\n  {notes}\n"
    with DocumentIndex(default_index_path()) as index:  # the app's index: the window sees it
        assert index.search(["notes"], "iron bridge")
    assert cli_main(["documents", "remove", "notes"]) == 0
    assert cli_main(["documents", "search", "notes", "bridge"]) == 1
    assert "no document library named 'notes'" in capsys.readouterr().err


def test_a_bad_library_name_is_an_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["documents", "add", " ", "."]) == 1
    assert "a library name must be non-empty text" in capsys.readouterr().err


def test_the_smallmind_command_routes_documents_to_the_cli(tmp_path: Path) -> None:
    env = {"SMALLMIND_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "smallmind_cli", "documents", "list"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
