"""Fixtures shared by every test: the tiny GGUF, the real SmolLM2 model, the reference data.

Every test runs with ``SMALLMIND_HOME`` pointing at its own temporary directory, so no test reads or
writes the user's real settings, conversations or models.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import paths
from tests.fixtures.tiny_model import TinyModel, write_tiny_model

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Resolved now, before the autouse fixture below points SMALLMIND_HOME at a temporary directory.
_INSTALLED_SMOLLM2 = paths.models_dir() / SMOLLM2_FILE
_INSTALLED_GEMMA3 = paths.models_dir() / "gemma-3-270m-q4_k_m.gguf"
# The reference data: the shared copy beside the repository when there is one (it is the source of
# truth), else the copy kept in the repository (tests/fixtures/reference), so a clone anywhere runs.
_SHARED_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared/reference/smollm2-135m"
_VENDORED_REFERENCE = Path(__file__).resolve().parent / "fixtures/reference/smollm2-135m"
_SHARED_GEMMA3_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared/reference/gemma3-270m"
_VENDORED_GEMMA3_REFERENCE = Path(__file__).resolve().parent / "fixtures/reference/gemma3-270m"
# Compiled kernels (numba) kept between test runs beside the repository's other caches, never in the
# user's cache directory; subprocesses started by tests inherit it.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "numba"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every app path (config, data, models, logs) under this test's tmp dir."""
    home = tmp_path / "smallmind_home"
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    yield home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """The default tiny random-weight Llama (F32, 2 layers, vocab 559), written once per session,
    with the config and weights the fixture wrote."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model: TinyModel) -> Path:
    return tiny_model.path


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Several tiny models as separate files, for the model pool: two Llamas of the default shape
    (other seeds: other weights, other replies) and a Gemma-3-like base model (QK-norm, post-norms,
    GELU, sliding window; no chat template), each written once per session."""
    folder = tmp_path_factory.mktemp("tiny_family")
    return {
        "tiny-a": write_tiny_model(folder / "tiny-a.gguf", seed=1).path,
        "tiny-b": write_tiny_model(folder / "tiny-b.gguf", seed=2).path,
        "tiny-gemma": write_tiny_model(
            folder / "tiny-gemma.gguf", seed=4, architecture="gemma3", n_heads=4, n_kv_heads=1,
            head_dim=32, extra_metadata={"tokenizer.chat_template": None},
        ).path,
    }  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file: $SMALLMIND_TEST_MODEL, else the installed model."""
    override = os.environ.get("SMALLMIND_TEST_MODEL", "").strip()
    path = Path(override).expanduser() if override else _INSTALLED_SMOLLM2
    if not path.is_file():
        pytest.fail(
            f"SmolLM2 model not installed; run `smallmind models pull` (make test does this) [{path}]"
        )
    return path


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The real Gemma 3 270M Q4_K_M file (`smallmind models pull gemma3-270m`; make test does this)."""
    if not _INSTALLED_GEMMA3.is_file():
        pytest.fail(
            "Gemma 3 270M not installed; run `smallmind models pull gemma3-270m --accept-license` "
            f"(make test does this) [{_INSTALLED_GEMMA3}]"
        )
    return _INSTALLED_GEMMA3


@pytest.fixture(scope="session")
def gemma3_reference_dir() -> Path:
    """The Gemma 3 reference data: the shared copy beside the repository when there is one, else the
    copy kept in the repository (tests/fixtures/reference/gemma3-270m), so a clone anywhere runs."""
    shared = _SHARED_GEMMA3_REFERENCE if (_SHARED_GEMMA3_REFERENCE / "prompts.json").is_file() else None
    path = Path(os.environ.get("SMALLMIND_GEMMA3_REFERENCE_DIR", "") or shared or _VENDORED_GEMMA3_REFERENCE)
    if not (path / "prompts.json").is_file():
        pytest.skip(f"no Gemma 3 reference data at {path}")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The SmolLM2 reference data (HF transformers outputs); $SMALLMIND_REFERENCE_DIR overrides."""
    override = os.environ.get("SMALLMIND_REFERENCE_DIR", "").strip()
    if override:
        path = Path(override).expanduser()
    else:
        path = _SHARED_REFERENCE if (_SHARED_REFERENCE / "prompts.json").is_file() else _VENDORED_REFERENCE
    if not (path / "prompts.json").is_file():
        pytest.fail(f"reference data not found in {path}; set SMALLMIND_REFERENCE_DIR")
    return path
