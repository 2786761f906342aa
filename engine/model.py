"""A decoder-only transformer (Llama, Gemma 3, Qwen 2/3) with float32 activations.

Dimension legend
    B    sequences in a batch            T    new tokens of one sequence
    N    new tokens of the whole batch   S    cached length after this step (attention span)
    D    model dim (hidden_size)         F    feed-forward dim
    H    query heads     KVH  KV heads   G    query heads per KV head (H // KVH)
    Hd   head dim        V    vocabulary

Every projection is ``linear(x, W)`` (``engine.kernels``): on the numba path quantized weights stay
quantized in memory and small steps run JIT kernels; on the NumPy path weights are float32, laid out
once at load for ``x @ W``. q/k/v are fused into one matrix and gate/up into another. The model holds
no cache and makes no policy: the caller owns one ``KvCacheEntry`` per sequence and passes it in.

What differs between families (QK-norm, norms after attention and MLP, GELU-tanh, the embedding
scale, sliding-window layers, q/k/v biases) is declared in ``engine.architectures`` and read here as
flags on ``config.arch`` and as optional weights (``LayerWeights.q_norm`` ...): one forward, no
per-family branches.

Q/K in GGUF: llama.cpp's converter permutes the rows of Llama's attn_q/attn_k so RoPE rotates
adjacent pairs (x[2i], x[2i+1]). At load we reorder each head's output dims to [0, 2, 4, ..., 1, 3,
5, ...], so the pairs become (x[i], x[i + Hd/2]) and RoPE is the contiguous "rotate half" form. Q and
K get the same reorder, so every q·k product, and the model's output, is unchanged. Gemma and Qwen
are converted without the permutation: already rotate-half.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from . import gguf as gguf_io
from . import kernels
from .errors import ContextOverflowError
from .gguf import ModelConfig
from .kernels import linear
from .kernels import weights as kw
from .kv_cache import KvCacheEntry, ModelShape
from .kv_disk import model_identity

if TYPE_CHECKING:
    from .kernels.attention import StepPlan
    from .kernels.blocks import Blocks

log = logging.getLogger(__name__)

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# Math helpers
# ---------------------------------------------------------------------------------------------
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * weight / sqrt(mean(x²) + eps), row-wise. (N, D) -> (N, D)"""
    rms = np.vecdot(x, x)  # (N,) sums of squares; vecdot: the fewest passes and no einsum parsing
    rms /= F32(x.shape[-1])
    rms += F32(eps)
    np.sqrt(rms, out=rms)
    out = x / rms[:, None]  # (N, D)
    out *= weight
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up = gate * sigmoid(gate) * up. (N, F) -> (N, F)"""
    out = np.negative(gate)
    np.exp(out, out=out)
    out += F32(1.0)
    np.divide(gate, out, out=out)
    out *= up
    return out


class Rope:
    """RoPE angles of one base: ``tables(positions)`` gives cos of each pair's angle twice
    ([cos, cos]) and sin with the rotation's signs ([-sin, sin]), (N, Hd) each, for ``apply_rope``.
    Computed per step in float64 for the positions in it (a table for a 32k context would take 64 MiB)."""

    def __init__(self, head_dim: int, theta: float, scale: float, freq_factors: np.ndarray | None) -> None:
        half = head_dim // 2
        inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)  # (Hd/2,)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.astype(np.float64)
        self.inv_freq, self.scale = inv_freq, scale

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angles = np.outer(positions.astype(np.float64) / self.scale, self.inv_freq)  # (N, Hd/2)
        cos, sin = np.cos(angles), np.sin(angles)
        return np.concatenate([cos, cos], axis=1).astype(F32), np.concatenate([-sin, sin], axis=1).astype(F32)


def gelu_tanh_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu(gate) * up with GELU's tanh approximation (Gemma). (N, F) -> (N, F)"""
    inner = gate * gate
    inner *= F32(0.044715)
    inner += F32(1.0)
    inner *= gate
    inner *= F32(np.sqrt(2.0 / np.pi))
    np.tanh(inner, out=inner)
    inner += F32(1.0)
    inner *= gate
    inner *= F32(0.5)
    inner *= up
    return inner


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with x1, x2 the two halves.

    x: (N, heads, Hd); cos, sin: (N, Hd) from ``Rope.tables`` -> (N, heads, Hd).
    """
    half = x.shape[-1] // 2
    swapped = np.concatenate([x[..., half:], x[..., :half]], axis=-1)  # (N, heads, Hd): (x2, x1)
    out = x * cos[:, None, :]
    swapped *= sin[:, None, :]  # (-x2 sin, x1 sin)
    out += swapped
    return out


def softmax_inplace(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place (scores may hold -inf where masked)."""
    scores -= np.maximum.reduce(scores, axis=-1, keepdims=True)  # ufunc reductions: no wrapper overhead
    np.exp(scores, out=scores)
    scores /= np.add.reduce(scores, axis=-1, keepdims=True)
    return scores


