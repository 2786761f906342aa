"""The model against references: a plain independent forward on the tiny model, the shared
transformers reference on SmolLM2; cached = uncached; batched = one at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine import ContextOverflowError, Model, kernels
from engine.gguf import GgufFile, read_config
from engine.model import Row
from tests.engine.conftest import greedy_continuation, rel_diff
from tests.fixtures.tiny_model import WEIGHT_TYPES, TinyConfig, TinyModel, rewrite_gguf, write_tiny_model


# ---------------------------------------------------------------------------------------------
# An independent, deliberately plain forward pass: GGUF layout as stored, adjacent-pair RoPE, one
# head at a time, no cache. Shares no code with engine/: the config and the weights are the ones
# the fixture wrote (tests/fixtures/tiny_model.py), not the engine's reading of the file.
# ---------------------------------------------------------------------------------------------
def naive_forward(c: TinyConfig, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    w = {name: value.astype(np.float64) for name, value in w.items()}
    hd, T = c.head_dim, len(ids)
    inv = c.rope_theta ** (-np.arange(0, hd, 2) / hd)
    if "rope_freqs.weight" in w:  # Llama 3.x: per-dimension frequency factors divide the frequencies
        inv = inv / w["rope_freqs.weight"]

    def norm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_eps) * g

    # Llama files (as llama.cpp converts them) rotate adjacent pairs (2i, 2i+1); Qwen files rotate the
    # two halves of each head (i, i + hd/2)
    halves = c.architecture in ("qwen2", "qwen3")

    def rope_pairs(x: np.ndarray) -> np.ndarray:  # x: (T, hd)
        out = x.copy()
        for t in range(T):
            for i in range(hd // 2):
                j, k = (i, i + hd // 2) if halves else (2 * i, 2 * i + 1)
                a, b, th = x[t, j], x[t, k], t * inv[i]
                out[t, j] = a * np.cos(th) - b * np.sin(th)
                out[t, k] = a * np.sin(th) + b * np.cos(th)
        return out

    x = w["token_embd.weight"][ids]
    for layer in range(c.n_layers):
        p = f"blk.{layer}."
        h = norm(x, w[p + "attn_norm.weight"])
        q, k, v = h @ w[p + "attn_q.weight"].T, h @ w[p + "attn_k.weight"].T, h @ w[p + "attn_v.weight"].T
        if p + "attn_q.bias" in w:  # Qwen 2
            q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
        heads = []
        for head in range(c.n_heads):
            kv = head // (c.n_heads // c.n_kv_heads)
            qh, kh = q[:, head * hd : (head + 1) * hd], k[:, kv * hd : (kv + 1) * hd]
            if p + "attn_q_norm.weight" in w:  # Qwen 3: each head's q and k normalised
                qh, kh = norm(qh, w[p + "attn_q_norm.weight"]), norm(kh, w[p + "attn_k_norm.weight"])
            qh, kh = rope_pairs(qh), rope_pairs(kh)
            s = qh @ kh.T / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
            pr = np.exp(s - s.max(-1, keepdims=True))
            heads.append((pr / pr.sum(-1, keepdims=True)) @ v[:, kv * hd : (kv + 1) * hd])
        x = x + np.concatenate(heads, axis=1) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    out_w = w["token_embd.weight"] if c.tied_embeddings else w["output.weight"]
    return norm(x, w["output_norm.weight"]) @ out_w.T  # (T, V)


def reference(tm: TinyModel, ids: list[int]) -> np.ndarray:
    return naive_forward(tm.config, tm.weights, ids)


def engine_config_fields(path: Path) -> dict[str, object]:
    """read_config's view of a file, in the fixture's field names."""
    c = read_config(GgufFile(path))
    return {
        "architecture": c.architecture, "n_layers": c.n_layers, "hidden_size": c.hidden_size,
        "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "ffn_size": c.ffn_size,
        "context_length": c.context_length, "vocab_size": c.vocab_size, "rope_theta": c.rope_theta,
        "rms_eps": c.rms_eps,
    }  # fmt: skip


IDS = [1, 40, 300, 7, 99, 250, 3, 150, 42, 8, 400, 2]
# A model whose every hyper-parameter differs from the engine's fallbacks and from the usual
# derivations: RoPE base 1000 (fallback 10000), rms_eps 0.25 (fallback 1e-5; large enough to move the
# logits), head_dim 32 != hidden_size / n_heads = 16 (written as attention.key_length).
UNUSUAL = {"rope_theta": 1000.0, "rms_eps": 0.25, "head_dim": 32, "seed": 5}


def test_tiny_model_matches_independent_forward(tiny, tiny_model):
    model, _ = tiny
    assert rel_diff(model.forward(IDS), reference(tiny_model, IDS)) < 1e-5


def test_untied_output_and_gqa_variants_match(tmp_path):
    tm = write_tiny_model(tmp_path / "untied.gguf", tied_embeddings=False, n_heads=8, n_kv_heads=2, seed=3)
    assert "output.weight" in tm.weights
    model = Model.from_gguf(tm.path)
    assert rel_diff(model.forward(IDS), reference(tm, IDS)) < 1e-5


@pytest.mark.parametrize("options", [{}, UNUSUAL], ids=["default", "unusual"])
def test_read_config_returns_what_the_fixture_wrote(tmp_path, options):
    tm = write_tiny_model(tmp_path / "m.gguf", **options)
    expected = {name: getattr(tm.config, name) for name in engine_config_fields(tm.path)}
    assert engine_config_fields(tm.path) == expected


def test_rope_theta_rms_eps_and_head_dim_are_read_not_assumed(tmp_path):
    """A misread RoPE base, RMS epsilon or head dimension changes the logits past the 1e-5 bar."""
    tm = write_tiny_model(tmp_path / "unusual.gguf", **UNUSUAL)
    logits = Model.from_gguf(tm.path).forward(IDS)
    assert rel_diff(logits, reference(tm, IDS)) < 1e-5
    # the test can fail: the engine's fallbacks in place of the file's values move the logits
    for wrong in ({"rope_theta": 10000.0}, {"rms_eps": 1e-5}):
        misread = dataclasses.replace(tm.config, **wrong)
        assert rel_diff(naive_forward(misread, tm.weights, IDS), logits) > 1e-3, wrong
    # and a head_dim derived as hidden_size / n_heads cannot even shape the weights
    assert tm.weights["blk.0.attn_q.weight"].shape == (4 * 32, 64)


def test_rope_frequency_factors_are_applied(tiny_model, tmp_path):
    """A ``rope_freqs.weight`` tensor (Llama 3.x GGUFs) scales each RoPE frequency."""
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)  # head_dim 16 -> 8 frequencies
    path = rewrite_gguf(tiny_model.path, tmp_path / "freqs.gguf", add={"rope_freqs.weight": factors})
    model = Model.from_gguf(path)
    np.testing.assert_array_equal(model.weights.rope_freq_factors, factors)
    logits = model.forward(IDS)
    weights = {**tiny_model.weights, "rope_freqs.weight": factors}
    assert rel_diff(logits, naive_forward(tiny_model.config, weights, IDS)) < 1e-5
    assert rel_diff(logits, Model.from_gguf(tiny_model.path).forward(IDS)) > 1e-3  # the factors matter


def test_config_read_from_metadata(tiny, tiny_model):
    c, t = tiny[0].config, tiny_model.config
    shape = (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_size, c.ffn_size)
    assert shape == (2, 4, 2, 16, 64, 128)
    assert (c.context_length, c.vocab_size, c.architecture) == (256, tiny[1].vocab_size, "llama")
    assert (c.rope_theta, c.rms_eps) == (t.rope_theta, t.rms_eps) and c.vocab_size == t.vocab_size


def test_weights_laid_out_for_linear(tiny, tiny_model):
    """Every matrix reads back (out, in) as the fixture wrote it; float32 ones are laid out for x @ W."""
    model, _ = tiny
    w = tiny_model.weights
    layer = model.weights.layers[1]
    np.testing.assert_array_equal(layer.wo.dequantize(), w["blk.1.attn_output.weight"])
    np.testing.assert_array_equal(layer.w_down.dequantize(), w["blk.1.ffn_down.weight"])
    F = model.config.ffn_size
    np.testing.assert_array_equal(layer.w_gate_up.dequantize()[:F], w["blk.1.ffn_gate.weight"])
    dense = [m for m in (layer.wqkv, layer.wo, layer.w_gate_up) if isinstance(m, kernels.DenseWeight)]
    assert all(m.wt.flags.c_contiguous for m in dense)
    assert model.weights.lm_head.shape == (model.config.vocab_size, 64)


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
@pytest.mark.parametrize("weight_type", ["F32", "Q8_0"])
def test_qwen_families_match_the_independent_forward(tmp_path, architecture, weight_type):
    """Qwen 2 (q/k/v biases) and Qwen 3 (QK-norm), written in llama.cpp's layout (no q/k row
    permutation: rotate-half RoPE), against the plain forward on the weights the fixture wrote."""
    tm = write_tiny_model(
        tmp_path / f"{architecture}.gguf", architecture=architecture, weight_type=weight_type, seed=11,
        hidden_size=64, ffn_size=128, n_heads=4, n_kv_heads=2,
    )  # fmt: skip
    model = Model.from_gguf(tm.path)
    assert model.config.architecture == architecture
    assert rel_diff(model.forward(IDS), reference(tm, IDS)) < 1e-5
    cache = model.new_cache(64)  # cached decoding equals the full forward for these families too
    steps = np.concatenate([model.forward(IDS[:5], cache), *(model.forward([i], cache) for i in IDS[5:])])
    assert rel_diff(steps, reference(tm, IDS)) < 1e-5


@pytest.mark.parametrize("weight_type", [t for t in WEIGHT_TYPES if t != "F32"])
def test_every_writable_weight_type_loads_and_runs(tmp_path, weight_type, tiny_model):
    tm = write_tiny_model(tmp_path / f"{weight_type}.gguf", weight_type=weight_type)
    model = Model.from_gguf(tm.path)
    logits = model.forward(IDS)
    assert np.isfinite(logits).all()
    # the quantized model is the values the file holds: the independent forward on them agrees
    assert rel_diff(logits, reference(tm, IDS)) < 1e-5
    # and they are the F32 model's weights rounded: the same draw, not some other tensor
    for name, value in tm.weights.items():
        assert rel_diff(value, tiny_model.weights[name]) < 0.2, name


def test_cached_decoding_equals_uncached_forward(tiny):
    model, _ = tiny
    full = model.forward(IDS)
    cache = model.new_cache(64)
    parts = [model.forward(IDS[:5], cache), model.forward(IDS[5:6], cache), model.forward(IDS[6:], cache)]
    assert cache.n_tokens == len(IDS)
    assert rel_diff(np.concatenate(parts), full) < 1e-4
    np.testing.assert_array_equal(cache.token_ids, IDS)


def test_batched_rows_equal_one_at_a_time(tiny):
    model, _ = tiny
    prompts = [IDS, IDS[3:5], [9], IDS[::-1]]
    alone = [model.forward(p)[-1] for p in prompts]
    caches = [model.new_cache(64) for _ in prompts]
    together = model.forward_last([Row(np.array(p), c) for p, c in zip(prompts, caches, strict=True)])
    for a, b in zip(alone, together, strict=True):
        assert rel_diff(b, a) < 1e-4
    # one decode step for all four, against each one's full forward
    nxt = [int(np.argmax(t)) for t in together]
    step = model.forward_last([Row(np.array([n]), c) for n, c in zip(nxt, caches, strict=True)])
    for p, n, s in zip(prompts, nxt, step, strict=True):
        assert rel_diff(s, model.forward([*p, n])[-1]) < 1e-4


def test_decode_reuses_the_cache_buffer(tiny):
    """One token's work per step: the buffer is only replaced once per 64-token growth step."""
    model, _ = tiny
    cache = model.new_cache(256)
    model.forward(IDS, cache)
    buffer, n_replaced = cache.keys(0).base, 0
    for _ in range(200):
        model.forward([5], cache)
        if cache.keys(0).base is not buffer:  # identity, not id(): a freed buffer's id can come back
            buffer, n_replaced = cache.keys(0).base, n_replaced + 1
    assert cache.n_tokens == len(IDS) + 200
    assert len(IDS) <= 64 and cache.capacity == 256  # capacities 64, 128, 192, 256
    assert n_replaced == 3  # three growths, not one per token


