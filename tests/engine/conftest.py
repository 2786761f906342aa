"""Engine-test fixtures: models loaded once per session (loading SmolLM2 takes a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import Model, Tokenizer
from engine.gguf import GgufFile


@pytest.fixture(scope="session")
def tiny(tiny_model_path: Path) -> tuple[Model, Tokenizer]:
    f = GgufFile(tiny_model_path)
    return Model.from_gguf(f), Tokenizer.from_gguf(f)


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> tuple[Model, Tokenizer]:
    f = GgufFile(smollm2_path)
    return Model.from_gguf(f), Tokenizer.from_gguf(f)


@pytest.fixture(scope="session")
def reference_prompts(reference_dir: Path) -> list[dict[str, Any]]:
    prompts: list[dict[str, Any]] = json.loads((reference_dir / "prompts.json").read_text("utf-8"))["prompts"]
    return prompts


@pytest.fixture(scope="session")
def reference_logits(reference_dir: Path) -> dict[str, np.ndarray]:
    with np.load(reference_dir / "logits.npz") as data:
        return {key: data[key] for key in data.files}


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def greedy_continuation(model: Model, ids: list[int], n_new: int) -> list[int]:
    """``n_new`` argmax tokens after ``ids``, decoded one at a time with a KV cache."""
    cache = model.new_cache(len(ids) + n_new)
    logits = model.forward(ids, cache)[-1]
    out: list[int] = []
    for _ in range(n_new):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]], cache)[-1]
    return out