def decode_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Attention of one new token (nothing to mask): q (H, Hd) pre-scaled; keys, values (KVH, S, Hd).
    Returns (H * Hd,)."""
    KVH, Hd = keys.shape[0], keys.shape[2]
    if keys.dtype != F32:  # a float16 cache: attention still computes in float32
        keys, values = keys.astype(F32), values.astype(F32)
    scores = q.reshape(KVH, -1, Hd) @ keys.transpose(0, 2, 1)  # (KVH, G, S)
    return (softmax_inplace(scores) @ values).reshape(-1)  # (KVH, G, Hd) -> (H*Hd,)


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, window: int = 0) -> np.ndarray:
    """Causal grouped-query attention of T new queries against S = start + T cached positions.

    q: (T, H, Hd), already scaled by 1/sqrt(Hd) (folded into the weights at load);
    keys, values: (KVH, S, Hd), any float dtype. With ``window`` > 0 a query at position p sees only
    the keys at positions p - window + 1 .. p (a sliding-window layer).
    Returns (T, H * Hd).
    """
    T, H, Hd = q.shape
    KVH, S = keys.shape[0], keys.shape[1]
    G = H // KVH
    if keys.dtype != F32:  # a float16 cache: attention still computes in float32
        keys, values = keys.astype(F32), values.astype(F32)
    if T == 1:
        first = max(0, S - window) if window else 0
        return decode_attention(q[0], keys[:, first:], values[:, first:]).reshape(1, H * Hd)
    qg = q.reshape(T, KVH, G, Hd).transpose(1, 2, 0, 3).reshape(KVH, G * T, Hd)  # (KVH, G*T, Hd)
    scores = qg @ keys.transpose(0, 2, 1)  # (KVH, G*T, S)
    # query t sits at position start + t and sees keys 0 .. start + t: every cached key, and the new
    # keys up to its own (a causal mask over the last T columns only)
    causal = np.triu(np.full((T, T), -np.inf, dtype=F32), k=1)  # (T, T)
    scores.reshape(KVH, G, T, S)[..., start:] += causal
    if window and start + T > window:  # keys more than window - 1 positions behind the query
        query_pos = np.arange(start, start + T)[:, None]  # (T, 1)
        too_old = np.arange(S)[None, :] <= query_pos - window  # (T, S)
        scores.reshape(KVH, G, T, S)[..., too_old] = -np.inf
    softmax_inplace(scores)
    out = scores @ values  # (KVH, G*T, Hd)
    return out.reshape(KVH, G, T, Hd).transpose(2, 0, 1, 3).reshape(T, H * Hd)  # (T, H*Hd)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class LayerWeights:
    """One block's weights; matrices are ``kernels.Weight`` objects for ``linear()``, shapes (out, in)."""

    attn_norm: np.ndarray  # (D,)
    wqkv: kernels.Weight  # ((H + 2*KVH) * Hd, D): q and k rows in rotate-half order, q scaled by 1/sqrt(Hd)
    wo: kernels.Weight  # (D, H*Hd)
    ffn_norm: np.ndarray  # (D,)
    w_gate_up: kernels.Weight  # (2F, D)
    w_down: kernels.Weight  # (D, F)
    q_norm: np.ndarray | None = None  # (Hd,) QK-norm (Gemma 3), times 1/sqrt(Hd): attention's scale
    k_norm: np.ndarray | None = None  # (Hd,)
    post_attn_norm: np.ndarray | None = None  # (D,) on the attention output (Gemma 3)
    post_ffn_norm: np.ndarray | None = None  # (D,) on the MLP output
    qkv_bias: np.ndarray | None = None  # ((H+2KVH)*Hd,) added to the fused projection (Qwen 2)