def test_bad_token_ids_and_overflow(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward([0, model.config.vocab_size])
    with pytest.raises(ValueError, match="at least one token"):
        model.forward([])
    cache = model.new_cache()
    model.forward([5] * 250, cache)
    with pytest.raises(ContextOverflowError, match="256"):
        model.forward([5] * 10, cache)
    assert cache.n_tokens == 250  # the failed call committed nothing


def test_float16_cache_close_to_float32(tiny):
    model, _ = tiny
    cache = model.new_cache(64, dtype="float16")
    logits = np.concatenate([model.forward(IDS[:6], cache), model.forward(IDS[6:], cache)])
    assert cache.keys(0).dtype == np.float16
    assert rel_diff(logits, model.forward(IDS)) < 1e-2


# ---------------------------------------------------------------------------------------------
# SmolLM2 against the transformers reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_last_logits_match_reference(smollm2, reference_prompts, reference_logits):
    model, _ = smollm2
    for prompt in reference_prompts:
        logits = model.forward(prompt["input_ids"])[-1]
        ref = reference_logits[prompt["key"]]
        assert np.abs(logits - ref).max() <= 1e-3 * np.abs(ref).max(), prompt["key"]


@pytest.mark.smollm2
def test_smollm2_greedy_continuations_match_reference(smollm2, reference_prompts):
    model, _ = smollm2
    for prompt in reference_prompts:
        out = greedy_continuation(model, prompt["input_ids"], len(prompt["greedy_ids"]))
        assert out == prompt["greedy_ids"], prompt["key"]


@pytest.mark.smollm2
def test_smollm2_cached_equals_uncached(smollm2, reference_prompts):
    model, _ = smollm2
    ids = reference_prompts[4]["input_ids"]  # the multi-turn prompt, 86 tokens
    cache = model.new_cache(128)
    chunks = [
        model.forward(ids[:50], cache),
        model.forward(ids[50:51], cache),
        model.forward(ids[51:], cache),
    ]
    assert rel_diff(np.concatenate(chunks), model.forward(ids)) < 1e-4
