"""Gemma 3 270M on the real file against the float32 transformers reference
(shared/reference/gemma3-270m), and the pieces that differ from Llama checked on their own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import Model, Tokenizer, kernels
from engine.architectures import ARCHITECTURES
from engine.gguf import GgufFile, read_config
from engine.model import attention, gelu_tanh_mul
from engine.sampling import InferenceOptions
from tests.engine.conftest import greedy_continuation, rel_diff


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> tuple[Model, Tokenizer]:
    f = GgufFile(gemma3_path)
    return Model.from_gguf(f), Tokenizer.from_gguf(f)


@pytest.fixture(scope="module")
def gemma3_prompts(gemma3_reference_dir: Path) -> list[dict[str, Any]]:
    prompts: list[dict[str, Any]] = json.loads((gemma3_reference_dir / "prompts.json").read_text("utf-8"))[
        "prompts"
    ]
    return prompts


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------
@pytest.mark.gemma3
def test_config_is_read_from_the_file(gemma3_path: Path) -> None:
    c = read_config(GgufFile(gemma3_path))
    assert (c.architecture, c.n_layers, c.hidden_size, c.ffn_size) == ("gemma3", 18, 640, 2048)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (4, 1, 256, 262_144)
    assert (c.sliding_window, c.rope_theta, c.context_length) == (512, 1_000_000.0, 32_768)
    assert [i for i in range(18) if not c.is_local_layer(i)] == [5, 11, 17]  # every sixth is global


@pytest.mark.gemma3
def test_tokenizer_matches_the_reference(gemma3, gemma3_prompts, gemma3_reference_dir) -> None:
    _, tok = gemma3
    cases = json.loads((gemma3_reference_dir / "tokenizer_cases.json").read_text("utf-8"))
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
    for prompt in gemma3_prompts:  # BOS (2) added, as the file asks
        assert [tok.bos_id, *tok.encode(prompt["text"])] == prompt["input_ids"], prompt["key"]


@pytest.mark.gemma3
def test_last_logits_match_the_reference(gemma3, gemma3_prompts, gemma3_reference_dir) -> None:
    model, _ = gemma3
    with np.load(gemma3_reference_dir / "logits.npz") as data:
        for prompt in gemma3_prompts:
            ref = data[prompt["key"]]
            logits = model.forward(prompt["input_ids"])[-1]
            assert np.abs(logits - ref).max() <= 1e-3 * np.abs(ref).max(), prompt["key"]


@pytest.mark.gemma3
def test_greedy_continuations_match_the_reference(gemma3, gemma3_prompts) -> None:
    model, _ = gemma3
    for prompt in gemma3_prompts:
        out = greedy_continuation(model, prompt["input_ids"], len(prompt["greedy_ids"]))
        assert out == prompt["greedy_ids"], prompt["key"]


@pytest.mark.gemma3
def test_numba_and_numpy_paths_agree(gemma3, gemma3_path, gemma3_prompts) -> None:
    model, _ = gemma3
    other = "numpy" if model.weights.kernels == "numba" else "numba"
    if other == "numba" and kernels.backend("auto") != "numba":
        pytest.skip("numba is not installed")
    ids = gemma3_prompts[2]["input_ids"]
    reference = Model.from_gguf(gemma3_path, kernel_path=other)
    assert rel_diff(model.forward(ids), reference.forward(ids)) < 1e-4


@pytest.mark.gemma3
def test_base_model_chats_in_gemma_turns(gemma3) -> None:
    """No template in the file: Gemma's own turn format, <end_of_turn> ends a reply."""
    from engine import BatchedInferenceEngine

    model, tok = gemma3
    assert not tok.has_own_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.encode("<end_of_turn>", parse_special=True)[0] in tok.eos_ids
    engine = BatchedInferenceEngine(model, tok)
    options = InferenceOptions(temperature=0.0, max_new_tokens=8, repetition_penalty=1.0)
    handle = engine.submit([{"role": "user", "content": "What is the capital of France?"}], options)
    while not handle.done():
        engine.step()
    result = handle.result()
    assert result.finish_reason in ("stop", "length") and result.generated_tokens >= 1


# ---------------------------------------------------------------------------------------------
# The pieces, without the model file
# ---------------------------------------------------------------------------------------------
def test_sliding_window_attention_equals_a_plain_masked_softmax() -> None:
    rng = np.random.default_rng(0)
    T, start, window, H, KVH, Hd = 6, 7, 4, 2, 1, 8
    S = start + T
    q = rng.standard_normal((T, H, Hd), dtype=np.float32)
    keys = rng.standard_normal((KVH, S, Hd), dtype=np.float32)
    values = rng.standard_normal((KVH, S, Hd), dtype=np.float32)
    out = attention(q, keys, values, start, window)
    expected = np.empty((T, H, Hd))
    for t in range(T):
        pos = start + t
        visible = [s for s in range(S) if pos - window < s <= pos]  # the last `window` keys, itself included
        for h in range(H):
            scores = np.array([q[t, h].astype(np.float64) @ keys[0, s] for s in visible])
            p = np.exp(scores - scores.max())
            expected[t, h] = (p / p.sum()) @ values[0, visible]
    assert rel_diff(out, expected.reshape(T, H * Hd)) < 1e-5
    one = attention(q[-1:], keys, values, S - 1, window)  # a decode row sees the same window
    assert rel_diff(one, out[-1:]) < 1e-5


def test_gelu_tanh_against_its_formula() -> None:
    x = np.linspace(-6, 6, 101, dtype=np.float32)[None, :]
    up = np.full_like(x, 2.0)
    exact = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3))) * 2.0
    np.testing.assert_allclose(gelu_tanh_mul(x, up), exact, rtol=1e-5, atol=1e-6)


def test_families_are_declared_not_branched_on() -> None:
    llama, gemma = ARCHITECTURES["llama"], ARCHITECTURES["gemma3"]
    assert llama.qk_rows_permuted and not llama.qk_norm and llama.activation == "silu"
    assert not gemma.qk_rows_permuted and gemma.qk_norm and gemma.post_norms and gemma.scale_embeddings
    source = (Path(__file__).resolve().parents[2] / "engine" / "model.py").read_text("utf-8")
    assert 'architecture == "' not in source and "arch ==" not in source
