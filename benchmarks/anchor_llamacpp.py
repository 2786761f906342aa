"""llama.cpp's side of the figures ``anchor.py`` compares (llama-cpp-python's low-level API: the C
functions, no Python sampling in the way); each ``measure_<name>(spec)`` runs in a child process of
its own (``anchor.py --child llama.cpp NAME``) with the user's environment.

llama.cpp runs with its own defaults (``llama_context_default_params``: float16 K/V, flash attention
as llama.cpp chooses) except the thread count (``threads``, the same as ours), the context size each
figure needs and, where a spec asks, the K/V type (``kv_dtype``) or flash attention (``flash_attn``:
-1 auto, 0 off, 1 on; at long contexts llama.cpp's CPU flash attention can be the slower choice, so
that figure measures both). Decoding is greedy: the argmax of
the logits llama.cpp returns.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np

GGML_TYPES = {"float32": 0, "float16": 1, "q8_0": 8}


class Context:
    """One model and context: ``decode`` a batch of (token, position, sequence, logits?) entries,
    ``logits(i)`` of batch entry i, ``clear()`` the K/V, ``trim(seq, n)`` back to n positions."""

    def __init__(self, spec: dict[str, Any], n_ctx: int, n_seq: int = 1, n_batch: int = 512) -> None:
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, user_data: None)  # kept alive
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        self.extra_bufts = bool(spec.get("extra_bufts", True))  # see anchor.llama_cpp_defaults
        model_params.use_extra_bufts = self.extra_bufts
        self.model = lc.llama_model_load_from_file(spec["model"].encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {spec['model']}")
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_seq_max = n_ctx, n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = int(spec["threads"])
        if spec.get("kv_dtype"):
            params.type_k = params.type_v = GGML_TYPES[spec["kv_dtype"]]
        if "flash_attn" in spec:  # -1 auto (llama.cpp's default), 0 off, 1 on
            if hasattr(params, "flash_attn_type"):
                params.flash_attn_type = int(spec["flash_attn"])
            else:  # older llama.cpp: a bool
                params.flash_attn = int(spec["flash_attn"]) == 1
        self.params = params
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_batch, 0, n_seq)
        self.n_batch = n_batch

    def settings(self) -> dict[str, Any]:
        """What llama.cpp ran with (reported beside its figures)."""
        p = self.params
        flash = getattr(p, "flash_attn_type", getattr(p, "flash_attn", None))
        return {"flash_attn": int(flash) if flash is not None else None, "type_k": int(p.type_k),
                "n_threads": int(p.n_threads), "extra_bufts": bool(self.extra_bufts)}  # fmt: skip

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, (token, pos, seq, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, want
                b.seq_id[i][0] = seq
            if self.lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")

    def argmax(self, i: int) -> int:
        """Greedy token from batch entry ``i``'s logits (-1: the last entry of the last decode)."""
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def _memory(self) -> Any:
        return self.lc.llama_get_memory(self.ctx)

    def clear(self) -> None:
        self.lc.llama_memory_clear(self._memory(), True)

    def trim(self, seq: int, n: int) -> None:
        if not self.lc.llama_memory_seq_rm(self._memory(), seq, n, -1):
            raise RuntimeError("llama.cpp could not trim the sequence")

    def prefill(self, ids: list[int], seq: int = 0) -> int:
        """Feed ``ids`` at positions 0.. (in n_batch chunks); the greedy next token."""
        self.decode([(t, p, seq, p == len(ids) - 1) for p, t in enumerate(ids)])
        return self.argmax(-1)

    def greedy(self, token: int, position: int, n_new: int) -> tuple[list[int], float]:
        """``n_new`` single-token decode steps from ``token`` at ``position``; (tokens, seconds)."""
        tokens = []
        started = time.perf_counter()
        for i in range(n_new):
            self.decode([(token, position + i, 0, True)])
            token = self.argmax(-1)
            tokens.append(token)
        return tokens, time.perf_counter() - started

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def measure_accuracy(spec: dict[str, Any]) -> dict[str, Any]:
    """``anchor_smallmind.measure_accuracy``'s figure for llama.cpp: each reference prompt one token a
    decode call, the last logits against the float32 reference's."""
    from anchor import reference

    prompts, logits = reference(spec)
    c = Context(spec, n_ctx=512)
    worst = 0.0
    for p in prompts:
        c.clear()
        for position, token in enumerate(p["input_ids"]):
            c.decode([(token, position, 0, True)])
        last = np.ctypeslib.as_array(c.lc.llama_get_logits_ith(c.ctx, -1), shape=(c.n_vocab,)).copy()
        ref = logits[p["key"]]
        worst = max(worst, float(np.abs(last - ref).max() / np.abs(ref).max()))
    return {"max_rel_diff": worst, **c.settings()}


def measure_decode(spec: dict[str, Any]) -> dict[str, Any]:
    ids, n_new = list(spec["prompt_ids"]), int(spec.get("n_new", 128))
    c = Context(spec, n_ctx=max(512, len(ids) + n_new + 8))
    best, tokens = 0.0, []
    for rep in range(1 + int(spec.get("reps", 2))):
        c.clear()
        first = c.prefill(ids)
        out, seconds = c.greedy(first, len(ids), 8 if rep == 0 else n_new)
        if rep:
            best, tokens = max(best, n_new / seconds), [first, *out[:-1]]
    return {"tokens_per_s": best, "token_ids": tokens, **c.settings()}