@dataclass(slots=True)
class ModelWeights:
    lm_head: kernels.Weight  # (V, D)
    embedding: kernels.Weight  # (V, D): the same object as lm_head when tied (rows gathered per token)
    output_norm: np.ndarray  # (D,)
    layers: list[LayerWeights]
    rope_freq_factors: np.ndarray | None = None  # (Hd/2,)
    kernels: str = "numpy"  # the path the matrices were built for: "numba" or "numpy"

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights (the embedding counted once when tied)."""
        mats = [m for layer in self.layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)]
        mats += [self.lm_head] if self.embedding is self.lm_head else [self.lm_head, self.embedding]
        return sum(m.nbytes for m in mats)


def rotate_half_order(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order that turns GGUF's adjacent-pair Q/K layout into rotate-half layout."""
    per_head = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])  # (Hd,)
    return (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)  # (heads*Hd,)


def _check_shape(f: gguf_io.GgufFile, name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if array.shape != expected:
        raise gguf_io.ModelFileError(f.path, f"tensor {name!r} has shape {array.shape}, expected {expected}")


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, F, Hd = c.hidden_size, c.ffn_size, c.head_dim
    return {
        "attn_norm": (D,), "ffn_norm": (D,),
        "attn_q": (c.n_heads * Hd, D), "attn_k": (c.n_kv_heads * Hd, D), "attn_v": (c.n_kv_heads * Hd, D),
        "attn_output": (D, c.n_heads * Hd), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F),
        "attn_q_norm": (Hd,), "attn_k_norm": (Hd,), "post_attention_norm": (D,), "post_ffw_norm": (D,),
        "attn_q_bias": (c.n_heads * Hd,), "attn_k_bias": (c.n_kv_heads * Hd,),
        "attn_v_bias": (c.n_kv_heads * Hd,),
    }  # fmt: skip


def _load_matrix(
    f: gguf_io.GgufFile, name: str, expected: tuple[int, ...], path: str
) -> kw.BlockWeight | np.ndarray:
    """A weight matrix (out, in): kept in its blocks on the numba path when its type allows, else
    dequantized to float32."""
    shape = f.tensor_shape(name)
    if shape != expected:
        raise gguf_io.ModelFileError(f.path, f"tensor {name!r} has shape {shape}, expected {expected}")
    tensor_type = f.tensor_type(name)
    if path == "numba" and tensor_type in kernels.BLOCK_TYPES and shape[1] % kw.block_row(tensor_type) == 0:
        return kw.blocks_from_gguf(tensor_type, f.load_raw(name), (shape[0], shape[1]))
    return f.load(name)


def _load_layer(f: gguf_io.GgufFile, c: ModelConfig, i: int, path: str) -> LayerWeights:
    """Read block ``i`` and lay it out for ``linear()`` (runs on a worker thread)."""
    expected = _expected_shapes(c)
    norms: dict[str, np.ndarray] = {}
    t: dict[str, kw.BlockWeight | np.ndarray] = {}
    for short, pattern in c.block_tensor_names().items():
        name = pattern.format(i=i)
        if short.endswith(("_norm", "_bias")):  # vectors
            norms[short] = f.load(name)
            _check_shape(f, name, norms[short], expected[short])
        else:
            t[short] = _load_matrix(f, name, expected[short], path)
    q, k = t["attn_q"], t["attn_k"]
    q_bias, k_bias, v_bias = norms.get("attn_q_bias"), norms.get("attn_k_bias"), norms.get("attn_v_bias")
    if c.arch.qk_rows_permuted:
        q_order = rotate_half_order(c.n_heads, c.head_dim)
        k_order = rotate_half_order(c.n_kv_heads, c.head_dim)
        q, k = kw.take_rows(q, q_order), kw.take_rows(k, k_order)
        q_bias, k_bias = (None if b is None else b[o] for b, o in ((q_bias, q_order), (k_bias, k_order)))
    q_scale = 1.0 / np.sqrt(c.head_dim)  # attention's 1/sqrt(Hd), folded into the query weights, or
    q_norm = norms.get("attn_q_norm")  # into the query's norm when q is normalised after projection
    if q_norm is not None:
        q_norm = q_norm * F32(q_scale)
    else:
        q = kw.scale_rows(q, q_scale)
        q_bias = None if q_bias is None else q_bias * F32(q_scale)
    biases = [b for b in (q_bias, k_bias, v_bias) if b is not None]
    qkv_bias = np.concatenate(biases).astype(F32) if len(biases) == 3 else None
    wqkv = kw.concat_rows([q, k, t["attn_v"]])  # ((H+2KVH)*Hd, D)
    return LayerWeights(
        attn_norm=norms["attn_norm"],
        wqkv=kw.finish(wqkv),
        wo=kw.finish(t["attn_output"]),
        ffn_norm=norms["ffn_norm"],
        w_gate_up=kw.finish(kw.concat_rows([t["ffn_gate"], t["ffn_up"]])),  # (2F, D)
        # float32: used as the transpose of the file's (D, F) rows: for this one shape OpenBLAS is faster
        # that way at batch 1-8 (measured 195 vs 320 us per call at batch 1, 469 vs 556 at 8; 12% slower
        # at 256)
        w_down=kw.finish(t["ffn_down"], transposed_view=True),
        q_norm=q_norm,
        k_norm=norms.get("attn_k_norm"),
        post_attn_norm=norms.get("post_attention_norm"),
        post_ffn_norm=norms.get("post_ffw_norm"),
        qkv_bias=qkv_bias,
    )


