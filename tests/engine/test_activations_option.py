"""``BatchingOptions.activations``: the opt-in 8-bit activations as an engine option. Checked like
the other options, defaulting to ``$SMALLMIND_ACTIVATIONS``, applied process-wide by the engine
where it applies ``cpu_threads`` (at its start and at ``update_options``), and nothing at all on the
NumPy path."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import BatchedInferenceEngine, BatchingOptions, Model, Tokenizer, kernels
from engine.batching import default_activations, int8_activations_available

ROOT = Path(__file__).resolve().parents[2]
NUMBA = kernels.backend() == "numba"


@pytest.fixture(autouse=True)
def _float32_after() -> Iterator[None]:
    """Other tests run with the mode this test found (float32)."""
    before = kernels.activations() if NUMBA else "float32"
    yield
    if NUMBA:
        kernels.set_activations(before)


@pytest.mark.parametrize("value", ["fp16", "INT8", "", 8, None])
def test_a_bad_value_is_refused_naming_the_field_and_the_choices(value: object) -> None:
    expected = f"BatchingOptions.activations must be one of float32, int8, got {value!r}"
    with pytest.raises(ValueError) as caught:
        BatchingOptions(activations=value)  # type: ignore[arg-type]
    assert str(caught.value) == expected
    with pytest.raises(ValueError, match="activations must be one of float32, int8"):
        BatchingOptions.from_dict({"activations": value})


def test_the_default_is_float32_or_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(kernels.ACTIVATIONS_ENV, raising=False)
    assert BatchingOptions().activations == "float32" == BatchingOptions.from_dict({}).activations
    monkeypatch.setenv(kernels.ACTIVATIONS_ENV, " Int8 ")
    assert BatchingOptions().activations == "int8" == default_activations()
    assert BatchingOptions(activations="float32").activations == "float32"  # given beats the variable
    monkeypatch.setenv(kernels.ACTIVATIONS_ENV, "fp16")
    with caplog.at_level(logging.WARNING, logger="engine.batching"):
        assert BatchingOptions().activations == "float32"
    assert "SMALLMIND_ACTIVATIONS='fp16' is not one of float32, int8" in caplog.text


@pytest.mark.skipif(not NUMBA, reason="numba kernels")
def test_the_engine_applies_it_at_start_and_live(tiny: tuple[Model, Tokenizer]) -> None:
    model, tok = tiny
    expected = "int8" if int8_activations_available() else "float32"
    kernels.set_activations("float32")
    engine = BatchedInferenceEngine(model, tok, BatchingOptions(activations="int8"))
    assert kernels.activations() == expected == engine.activations
    engine.update_options(batching=BatchingOptions(activations="float32", cpu_threads=1))
    assert kernels.activations() == "float32" == engine.activations and kernels.requested_threads() == 1
    engine.update_options(batching=BatchingOptions(activations="int8"))
    assert kernels.activations() == expected and kernels.requested_threads() == 0
    handle = engine.submit("Hello", None)  # a step in the mode chosen
    while not handle.done():
        engine.step()
    assert handle.result().generated_tokens > 0
    engine.update_options(batching=BatchingOptions())  # the default: float32 again
    assert kernels.activations() == "float32"


def test_int8_is_available_on_this_cpu_as_the_kernels_say() -> None:
    if not NUMBA:
        assert not int8_activations_available()
        return
    from engine.kernels import vnni

    assert int8_activations_available() == vnni.available()


PROBE = """
import json, sys
from engine import BatchedInferenceEngine, BatchingOptions, Model, Tokenizer
from engine.batching import int8_activations_available
from engine.gguf import GgufFile
f = GgufFile(sys.argv[1])
options = BatchingOptions(activations="int8")
engine = BatchedInferenceEngine(Model.from_gguf(f), Tokenizer.from_gguf(f), options)
print(json.dumps({"path": engine.kernel_path, "activations": engine.activations,
                  "available": int8_activations_available(), "numba": "numba" in sys.modules}))
"""


def _probe(model_path: Path, **env: str) -> dict[str, object]:
    import json

    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_path)], env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_numpy_path_ignores_it_and_never_loads_numba(tiny_model_path: Path) -> None:
    """SMALLMIND_KERNELS=numpy: int8 asked for, float32 in effect, numba never imported."""
    found = _probe(tiny_model_path, SMALLMIND_KERNELS="numpy")
    assert found == {"path": "numpy", "activations": "float32", "available": False, "numba": False}


@pytest.mark.skipif(not NUMBA, reason="numba kernels")
def test_a_cpu_without_vnni_says_int8_is_unavailable(tmp_path: Path) -> None:
    """numba targeting Haswell (AVX2, no VNNI; a subprocess: numba's target is process-wide): int8 is
    not available, and the kernels asked for it keep float32 (nothing is compiled for this check)."""
    code = (
        "from engine import kernels; from engine.batching import int8_activations_available; "
        "print(int8_activations_available(), kernels.set_activations('int8'))"
    )
    target = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path)}
    env = {**os.environ, **target}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "float32"]


def test_a_bad_environment_value_is_float32_not_an_error_in_the_kernels():
    """The kernels' own default reads the same variable: a bad value is logged and float32 kept, in
    a fresh process (before, the first projection raised ValueError)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, kernels.ACTIVATIONS_ENV: "fp16"}
    done = subprocess.run([sys.executable, "-c", "from engine import kernels; print(kernels.activations())"],
                          env=env, capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert done.stdout.strip() == "float32" and "fp16" in done.stderr