def measure_prefill(spec: dict[str, Any]) -> dict[str, Any]:
    ids = list(spec["prompt_ids"])
    c = Context(spec, n_ctx=max(512, len(ids) + 8), n_batch=max(512, len(ids)))
    best = 0.0
    for rep in range(1 + int(spec.get("reps", 3))):
        c.clear()
        started = time.perf_counter()
        c.prefill(ids)
        if rep:
            best = max(best, len(ids) / (time.perf_counter() - started))
    return {"tokens_per_s": best, **c.settings()}


def measure_long_decode(spec: dict[str, Any]) -> dict[str, Any]:
    ids, n_new = list(spec["prompt_ids"]), int(spec.get("n_new", 16))
    c = Context(spec, n_ctx=len(ids) + n_new + 64)
    started = time.perf_counter()
    first = c.prefill(ids)
    prefill_s = time.perf_counter() - started
    best, tokens = 0.0, []
    for rep in range(1 + int(spec.get("reps", 3))):
        c.trim(0, len(ids))
        out, seconds = c.greedy(first, len(ids), 2 if rep == 0 else n_new)
        if rep:
            best, tokens = max(best, n_new / seconds), [first, *out[:-1]]
    return {"tokens_per_s": best, "prefill_tokens_per_s": len(ids) / prefill_s, "token_ids": tokens,
            **c.settings()}  # fmt: skip


def _batched_once(c: Context, prompts: list[list[int]], n_new: int) -> tuple[float, list[list[int]]]:
    """Every prompt in one llama_decode, then one token of every sequence per llama_decode."""
    c.clear()
    n = len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    started = time.perf_counter()
    c.decode([(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)])
    rows = [int(i) for i in np.cumsum([len(ids) for ids in prompts]) - 1]  # each sequence's logits
    for step in range(n_new):
        tokens = [c.argmax(i) for i in rows]
        for s, t in enumerate(tokens):
            out[s].append(t)
        if step + 1 < n_new:
            c.decode([(t, len(prompts[s]) + step, s, True) for s, t in enumerate(tokens)])
            rows = list(range(n))
    return n * n_new / (time.perf_counter() - started), out


def measure_batched(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's own batched decoding (several sequences per ``llama_decode``), greedy; aggregate
    tokens/s from the first prompt token to the last new token."""
    prompts, n_new = [list(p) for p in spec["prompt_ids"]], int(spec["n_new"])
    longest = max(map(len, prompts)) + n_new + 8
    c = Context(spec, n_ctx=longest * len(prompts), n_seq=len(prompts),
                n_batch=max(512, sum(map(len, prompts))))  # fmt: skip
    _batched_once(c, prompts[:2], 4)  # warm-up
    runs = [_batched_once(c, prompts, n_new) for _ in range(int(spec.get("reps", 1)))]
    tps, tokens = max(runs, key=lambda r: r[0])
    return {"tokens_per_s": tps, "token_ids": tokens, **c.settings()}


def measure_sequential(spec: dict[str, Any]) -> dict[str, Any]:
    """The same requests one after another, each with its own prefill."""
    prompts, n_new = [list(p) for p in spec["prompt_ids"]], int(spec["n_new"])
    c = Context(spec, n_ctx=max(map(len, prompts)) + n_new + 8)
    c.prefill(prompts[0][:8])  # warm-up
    started = time.perf_counter()
    tokens = []
    for ids in prompts:
        c.clear()
        first = c.prefill(ids)
        out, _ = c.greedy(first, len(ids), n_new - 1)
        tokens.append([first, *out])
    return {"tokens_per_s": len(prompts) * n_new / (time.perf_counter() - started), "token_ids": tokens,
            **c.settings()}  # fmt: skip


def measure_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """One prompt, ``n_new`` tokens: end-to-end and decode-only tokens/s (as the engine reports)."""
    ids, n_new = list(spec["prompt_ids"][0]), int(spec["n_new"])
    c = Context(spec, n_ctx=len(ids) + n_new + 8)
    c.prefill(ids[:8])  # warm-up
    c.clear()
    started = time.perf_counter()
    first = c.prefill(ids)
    decode_started = time.perf_counter()
    c.greedy(first, len(ids), n_new - 1)
    return {"tokens_per_s": n_new / (time.perf_counter() - started),
            "decode_tokens_per_s": (n_new - 1) / (time.perf_counter() - decode_started), **c.settings()}  # fmt: skip


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Resident memory after loading the model and creating a 512-token context (llama.cpp's own
    default size), and over the process's start."""
    import os

    from anchor import rss_mib

    start = float(spec["rss_start_mib"])
    c = Context(spec, n_ctx=512)
    after = rss_mib()
    return {"rss_mib": after, "over_start_mib": after - start, "rss_start_mib": start,
            "file_mib": os.path.getsize(spec["model"]) / 2**20, **c.settings()}  # fmt: skip


def measure_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model and decode a few tokens: does llama.cpp run on this CPU with these settings?"""
    c = Context(spec, n_ctx=64)
    first = c.prefill([1, 2, 3, 4])
    c.greedy(first, 4, 2)
    return {"ok": True, **c.settings()}
