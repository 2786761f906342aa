"""What loading a model leaves in the process (issue 24: resident memory ≤ 3x the file): no module a
local model does not use, the GGUF tables the engine keeps of its own equal to the ``gguf`` package's."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import pytest

from engine import gguf_constants

ROOT = Path(__file__).resolve().parents[2]
# Packages a loaded local model never needs (gguf-py: ~6 MiB with SentencePiece's OpenMP runtime;
# asyncio pulls ssl: ~7 MiB); PyYAML is not listed: numba imports it when it is installed.
UNUSED_AT_LOAD = ("gguf", "sentencepiece", "asyncio", "ssl")

_LOAD = """
import json, sys
from engine import Model, Tokenizer
from engine.gguf import GgufFile
from engine.model_defaults import model_defaults
f = GgufFile(sys.argv[1])
Model.from_gguf(f), Tokenizer.from_gguf(f), model_defaults(f)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {names!r})))
"""


def _modules_after_load(path: Path) -> list[str]:
    code = _LOAD.format(names=set(UNUSED_AT_LOAD))
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.smollm2
def test_loading_smollm2_imports_no_unused_package(smollm2_path: Path) -> None:
    assert _modules_after_load(smollm2_path) == []


@pytest.mark.gemma3
def test_loading_gemma3_imports_no_unused_package(gemma3_path: Path) -> None:
    assert _modules_after_load(gemma3_path) == []


def test_numpy_path_still_dequantizes_through_gguf(tmp_path: Path) -> None:
    """A type the engine does not unpack itself (Q8_0 read as float32 by ``GgufFile.load``) is
    dequantized by the ``gguf`` package, imported there."""
    import numpy as np

    from engine.gguf import GgufFile

    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(tmp_path / "q8.gguf", "llama")
    writer.add_tensor("w", gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(GgufFile(tmp_path / "q8.gguf").load("w"), expected)


def test_own_tables_equal_the_gguf_package() -> None:
    ours = gguf_constants.GGMLQuantizationType
    theirs = gguf.GGMLQuantizationType
    common = {t.name for t in theirs} & {t.name for t in ours}
    assert common == {t.name for t in ours}  # every type we name, the package names too
    for name in common:
        assert ours[name].value == theirs[name].value, name
        assert gguf_constants.GGML_QUANT_SIZES[ours[name]] == gguf.GGML_QUANT_SIZES[theirs[name]], name
    value_types = {t.name: t.value for t in gguf_constants.GGUFValueType}
    assert value_types == {t.name: t.value for t in gguf.GGUFValueType}
    assert gguf_constants.GGUF_DEFAULT_ALIGNMENT == gguf.GGUF_DEFAULT_ALIGNMENT
    general = gguf.Keys.General
    assert (gguf_constants.SAMPLING_TEMP, gguf_constants.SAMPLING_TOP_K, gguf_constants.SAMPLING_TOP_P,
            gguf_constants.SAMPLING_MIN_P, gguf_constants.SAMPLING_PENALTY_REPEAT) == (
        general.SAMPLING_TEMP, general.SAMPLING_TOP_K, general.SAMPLING_TOP_P, general.SAMPLING_MIN_P,
        general.SAMPLING_PENALTY_REPEAT)  # fmt: skip
    for t in ours:
        assert gguf_constants.quant_shape_to_byte_shape((3, 1024), t) == gguf.quant_shape_to_byte_shape(
            (3, 1024), theirs[t.name]
        )


@pytest.mark.smollm2
def test_smollm2_tokenizer_keeps_no_string_per_token(smollm2_path: Path) -> None:
    """What the tokenizer holds once its file is closed: the merges as one int pair -> int table and
    the tokens' bytes in one string (~6 MiB); a str per token and per merge took ~14 MiB."""
    from engine.gguf import GgufFile
    from engine.tokenizer import Tokenizer

    tracemalloc.start()
    try:
        f = GgufFile(smollm2_path)
        tok = Tokenizer.from_gguf(f)
        del f
        gc.collect()
        held_mib = tracemalloc.get_traced_memory()[0] / 2**20
    finally:
        tracemalloc.stop()
    assert tok.vocab_size == 49152
    assert held_mib < 8, f"the tokenizer holds {held_mib:.1f} MiB"


def test_weights_are_unpacked_in_the_loading_thread(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On worker threads, glibc keeps each thread's freed intermediates in that thread's arena (SmolLM2:
    15-20 MiB more resident, varying from run to run); only the kernels load on another thread."""
    import engine.model
    from engine import Model

    threads: set[int] = set()

    def recorded(load: Any) -> Any:
        def run(*args: Any) -> Any:
            threads.add(threading.get_ident())
            return load(*args)

        return run

    for name in ("_load_layer", "_load_output"):
        monkeypatch.setattr(engine.model, name, recorded(getattr(engine.model, name)))
    Model.from_gguf(tiny_model_path)
    assert threads == {threading.get_ident()}
