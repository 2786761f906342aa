"""n choices of one prompt: a choice forked from another starts once that one's prompt is computed,
and copies its K/V instead of computing them again (one prompt computation, n rows decoded together).

The scheduler asks ``may_start`` before admitting a waiting request and ``copy_from_parent`` when it
attaches its cache. Correctness never depends on the fork: a child whose parent ended (or lost its
K/V) computes its own prompt, and the copy is checked token by token against the child's prompt.
"""

from __future__ import annotations

from .errors import CacheBudgetError
from .generation import Sequence
from .kv_cache import KvCacheEntry


def may_start(seq: Sequence) -> bool:
    """A fork child waits until its parent's prompt is computed (then it copies those K/V)."""
    return seq.fork_parent is None or seq.fork_parent.prompt_ready


def copy_from_parent(seq: Sequence, entry: KvCacheEntry, n_reused: int) -> int:
    """Copy the prompt K/V a fork child shares with its parent, when longer than what it reuses
    already (the store's prefix sharing may have copied them); returns the tokens it now reuses."""
    parent = seq.fork_parent.cache if seq.fork_parent is not None else None
    if parent is None:
        return n_reused
    n = min(parent.common_prefix_length(seq.all_ids), len(seq.all_ids) - 1)
    if n <= n_reused:
        return n_reused
    try:
        entry.copy_prefix_from(parent, n)
    except CacheBudgetError:  # no room for a copy: compute the prompt instead
        return n_reused
    return n
