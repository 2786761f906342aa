"""Hostile GGUF headers are refused fast and cheaply: what the header becomes in memory is counted as
it is made and bounded by a small multiple of the file's size (``engine/gguf_header.py``).

On main, 800k one-byte strings in one array (a 6.9 MiB file) took 4.7-7.8 s and +474 MiB to open,
through the `gguf` package's reader (several NumPy views per string). Counts and lengths larger than
the file, impossible shapes and offsets are in tests/engine/test_bad_input.py (fuzzed); here: the
files made to be small on disk and huge in memory, arrays nested deeply, and that the bounded reader
reads real files as the package's reader does (little- and big-endian).
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from engine import Model, ModelFileError, Tokenizer
from engine.gguf import GgufFile
from engine.gguf_header import METADATA_BYTES_PER_FILE_BYTE, METADATA_FLOOR_BYTES
from tests.engine.test_bad_input import within_budget
from tests.fixtures import hostile_files

OPEN_BUDGET_S = 3.0  # refusals take milliseconds; main took 5-8 s; room for a busy CPU
TOO_LARGE = "the file's metadata is too large"

HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "800k one-byte strings": (hostile_files.write_many_strings_gguf, TOO_LARGE),
    "400k one-byte entries": (hostile_files.write_many_keys_gguf, TOO_LARGE),
    "150k tensor infos": (hostile_files.write_many_tensors_gguf, TOO_LARGE),
    "arrays nested 10k deep": (hostile_files.write_nested_arrays_gguf, "an array nested in an array"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("hostile_gguf")
    return {name: write(directory / f"{i}.gguf") for i, (name, (write, _)) in enumerate(HOSTILE.items())}


def open_as_the_app_does(path: Path) -> None:
    f = GgufFile(path)
    Model.from_gguf(f)
    Tokenizer.from_gguf(f)


def traced_peak(fn: Callable[[], Any]) -> int:
    """Bytes allocated at the peak while ``fn`` runs (its exception, if any, is swallowed here)."""
    tracemalloc.start()
    try:
        within_budget(fn, 60.0)
    except ModelFileError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_header_is_refused_fast_and_cheaply(hostile: dict[str, Path], name: str) -> None:
    path, message = hostile[name], HOSTILE[name][1]
    started = time.perf_counter()
    with pytest.raises(ModelFileError) as info:
        within_budget(lambda: open_as_the_app_does(path), 60.0)
    elapsed = time.perf_counter() - started
    assert message in info.value.reason and str(path) in str(info.value)
    assert elapsed < OPEN_BUDGET_S, f"refusing {name} took {elapsed:.2f} s"
    size = path.stat().st_size
    peak = traced_peak(lambda: open_as_the_app_does(path))
    assert peak < size // 4, f"refusing a {size:,}-byte file allocated {peak:,} bytes"  # priced, not parsed


def test_a_header_just_under_the_bound_opens_in_bounded_time_and_memory(tmp_path: Path) -> None:
    """Near the worst a file can do without being refused: 100k metadata entries whose least cost passes
    the price check. It opens (its metadata is all there) within the memory bound, in about a second."""
    path = hostile_files.write_many_keys_gguf(tmp_path / "k.gguf", 100_000, key_bytes=30)
    size = path.stat().st_size
    started = time.perf_counter()
    f = within_budget(lambda: GgufFile(path), 60.0)
    elapsed = time.perf_counter() - started
    assert len(f.metadata) == 100_001 and elapsed < OPEN_BUDGET_S
    peak = traced_peak(lambda: GgufFile(path))
    assert peak < METADATA_BYTES_PER_FILE_BYTE * size + METADATA_FLOOR_BYTES, (peak, size)


def package_metadata(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}


def test_the_bounded_reader_reads_the_tiny_model_as_the_package_does(tiny_model_path: Path) -> None:
    ours, theirs = GgufFile(tiny_model_path), gguf.GGUFReader(tiny_model_path)
    assert ours.metadata == package_metadata(tiny_model_path)
    assert ours.data_offset == theirs.data_offset
    for t in theirs.tensors:
        assert ours.tensor_shape(t.name) == tuple(reversed(t.shape.tolist()))
        assert ours.tensor_type(t.name) == t.tensor_type
        assert np.array_equal(ours.load(t.name).ravel(), np.asarray(t.data, dtype=np.float32).ravel())


def test_a_big_endian_file_reads_the_same_values(tmp_path: Path) -> None:
    weight = np.arange(64, dtype=np.float32).reshape(2, 32) / 7
    for name, endian in (("le.gguf", gguf.GGUFEndian.LITTLE), ("be.gguf", gguf.GGUFEndian.BIG)):
        writer = gguf.GGUFWriter(tmp_path / name, "llama", endianess=endian)
        writer.add_uint32("llama.block_count", 3)
        writer.add_float32("x.scale", 0.5)
        writer.add_array("x.ints", [1, -2, 3])
        writer.add_array("x.words", ["a", "bé", "€"])
        writer.add_tensor("w", weight)  # the writer swaps the bytes for a big-endian file
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    little, big = GgufFile(tmp_path / "le.gguf"), GgufFile(tmp_path / "be.gguf")
    assert big.metadata == little.metadata == package_metadata(tmp_path / "le.gguf")
    assert big.metadata["x.words"] == ["a", "bé", "€"] and big.metadata["x.ints"] == [1, -2, 3]
    assert np.array_equal(big.load("w"), weight) and np.array_equal(little.load("w"), weight)
    assert (tmp_path / "be.gguf").read_bytes() != (tmp_path / "le.gguf").read_bytes()