def _load_output(f: gguf_io.GgufFile, c: ModelConfig, path: str) -> tuple[kernels.Weight, kernels.Weight]:
    """(lm_head, embedding), both (V, D); with tied weights they are one object."""
    shape = (c.vocab_size, c.hidden_size)
    embedding = _load_matrix(f, gguf_io.TOKEN_EMBD, shape, path)
    if f.has_tensor(gguf_io.OUTPUT):  # float32 rows of the embedding stay (V, D): gathered by token id
        return kw.finish(_load_matrix(f, gguf_io.OUTPUT, shape, path)), kw.finish(embedding, True)
    tied = kw.finish(embedding)
    return tied, tied


def load_weights(f: gguf_io.GgufFile, config: ModelConfig, kernel_path: str | None = None) -> ModelWeights:
    """Read every tensor and lay it out for ``linear()`` on the kernel path chosen by
    ``kernels.backend(kernel_path)``, in this thread while the kernels load on another."""
    c = config
    path = kernels.backend(kernel_path)
    patterns = list(c.block_tensor_names().values())
    for name in (gguf_io.TOKEN_EMBD, gguf_io.OUTPUT_NORM):
        f.tensor_shape(name)  # a missing tensor fails now, before any slow work
    for i in range(c.n_layers):  # one layer at a time: a file that claims 4 million blocks fails at its last
        for pattern in patterns:
            f.tensor_shape(pattern.format(i=i))
    # Not on worker threads: glibc keeps a thread's freed intermediates in that thread's arena
    # (malloc_trim gives back only the main arena's top): 15-20 MiB resident for SmolLM2, 25-40 MiB for
    # Gemma 3, for a load ~0.1 s shorter
    with ThreadPoolExecutor(max_workers=1) as pool:
        # the kernels compile (first start) or load from the disk cache while the weights are read
        warm = pool.submit(kernels.warm_up) if path == "numba" else None
        lm_head, embedding = _load_output(f, c, path)
        layers = [_load_layer(f, c, i, path) for i in range(c.n_layers)]
        if warm is not None:
            log.info("kernels ready after %.2f s", warm.result())
    output_norm = f.load(gguf_io.OUTPUT_NORM)
    _check_shape(f, gguf_io.OUTPUT_NORM, output_norm, (c.hidden_size,))
    freqs = f.load(gguf_io.ROPE_FREQS).reshape(-1) if f.has_tensor(gguf_io.ROPE_FREQS) else None
    if freqs is not None and freqs.shape != (c.head_dim // 2,):
        raise gguf_io.ModelFileError(
            f.path, f"rope_freqs has {freqs.size} values, expected {c.head_dim // 2}"
        )
    if path == "numba":  # where this CPU's kernel stops beating BLAS on expanded tiles (at first use)
        mats = [m for layer in layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)]
        kernels.calibrate_later(layers[0].w_gate_up, [*mats, lm_head])
    kw.return_freed_memory()  # the load's unpacked intermediates, freed but kept by the C heap
    return ModelWeights(lm_head, embedding, output_norm, layers, freqs, kernels=path)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's part of a batched forward: its new token ids and its cache."""

    ids: np.ndarray  # (T,) int
    cache: KvCacheEntry


