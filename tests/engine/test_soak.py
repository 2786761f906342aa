"""Soak: the real engine under load, faults and live settings changes; nothing lost, nothing hung.

The driver (``SoakDriver``, ``soak()``) is in tests/fixtures/soak.py, shared with
``benchmarks/soak.py``, which runs the long soak and prints its figures. A short run of each driver
is part of ``make test``; the long ones are marked slow.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from engine import Model, Tokenizer
from tests.fixtures.soak import SoakConfig, SoakFailure, soak
from tests.fixtures.tiny_model import write_tiny_gguf


def seed() -> int:
    value = os.environ.get("SOAK_SEED", "").strip()
    return random.randrange(2**31) if value == "random" else int(value or 20261126)


@pytest.fixture(scope="module")
def soak_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Model, Tokenizer]:
    """The tiny model with a 2,048-token context, so 1,500-token prompts fit."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("soak") / "tiny2k.gguf", context_length=2048)
    return Model.from_gguf(path), Tokenizer.from_gguf(path)


def check(result: tuple[dict[str, Any], list[str]]) -> None:
    figures, violations = result
    if violations:
        raise SoakFailure(
            f"{len(violations)} violation(s), seed {figures['seed']}:\n" + "\n".join(violations[:20])
        )
    assert figures["requests_served"] > 0 and figures["settings_changes"] > 0
    # no request failed for lack of KV memory (an error would also be a violation); reserved bytes
    # stayed within 10% plus one growth step per session of the used ones at the end of every round
    assert figures["failed_budget"] == 0 and figures["control_retries"] == 0
    assert figures["rejected_queue_full"] > 0 or not figures["bursts"], "a burst never filled the queue"


def test_soak_threads_ci(soak_model):
    check(soak(*soak_model, SoakConfig(driver="threads", seed=seed())))


def test_soak_step_ci(soak_model):
    check(soak(*soak_model, SoakConfig(driver="step", seed=seed())))


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["threads", "step"])
def test_soak_long(soak_model, driver):
    check(soak(*soak_model, SoakConfig(driver=driver, n_turns=30, max_new_tokens=16, seed=seed())))


@pytest.mark.slow
@pytest.mark.smollm2
def test_soak_smollm2(smollm2):
    config = SoakConfig(n_turns=6, max_prompt_tokens=600, seed=seed())  # 8 conversations, ~3 min
    check(soak(*smollm2, config))
