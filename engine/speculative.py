"""Prompt-lookup drafting: guess a request's next tokens from its own context, for free.

Chat text repeats itself: a code edit copies most of the code, an answer quotes the prompt, a list
goes on in the same shape. When the last few tokens of a request's context (prompt + reply so far)
occurred earlier, the tokens that followed them then are a good guess for what follows now. The
scheduler feeds the guesses ("drafts") as extra rows after the request's newest token; one forward
gives the logits at every drafted position, and the request keeps the longest prefix of drafts its
own sampling agrees with, plus the token sampled where it first disagrees. The sampling is the one
``sample_token`` call a step without drafts would make, with the same RNG draw (see
``GenerationRequest.on_draft_logits``), so a draft token is accepted with exactly the model's probability for
it and the output is token for token what it would be without drafting, greedy or seeded.

Whether drafting pays depends on what the extra rows cost. The kernels read each weight once for a
group of 1, 2, 4 or 8 rows, so a step of 2 or 4 rows costs little more than one of 1, and 8 rows
cost about twice 4 (``ROW_COST``, measured on SmolLM2). ``Drafter.propose`` weighs, per step, the
tokens the drafts are expected to add (each request's recent acceptance rate for the n-gram size
that matched) against the time the extra rows add, and drafts only where that raises the step's
expected tokens per second. So drafting stops by itself for a request whose guesses keep failing
(until its estimate drifts back and it probes again), and for the whole step when the batch already
fills the cheap row groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# Decode-step time for a group of rows relative to one row, from SmolLM2-135M Q4_1 on the numba
# kernels (15.8 / 17.6 / 26.9 / 54.1 ms for 1 / 2 / 4 / 8 rows): rows are padded to these groups.
ROW_COST = {1: 1.0, 2: 1.11, 4: 1.70, 8: 3.42}
PRIOR_ACCEPTANCE = 0.5  # what a request's first guesses are expected to score, per drafted token
PRIOR_WEIGHT = 1.0  # ... worth one observed draft token
DECAY = 0.9  # older observations fade: "recent" acceptance is about the last ten drafted tokens
IDLE_DECAY = 0.98  # a request not drafting for low acceptance drifts back to the prior, then probes
MIN_GAIN = 1.03  # draft only where the step's expected tokens per unit of time rise by 3 %
# A request verifying drafts is a row of several positions: its attention takes the multi-position
# path (causal mask, one softmax per head over the positions) instead of the one-token decode path,
# which ROW_COST (rows of separate requests) does not include. bench_speculative.py measured one
# sequence's step of 2 positions at 1.29-1.56x a 1-position step where ROW_COST says 1.11; without
# this term a request whose drafts were accepted 17 % of the time kept drafting at a loss (open chat
# prompts at 0.89-0.93x).
DRAFT_OVERHEAD = 0.25  # per drafting request, in one-row steps


def step_cost(n_rows: int) -> float:
    """Relative time of a forward of ``n_rows`` decode rows: the kernels pad rows to a group of 1, 2,
    4 or 8 and beyond 8 repeat the group of 8."""
    if n_rows <= 0:
        return 0.0
    group = 1 if n_rows == 1 else 2 if n_rows == 2 else 4 if n_rows <= 4 else 8
    return ROW_COST[group] * math.ceil(n_rows / group)


class NgramIndex:
    """Where each n-gram (n = 1 .. max_n) of a token list last occurred, updated as the list grows.

    ``lookup`` finds the longest n-gram at the end of the list that occurred before and returns the
    tokens that followed its latest earlier occurrence."""

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self._next: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n)]  # n-1 -> gram -> next
        self._n_indexed = 0  # n-grams ending before this position are indexed

    def update(self, ids: Sequence[int]) -> None:
        """Index the n-grams that end before the last token (those that have a continuation)."""
        for end in range(self._n_indexed, len(ids) - 1):  # the gram ids[end - n + 1 : end + 1]
            for n in range(1, min(self.max_n, end + 1) + 1):
                self._next[n - 1][tuple(ids[end - n + 1 : end + 1])] = end + 1
        self._n_indexed = max(self._n_indexed, len(ids) - 1)

    def lookup(self, ids: Sequence[int], max_tokens: int) -> tuple[int, list[int]]:
        """(n, up to ``max_tokens`` ids that followed the latest earlier occurrence of the last n ids),
        for the largest n that occurred before; (0, []) when none did."""
        n, start = self.find(ids)
        return n, list(ids[start : start + max_tokens]) if n else []

    def find(self, ids: Sequence[int]) -> tuple[int, int]:
        """(n, where the continuation starts) for the largest n whose last-n gram occurred before;
        (0, -1) when none did."""
        self.update(ids)
        for n in range(min(self.max_n, len(ids)), 0, -1):
            start = self._next[n - 1].get(tuple(ids[len(ids) - n :]))
            if start is not None:
                return n, start
        return 0, -1


@dataclass(slots=True)
class _RequestState:
    index: NgramIndex
    follow: int = -1  # where the text a request was copying continues, if it still is
    accepted: list[float] = field(default_factory=list)  # per n-gram size, decayed counts
    tried: list[float] = field(default_factory=list)

    def acceptance(self, n: int) -> float:
        """Estimated chance that a draft token from an n-gram match is accepted."""
        return (self.accepted[n - 1] + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.tried[n - 1] + PRIOR_WEIGHT)


@dataclass(frozen=True, slots=True)
class Draft:
    """Tokens proposed for one request, and the n-gram size whose match proposed them."""

    token_ids: list[int]
    ngram: int
    start: int = -1  # where in the request's context the drafted tokens were copied from


class Drafter:
    """Per-request n-gram indexes and acceptance estimates; the scheduler's one entry point is
    ``propose`` (before the forward) and ``record`` (after it). ``adaptive=False`` drafts every match
    regardless of cost or acceptance (tests use it to exercise verification)."""

    def __init__(self, adaptive: bool = True) -> None:
        self.adaptive = adaptive
        self._states: dict[int, _RequestState] = {}

    def propose(
        self,
        requests: Sequence[tuple[int, Sequence[int], int]],
        n_rows: int,
        n_decode: int,
        max_draft: int,
        max_ngram: int,
    ) -> dict[int, Draft]:
        """Drafts for some of ``requests`` ((request id, its ids so far, most tokens it may draft)),
        in a step that already has ``n_rows`` rows of which ``n_decode`` produce a token."""
        found: list[tuple[int, Draft, float]] = []
        for request_id, ids, limit in requests:
            state = self._state(request_id, max_ngram)
            n, start = self._copying(state, ids)
            if not n:
                n, start = state.index.find(ids)
            tokens = list(ids[start : start + min(max_draft, limit)]) if n else []
            if tokens:
                found.append((request_id, Draft(tokens, n, start), state.acceptance(n)))
        if not self.adaptive:
            return {request_id: draft for request_id, draft, _ in found}
        lengths = self._choose_lengths(found, n_rows, n_decode)
        drafts = {}
        for request_id, draft, _ in found:
            n_tokens = lengths.get(request_id, 0)
            if n_tokens:
                drafts[request_id] = Draft(draft.token_ids[:n_tokens], draft.ngram, draft.start)
            else:  # not worth it now: let its estimate drift back so that it probes again later
                state = self._states[request_id]
                state.accepted[draft.ngram - 1] *= IDLE_DECAY
                state.tried[draft.ngram - 1] *= IDLE_DECAY
        return drafts

    @staticmethod
    def _choose_lengths(
        found: Sequence[tuple[int, Draft, float]], n_rows: int, n_decode: int
    ) -> dict[int, int]:
        """How many of each request's drafts to verify: the j-th draft of a request adds a token with
        probability acceptance**j; add rows, most likely first, while that raises expected tokens per
        unit of step time (and by at least MIN_GAIN over drafting nothing); each drafting request
        adds DRAFT_OVERHEAD to the step's time."""
        gains = sorted(
            ((acceptance**j, request_id) for request_id, draft, acceptance in found
             for j in range(1, len(draft.token_ids) + 1)),
            key=lambda item: -item[0],
        )  # fmt: skip
        base = n_decode / step_cost(n_rows)
        best_rate, best_n, expected = base * MIN_GAIN, 0, float(n_decode)
        drafting: set[int] = set()
        for n_extra, (gain, request_id) in enumerate(gains, start=1):
            expected += gain
            drafting.add(request_id)
            rate = expected / (step_cost(n_rows + n_extra) + DRAFT_OVERHEAD * len(drafting))
            if rate > best_rate:
                best_rate, best_n = rate, n_extra
        lengths: dict[int, int] = {}
        for _, request_id in gains[:best_n]:
            lengths[request_id] = lengths.get(request_id, 0) + 1
        return lengths

    def record(self, request_id: int, draft: Draft, n_accepted: int) -> None:
        """A verified draft: ``n_accepted`` of its tokens were taken."""
        state = self._states.get(request_id)
        if state is None:
            return
        i = draft.ngram - 1
        failed = 1.0 if n_accepted < len(draft.token_ids) else 0.0
        state.accepted[i] = state.accepted[i] * DECAY + n_accepted
        state.tried[i] = state.tried[i] * DECAY + n_accepted + failed
        state.follow = draft.start + n_accepted + 1  # if the model's next token went on copying too

    @staticmethod
    def _copying(state: _RequestState, ids: Sequence[int]) -> tuple[int, int]:
        """While a reply copies a passage, keep drafting from that passage rather than from the latest
        occurrence of the last few tokens (which, in code, is often another line that starts alike):
        (n, start) when the last n tokens still equal those before the followed position."""
        follow, n = state.follow, state.index.max_n
        if not n < follow < len(ids) or list(ids[follow - n : follow]) != list(ids[len(ids) - n :]):
            return 0, -1
        return n, follow

    def forget(self, request_id: int) -> None:
        self._states.pop(request_id, None)

    def _state(self, request_id: int, max_ngram: int) -> _RequestState:
        state = self._states.get(request_id)
        if state is None or state.index.max_n != max_ngram:  # new, or the setting changed: re-index
            state = _RequestState(NgramIndex(max_ngram), accepted=[0.0] * max_ngram, tried=[0.0] * max_ngram)
            self._states[request_id] = state
        return state