class Model:
    """Llama forward pass over one or many sequences; each sequence brings its own KV cache entry."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, path: str | None = None) -> None:
        self.config = config
        self.weights = weights
        self.path = path
        self.identity: str | None = None  # kv_disk.model_identity of its file: KV on disk must match
        self._rope = Rope(config.head_dim, config.rope_theta, config.rope_scale, weights.rope_freq_factors)
        self._local_rope = Rope(config.head_dim, config.arch.local_rope_theta, config.rope_scale, None)
        self._local = tuple(config.is_local_layer(i) for i in range(config.n_layers))  # sliding-window layers
        self._blocks: Blocks | Literal[False] | None = None  # None: not built yet; False: cannot

    @classmethod
    def from_gguf(
        cls, source: str | os.PathLike[str] | gguf_io.GgufFile, kernel_path: str | None = None
    ) -> Model:
        """Load a model; ``kernel_path`` "numba" or "numpy" (default: ``kernels.backend()``)."""
        started = time.perf_counter()
        f = source if isinstance(source, gguf_io.GgufFile) else gguf_io.GgufFile(source)
        config = gguf_io.read_config(f)
        model = cls(config, load_weights(f, config, kernel_path=kernel_path), path=str(f.path))
        model.identity = model_identity(f.path, f.data_offset)
        log.info(
            "loaded %s (%s) in %.2f s: %s kernels, %.0f MiB of weights",
            f.path.name, config.name, time.perf_counter() - started, model.weights.kernels,
            model.weights.nbytes / 2**20,
        )  # fmt: skip
        if f is not source:  # opened here: closed now, and the memory its header took given back
            del f
            kw.return_freed_memory()
        return model

    def kv_shape(self, dtype: str = "float32") -> ModelShape:
        c = self.config
        return ModelShape(c.n_layers, c.n_kv_heads, c.head_dim, dtype)

    def new_cache(self, max_tokens: int | None = None, dtype: str = "float32") -> KvCacheEntry:
        """A standalone cache for one sequence (not in any store); grows as needed up to max_tokens."""
        limit = (
            self.config.context_length if max_tokens is None else min(max_tokens, self.config.context_length)
        )
        return KvCacheEntry(self.kv_shape(dtype), limit)

    # -- public forwards -----------------------------------------------------------------------
    def forward(self, ids: Sequence[int] | np.ndarray, cache: KvCacheEntry | None = None) -> np.ndarray:
        """Logits of every new token, (T, V). With a cache, appends to it and attends to its contents."""
        ids = self._check_ids(ids)
        if cache is None:
            cache = self.new_cache(len(ids))
        return self._forward_rows([Row(ids, cache)], all_logits=True)

    def forward_last(self, rows: Sequence[Row]) -> np.ndarray:
        """Batched forward of several sequences; logits of each sequence's last new token, (B, V)."""
        checked = [Row(self._check_ids(r.ids), r.cache) for r in rows]
        return self._forward_rows(checked, all_logits=False)

    def forward_tails(
        self, rows: Sequence[Row], n_tails: Sequence[int], hidden: list[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Batched forward; the logits of each sequence's last ``n_tails[i]`` new tokens, [(n_i, V)]
        (a request verifying drafted tokens needs the logits at every drafted position). With a
        ``hidden`` list, appends the final (normed) hidden states of every new token, (N, D)."""
        checked = [Row(self._check_ids(r.ids), r.cache) for r in rows]
        lengths = np.array([len(r.ids) for r in checked])  # (B,)
        if any(not 1 <= n <= t for n, t in zip(n_tails, lengths, strict=True)):
            raise ValueError(f"n_tails {list(n_tails)} must be in 1..each row's length {lengths.tolist()}")
        ends = np.cumsum(lengths)  # (B,)
        picked = np.concatenate([np.arange(e - n, e) for e, n in zip(ends, n_tails, strict=True)])  # (P,)
        logits = self._forward_rows(checked, all_logits=picked, hidden=hidden)  # (P, V)
        return np.split(logits, np.cumsum(n_tails)[:-1])

    def _attention_plan(self, rows: Sequence[Row], starts: Sequence[int]) -> StepPlan | None:
        """On the numba path, the step's sequences the fused kernel attends (one call a layer for all
        their rows) with their caches' layout; None when it attends none (the NumPy path).

        A chunk of ``kernels.BLAS_ATTENTION_ROWS`` tokens or more after at least as many cached ones
        (a new message in a long chat) goes to ``attention()`` instead: there BLAS's register-tiled
        products beat the kernel's (measured 2x at 64-256 tokens after 2,048)."""
        if self.weights.kernels != "numba" or len({r.cache.shape.dtype for r in rows}) != 1:
            return None
        from .kernels.attention import StepPlan

        offsets = np.cumsum([0] + [len(r.ids) for r in rows])  # (B+1,) each sequence's first row
        fused = [i for i, (r, s) in enumerate(zip(rows, starts, strict=True))
                 if len(r.ids) < kernels.BLAS_ATTENTION_ROWS or s < len(r.ids)]  # fmt: skip
        if not fused:
            return None
        caches = [rows[i].cache for i in fused]
        keys, values = [c.keys(0) for c in caches], [c.values(0) for c in caches]  # (KVH, capacity, width)
        layer_bytes, dtype = [c.layer_bytes for c in caches], caches[0].shape.dtype
        lengths, first_rows = [len(rows[i].ids) for i in fused], [int(offsets[i]) for i in fused]
        plan = StepPlan(keys, values, layer_bytes, [starts[i] for i in fused], lengths, dtype,
                        kernels.threads(), first_rows)  # fmt: skip
        plan.sequences = fused
        return plan

    def _attention_rows(
        self,
        q: np.ndarray,
        rows: Sequence[Row],
        starts: Sequence[int],
        index: int,
        window: int,
        plan: StepPlan | None,
    ) -> np.ndarray:
        """Every row's attention, (N, H*Hd): the plan's sequences by the fused kernel, the others
        (all on the NumPy path) by ``attention()`` against their cache read as floats."""
        N, H, Hd = q.shape
        attn = plan.run(q, index, window) if plan is not None else np.empty((N, H * Hd), dtype=F32)
        fused = set(plan.sequences) if plan is not None else set()
        r0 = 0
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            r1, end = r0 + len(row.ids), start + len(row.ids)
            if i not in fused:
                keys, values = row.cache.read(index, end)  # (KVH, end, Hd) each
                attn[r0:r1] = attention(q[r0:r1], keys, values, start, window)
            r0 = r1
        return attn

    def _compiled_blocks(self) -> Blocks | None:
        """On the numba path, the blocks laid out for one compiled call per decode step
        (``kernels.blocks``), built at the first step; None on the NumPy path or when a matrix is not
        packed."""
        if self.weights.kernels != "numba":
            return None
        if self._blocks is None:
            from .kernels.blocks import Blocks

            c = self.config
            windows = [c.sliding_window if local else 0 for local in self._local]
            gelu = c.arch.activation == "gelu_tanh"
            shape = (c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_size)
            blocks = Blocks.of(self.weights.layers, *shape, c.rms_eps, windows, gelu)
            self._blocks = blocks if blocks is not None else False
        return self._blocks or None

    def _threads(self) -> AbstractContextManager[object]:
        """On the numba path, the kernels' thread settings for the length of one forward."""
        return kernels.compute() if self.weights.kernels == "numba" else nullcontext()

    def _check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)  # (T,)
        if arr.size == 0:
            raise ValueError("forward needs at least one token id")
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            bad = int(arr[(arr < 0) | (arr >= self.config.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return arr

    # -- the forward pass ------------------------------------------------------------------------
    def _forward_rows(
        self, rows: Sequence[Row], all_logits: bool | np.ndarray, hidden: list[np.ndarray] | None = None
    ) -> np.ndarray:
        with self._threads():
            return self._forward_rows_now(rows, all_logits, hidden)

    def _forward_rows_now(
        self, rows: Sequence[Row], all_logits: bool | np.ndarray, hidden: list[np.ndarray] | None = None
    ) -> np.ndarray:
        """``all_logits``: True for every new token's logits, False for each row's last, or the
        indices (into the concatenated new tokens) of the tokens whose logits to return."""
        starts = [r.cache.n_tokens for r in rows]
        for row, start in zip(rows, starts, strict=True):
            row.cache.ensure_capacity(start + len(row.ids))
        ids = np.concatenate([r.ids for r in rows])  # (N,)
        positions = np.concatenate([np.arange(s, s + len(r.ids)) for r, s in zip(rows, starts, strict=True)])
        if positions.max() >= self.config.context_length:
            raise ContextOverflowError(int(positions.max()) + 1, self.config.context_length, "sequence")
        ropes = {False: self._rope.tables(positions)}  # (cos, sin), (N, Hd) each
        if any(self._local):
            ropes[True] = self._local_rope.tables(positions)
        plan = self._attention_plan(rows, starts)
        x = kw.embed(self.weights.embedding, ids)  # (N, D)
        if self.config.arch.scale_embeddings:
            x *= F32(np.sqrt(self.config.hidden_size))
        blocks = self._compiled_blocks()
        if blocks is not None and plan is not None and blocks.runs(plan, len(ids), len(rows)):
            x = blocks.run(x, plan, *ropes[False], *ropes.get(True, ropes[False]))
        else:
            for i, layer in enumerate(self.weights.layers):
                x = self._block(i, layer, x, rows, starts, plan, *ropes[self._local[i]])
        for row in rows:
            row.cache.append(row.ids)
        if hidden is not None:  # every new token's final hidden state (embeddings), (N, D)
            hidden.append(rms_norm(x, self.weights.output_norm, self.config.rms_eps))
        if isinstance(all_logits, np.ndarray):
            x = x[all_logits]  # (P, D)
        elif not all_logits:
            ends = np.cumsum([len(r.ids) for r in rows]) - 1  # index of each sequence's last row
            x = x[ends]  # (B, D)
        h = rms_norm(x, self.weights.output_norm, self.config.rms_eps)
        return linear(h, self.weights.lm_head)  # (N or B, V)

    def _block(
        self,
        index: int,
        w: LayerWeights,
        x: np.ndarray,
        rows: Sequence[Row],
        starts: Sequence[int],
        plan: StepPlan | None,
        cos: np.ndarray,
        sin: np.ndarray,
    ) -> np.ndarray:
        c = self.config
        H, KVH, Hd = c.n_heads, c.n_kv_heads, c.head_dim
        N = x.shape[0]
        window = c.sliding_window if self._local[index] else 0
        qkv = linear(rms_norm(x, w.attn_norm, c.rms_eps), w.wqkv)  # (N, (H+2KVH)*Hd)
        if w.qkv_bias is not None:
            qkv += w.qkv_bias
        qk = qkv[:, : (H + KVH) * Hd].reshape(N, H + KVH, Hd)  # (N, H+KVH, Hd)
        if w.q_norm is not None and w.k_norm is not None:  # QK-norm: each head's q and k normalised
            q_normed = rms_norm(qk[:, :H].reshape(N * H, Hd), w.q_norm, c.rms_eps)  # (N*H, Hd), scaled
            k_normed = rms_norm(qk[:, H:].reshape(N * KVH, Hd), w.k_norm, c.rms_eps)  # (N*KVH, Hd)
            qk = np.concatenate([q_normed.reshape(N, H, Hd), k_normed.reshape(N, KVH, Hd)], axis=1)
        qk = apply_rope(qk, cos, sin)  # (N, H+KVH, Hd)
        q, k = qk[:, :H], qk[:, H:]  # (N, H, Hd), (N, KVH, Hd); q is pre-scaled by 1/sqrt(Hd)
        v = qkv[:, (H + KVH) * Hd :].reshape(N, KVH, Hd)  # (N, KVH, Hd)
        r0 = 0
        for row, start in zip(rows, starts, strict=True):  # the new tokens' K/V into their caches
            r1 = r0 + len(row.ids)
            row.cache.write(index, start, k[r0:r1], v[r0:r1])  # (T, KVH, Hd) each
            r0 = r1
        attn = self._attention_rows(q, rows, starts, index, window, plan)  # (N, H*Hd)
        out = linear(attn, w.wo)  # (N, D)
        if w.post_attn_norm is not None:
            out = rms_norm(out, w.post_attn_norm, c.rms_eps)
        x = x + out
        gate_up = linear(rms_norm(x, w.ffn_norm, c.rms_eps), w.w_gate_up)  # (N, 2F)
        F = c.ffn_size
        act = gelu_tanh_mul if c.arch.activation == "gelu_tanh" else silu_mul
        out = linear(act(gate_up[:, :F], gate_up[:, F:]), w.w_down)  # (N, D)
        if w.post_ffn_norm is not None:
            out = rms_norm(out, w.post_ffn_norm, c.rms_eps)
        return x + out  # (N, D)
