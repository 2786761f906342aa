"""n choices of one prompt: a choice forked from another starts once that one's prompt is computed,
and copies its K/V instead of computing them again (one prompt computation, n rows decoded together).

The scheduler asks ``may_start`` before admitting a waiting request and ``copy_from_parent`` when it
attaches its cache. A parent with children keeps the logits of its prompt's last token until it
ends, so a child copies the whole prompt's K/V and samples its first token from those logits (with
its own options and seed) without a row of its own. Correctness never depends on the fork: a child
whose parent ended (or lost its K/V) computes its own prompt, and the copy is checked token by token
against the child's prompt.
"""

from __future__ import annotations

import numpy as np

from .errors import CacheBudgetError
from .generation import GenerationRequest
from .kv_cache import KvCacheEntry


def may_start(seq: GenerationRequest) -> bool:
    """A fork child waits until its parent's prompt is computed (then it copies those K/V)."""
    return seq.fork_parent is None or seq.fork_parent.prompt_ready


def copy_from_parent(
    seq: GenerationRequest, entry: KvCacheEntry, n_reused: int
) -> tuple[int, np.ndarray | None]:
    """Copy the prompt K/V a fork child shares with its parent, when longer than what it reuses
    already (the store's prefix sharing may have copied them): (tokens it now reuses, the logits its
    first token is sampled from). When the parent kept the logits of its prompt's last token, the
    whole prompt is copied and the child computes nothing of it; else all but the last token."""
    parent = seq.fork_parent
    cache = parent.cache if parent is not None else None
    if parent is None or cache is None:
        return n_reused, None
    logits, n_all = parent.prompt_logits, len(seq.all_ids)
    common = cache.common_prefix_length(seq.all_ids)
    n = n_all if logits is not None and common >= n_all == seq.n_prompt else min(common, n_all - 1)
    if n <= n_reused:
        return n_reused, None
    try:
        entry.copy_prefix_from(cache, n)
    except CacheBudgetError:  # no room for a copy: compute the prompt instead
        return n_reused, None
    return n, logits if n == n_all else None
