"""A decode step's blocks in one compiled call (``engine.kernels.blocks``) against the Python blocks
(``Model._block``): the same logits for every family's features, every mix of rows, and the steps
it must leave to Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import Model, kernels
from engine.kernels import attention
from engine.kernels.blocks import Blocks
from engine.model import Row
from tests.engine.conftest import rel_diff
from tests.fixtures.tiny_model import write_tiny_model

pytestmark = pytest.mark.skipif(kernels.backend() != "numba", reason="the compiled blocks need numba")


class Calls:
    """Counts ``Blocks.run`` calls (the real method runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = Blocks.run

        def counted(blocks: Blocks, *args: object) -> np.ndarray:
            self.n += 1
            return real(blocks, *args)

        monkeypatch.setattr(Blocks, "run", counted)


def step_both_ways(
    model: Model, prompts: list[list[int]], new: list[list[int]], calls: Calls, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of one step over ``new`` after ``prompts``: through the compiled blocks, then again
    (caches trimmed back) through the Python blocks. ``calls`` counts the step's calls only."""
    caches = [model.new_cache(256, dtype=dtype) for _ in prompts]
    for ids, cache in zip(prompts, caches, strict=True):
        model.forward(ids, cache)
    calls.n = 0
    rows = [Row(np.array(ids), c) for ids, c in zip(new, caches, strict=True)]
    fast = model.forward_tails(rows, [len(ids) for ids in new])
    for ids, cache in zip(prompts, caches, strict=True):
        cache.trim(len(ids))
    blocks, model._blocks = model._blocks, False
    try:
        slow = model.forward_tails(rows, [len(ids) for ids in new])
    finally:
        model._blocks = blocks
    return np.concatenate(fast), np.concatenate(slow)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma3"])
def test_each_family_gives_the_python_blocks_logits(tmp_path: Path, monkeypatch, architecture: str) -> None:
    """QK-norm (qwen3, gemma3), q/k/v biases (qwen2), post-norms, GELU and sliding windows (gemma3,
    window 16: the prompts here reach past it) and plain Llama: same logits, same greedy tokens."""
    extra = {"tokenizer.chat_template": None} if architecture == "gemma3" else None
    path = write_tiny_model(
        tmp_path / f"{architecture}.gguf", architecture=architecture, weight_type="Q8_0", n_heads=4,
        n_kv_heads=2, head_dim=32, seed=3, extra_metadata=extra,
    ).path  # fmt: skip
    model = Model.from_gguf(path, kernel_path="numba")
    assert model._compiled_blocks() is not None
    calls = Calls(monkeypatch)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 200, n).tolist() for n in (5, 30, 17)]
    new = [[7], [9, 11, 13], [15]]  # rows of 1, 3 (drafts) and 1 token
    fast, slow = step_both_ways(model, prompts, new, calls)
    assert calls.n == 1
    assert rel_diff(fast, slow) < 1e-5
    assert (fast.argmax(axis=1) == slow.argmax(axis=1)).all()


def test_smollm2_decode_rows_match(smollm2, monkeypatch) -> None:
    """The real model (Q4_1 and Q8_0 matrices) with 1 and 8 sequences of different lengths."""
    model, _ = smollm2
    calls = Calls(monkeypatch)
    rng = np.random.default_rng(2)
    for n in (1, 8):
        prompts = [rng.integers(100, 40_000, int(k)).tolist() for k in rng.integers(3, 60, n)]
        fast, slow = step_both_ways(model, prompts, [[int(t)] for t in rng.integers(100, 40_000, n)], calls)
        assert calls.n == 1
        assert rel_diff(fast, slow) < 1e-5
        assert (fast.argmax(axis=1) == slow.argmax(axis=1)).all()


@pytest.mark.parametrize("parallel_work", [1, 1 << 40])
def test_attention_on_the_pool_or_this_thread_gives_the_same_logits(smollm2, monkeypatch, parallel_work):
    """On 2 threads, attention above PARALLEL_WORK is a pool job (items split over this thread and the
    worker), below it runs here: inside the compiled blocks both give the Python blocks' logits."""
    model, _ = smollm2
    monkeypatch.setattr(attention, "PARALLEL_WORK", parallel_work)
    before = kernels.requested_threads()
    kernels.set_threads(2)
    try:
        calls = Calls(monkeypatch)
        rng = np.random.default_rng(3)
        prompts = [rng.integers(100, 40_000, k).tolist() for k in (40, 90, 7)]
        fast, slow = step_both_ways(model, prompts, [[5], [6], [7]], calls)
        assert calls.n == 1
        assert rel_diff(fast, slow) < 1e-5
    finally:
        kernels.set_threads(before)


@pytest.mark.skipif(not attention.HAS_F16C, reason="float16 caches take the compiled blocks with F16C only")
def test_float16_caches_store_the_same_bits(smollm2, monkeypatch) -> None:
    """A float16 cache written by the compiled blocks (float32 -> float16 by the CPU's conversion,
    ties to even as NumPy's) holds what the Python blocks write: the same bits but where the float32
    values before rounding differed in their last bits (then a float16 ulp or two); logits within
    the reference bar."""
    model, _ = smollm2
    calls = Calls(monkeypatch)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(100, 40_000, k).tolist() for k in (9, 30)]
    caches = [model.new_cache(64, dtype="float16") for _ in prompts]
    for ids, cache in zip(prompts, caches, strict=True):
        model.forward(ids, cache)
    step = [Row(np.array([7]), c) for c in caches]
    calls.n = 0
    fast = model.forward_last(step)
    written = [c.keys(3)[:, c.n_tokens - 1].copy() for c in caches] + [
        c.values(3)[:, c.n_tokens - 1].copy() for c in caches
    ]
    for ids, cache in zip(prompts, caches, strict=True):
        cache.trim(len(ids))
    blocks, model._blocks = model._blocks, False
    try:
        slow = model.forward_last(step)
    finally:
        model._blocks = blocks
    again = [c.keys(3)[:, c.n_tokens - 1] for c in caches] + [c.values(3)[:, c.n_tokens - 1] for c in caches]
    assert calls.n == 1
    a, b = np.concatenate([w.ravel() for w in written]), np.concatenate([w.ravel() for w in again])
    assert a.dtype == np.float16 and (a == b).mean() > 0.95  # rounded alike: the same bits ...
    gap = np.abs(a.astype(np.float32) - b.astype(np.float32))
    worst = int(gap.argmax())
    assert gap[worst] <= abs(float(b[worst])) * 2**-9 + 2**-23, (a[worst], b[worst])  # ... or an ulp or two
    # a float16 ulp flipped in one layer moves the logits more than float32's last bits: the bar
    assert rel_diff(fast, slow) < 1e-3 and (fast.argmax(axis=1) == slow.argmax(axis=1)).all()


def test_steps_it_cannot_take_go_to_python(smollm2, monkeypatch) -> None:
    """More than 16 rows and a q8_0 cache run the Python blocks."""
    model, _ = smollm2
    calls = Calls(monkeypatch)
    cache = model.new_cache(64)
    model.forward(list(range(100, 120)), cache)  # 20 rows: prefill
    eight = model.new_cache(64, dtype="q8_0")
    model.forward([100, 101], eight)
    model.forward([102], eight)
    assert calls.n == 0
    model.forward([121], cache)
    assert calls.n == 1
