"""The step's side of prompt-lookup drafting (``speculative.py`` decides what to draft).

``add_drafts`` appends the drafter's guesses to the decode rows of the requests it picks, where their
K/V have room (a draft never preempts anyone and a constrained request drafts only what its grammar
allows); after the forward, ``verify`` keeps the drafts the request's own sampling agrees with and
forgets the K/V of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from .generation import GenerationEvent
from .metrics import InMemoryRuntimeMetrics
from .scheduler import Row, RunningRequest
from .speculative import Draft, Drafter

log = logging.getLogger(__name__)


def add_drafts(
    rows: list[Row],
    drafter: Drafter,
    draft_tokens: int,
    draft_ngram_max: int,
    prefill_only: bool,
    context_length: int,
    on_failure: Callable[[Exception], None],
) -> list[Row]:
    """The rows with drafted tokens appended to those the drafter picks (``draft_tokens`` at most per
    request); without drafts when drafting fails (``on_failure`` hears why: drafting only saves time)."""
    candidates = []
    for run, _ in rows:
        seq = run.seq
        if seq.in_prefill or run.recompute or seq.cache is None or not seq.options.allow_drafting:
            continue
        room = min(
            seq.options.max_new_tokens - len(seq.generated) - 1,  # the drafts and the token after them
            min(seq.cache.max_tokens, context_length) - len(seq.all_ids),
        )
        if room > 0:
            candidates.append((seq.request_id, seq.all_ids, room))
    if prefill_only:  # each decode row is a forward of its own
        groups = [([c], 1, 1) for c in candidates]
    else:
        n_decode = sum(1 for run, _ in rows if not run.seq.in_prefill)
        groups = [(candidates, sum(len(chunk) for _, chunk in rows), n_decode)] if candidates else []
    drafts: dict[int, Draft] = {}
    try:
        for group, n_rows, n_decode in groups:
            drafts.update(drafter.propose(group, n_rows, n_decode, draft_tokens, draft_ngram_max))
    except Exception as exc:  # this step runs without drafts
        on_failure(exc)
        return rows
    return [_with_draft(run, chunk, drafts.get(run.seq.request_id)) for run, chunk in rows]


def _with_draft(run: RunningRequest, chunk: np.ndarray, draft: Draft | None) -> Row:
    entry = run.seq.cache
    if draft is not None:  # a constrained request drafts only what its grammar allows
        n_valid = run.seq.valid_draft_length(draft.token_ids)
        draft = Draft(draft.token_ids[:n_valid], draft.ngram, draft.start) if n_valid else None
    if draft is None or entry is None:
        return run, chunk
    try:
        entry.ensure_capacity(entry.n_tokens + len(chunk) + len(draft.token_ids))
    except Exception:  # no room (or a fault): this row runs without its draft; its own chunk decides
        return run, chunk
    run.draft = draft
    return run, np.concatenate([chunk, np.asarray(draft.token_ids, dtype=np.int64)])


def verify(
    run: RunningRequest, logits: np.ndarray, now: float, drafter: Drafter, metrics: InMemoryRuntimeMetrics
) -> GenerationEvent:
    """Take the drafts the request's sampling agrees with; forget the K/V of the others. Returns the
    request's event for this step."""
    seq, draft = run.seq, run.draft
    assert draft is not None and seq.cache is not None
    run.draft = None
    try:
        event, n_taken = seq.on_draft_logits(logits, draft.token_ids, now)
    except Exception as exc:
        log.exception("sampling failed for request %d", seq.request_id)
        event, n_taken = seq.finish("error", now, error=f"sampling failed: {exc}"), 0
    seq.mark_computed(1 + n_taken)  # the newest token and the drafts taken; the rest is undone
    seq.cache.trim(seq.n_computed)
    drafter.record(seq.request_id, draft, n_taken)
    metrics.record_sampled(len(draft.token_ids), n_taken)
    return event
