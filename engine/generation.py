"""One request's generation state: what is computed, what comes next, what was said, when it ends.

Every request has a "computed" and a "total" token count (vLLM's rule): ``all_ids`` holds the
prompt and every sampled token; ``n_computed`` of them have K/V in the request's cache entry. A
scheduling step closes part of the gap (a prefill chunk, or the one newest token), the model returns
the logits of the last token fed, and ``on_logits`` samples, detokenizes, checks the stop rules and
produces the events. The scheduler decides who runs; this class decides nothing about batching.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .constraints import TokenMatcher
from .kv_cache import KvCacheEntry
from .logit_processing import LogitProcessor
from .logprobs import TokenLogprob, token_logprob
from .sampling import InferenceOptions, StopStringMatcher, make_rng, sample_token

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "timeout", "cancelled", "error"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "timeout", "cancelled", "error")

_request_ids = itertools.count(1)


def new_request_id() -> int:
    """A request id no other request of this process has (handles made before their engine's)."""
    return next(_request_ids)


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What a finished request produced, and how fast."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    reused_tokens: int = 0
    context_trimmed: bool = False
    ttft_ms: float | None = None  # submit -> first token
    decode_tokens_per_s: float = 0.0  # after the first token
    total_ms: float = 0.0
    queue_wait_ms: float = 0.0
    error: str | None = None
    completion_tokens: int | None = None  # a remote server's count (its token ids are not sent)
    decode_steps: int = 0  # steps that sampled (with drafting, one step may take several tokens)
    draft_tokens: int = 0  # drafted tokens verified, and how many of them were accepted
    accepted_draft_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per generated token, with options.logprobs
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # one per prompt token (None for the first)
    embedding: np.ndarray | None = field(default=None, repr=False)  # an embedding request's vector (D,)
    constraint_mask_ms: float = 0.0  # time spent computing and applying the constraint's masks

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids) if self.completion_tokens is None else self.completion_tokens

    @property
    def tokens_per_step(self) -> float:
        """Tokens taken per sampling step: 1.0 without drafting (the mean accepted length)."""
        return 1.0 + self.accepted_draft_tokens / self.decode_steps if self.decode_steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain values (log-probabilities as dicts, the embedding as a list)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["logprobs"] = [_logprob_dict(lp) for lp in self.logprobs]
        out["prompt_logprobs"] = [None if lp is None else _logprob_dict(lp) for lp in self.prompt_logprobs]
        out["embedding"] = None if self.embedding is None else [float(v) for v in self.embedding]
        return out


def _logprob_dict(entry: TokenLogprob) -> dict[str, Any]:
    return {"token_id": entry.token_id, "logprob": entry.logprob, "top": [list(pair) for pair in entry.top]}


EventKind = Literal["prefill", "token", "waiting", "loading", "done"]


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """A step's news for one request: prompt progress, new text, "waiting" (for KV memory: queued,
    or preempted and requeued; its next event says it runs again), "loading" (its model is being
    loaded: ``model_pool.py``; ``text`` is empty), or the end (``result`` set)."""

    request_id: int
    kind: EventKind
    text: str = ""
    token_ids: tuple[int, ...] = ()
    prompt_done: int = 0  # prompt tokens computed so far (prefill progress)
    prompt_total: int = 0
    result: GenerationResult | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # for the generated tokens of this event (options.logprobs)


class ResultHandle:
    """The caller's side of a request, local or remote: cancel it, wait for its result (thread-safe).

    Engines subclass it with their own ``cancel``; the engine delivers events with ``_deliver``, the
    last one carrying the ``GenerationResult``."""

    def __init__(
        self, request_id: int, session_id: object, on_event: Callable[[GenerationEvent], object] | None
    ) -> None:
        self.request_id = request_id
        self.session_id = session_id
        self._on_event = on_event
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._result: GenerationResult | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        assert self._result is not None
        return self._result

    def _deliver(self, event: GenerationEvent) -> None:
        if event.result is not None:
            self._result = event.result
        try:
            if self._on_event is not None:
                self._on_event(event)
        except Exception:  # a caller's callback must not break the engine
            log.exception("event callback of request %d failed", self.request_id)
        finally:
            if event.result is not None:
                self._done.set()


@dataclass(eq=False)
class GenerationRequest:
    """A request's state inside the engine."""

    prompt_ids: list[int]
    options: InferenceOptions
    decoder: Any  # the tokenizer's stream decoder: feed(id) -> str, flush() -> str
    eos_ids: frozenset[int]
    request_id: int = field(default_factory=lambda: next(_request_ids))
    session_id: object = None
    cache: KvCacheEntry | None = None
    n_reused: int = 0
    context_trimmed: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    matcher: TokenMatcher | None = None  # the constraint's grammar state (engine/constraints.py)
    fork_parent: GenerationRequest | None = None  # n > 1: the request whose prompt K/V this one copies

    def __post_init__(self) -> None:
        self.all_ids: list[int] = list(self.prompt_ids)
        self.n_computed = 0
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self.rng: np.random.Generator = make_rng(self.options)
        self.stops = StopStringMatcher(self.options.stop)
        self.started_at: float | None = None  # first scheduled (end of queue wait)
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.result: GenerationResult | None = None
        self.n_preemptions = 0
        self.waiting_for_memory = False  # queued because the KV budget has no room for it now
        self.n_decode_steps = 0  # steps that sampled for this request (several tokens with drafts)
        self.n_draft_tokens = 0  # drafted tokens verified, and how many of them were taken
        self.n_accepted_tokens = 0
        needed = LogitProcessor.needed(self.options, self.matcher)
        self.processor = LogitProcessor(self.options, self.matcher) if needed else None
        self.keeps_prompt_logits = False  # it has fork children: keep the logits of its last prompt token
        self.prompt_logits: np.ndarray | None = None  # ... here, until it ends (engine/forks.py)
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []
        if self.options.prompt_logprobs is not None:
            self.prompt_logprobs.append(None)  # the first token has nothing before it

    # -- scheduling view ---------------------------------------------------------------------
    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        """More than the newest token left to compute: the prompt, or prompt + text after a preemption."""
        return self.n_computed < self.n_prompt or self.n_computed < len(self.all_ids) - 1

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def needs_every_position(self) -> bool:
        """Its prompt's positions must all be computed by its own rows (no K/V reused from a cache):
        it wants their logits (prompt_logprobs) or hidden states (an embedding)."""
        return self.options.prompt_logprobs is not None

    @property
    def prompt_ready(self) -> bool:
        """Its prompt's K/V are computed (a fork child may copy them now) or it has ended."""
        return self.finished or self.n_computed >= self.n_prompt

    def reset_computed(self, n_computed: int) -> None:
        """Start computing from ``n_computed`` (what the cache holds after ``prepare``)."""
        self.n_computed = n_computed

    def preempt(self) -> None:
        """Its K/V were given up: it resumes later from ``all_ids`` (prompt + text so far), with the
        sampling state (RNG, decoder, stop matcher) kept, so greedy text is the same as uninterrupted."""
        self.cache = None
        self.n_computed = 0
        self.n_preemptions += 1

    def next_chunk(self, max_prefill_tokens: int) -> np.ndarray:
        """The token ids to feed next: a prefill chunk, or the newest sampled token."""
        end = (
            min(len(self.all_ids), self.n_computed + max_prefill_tokens)
            if self.in_prefill
            else len(self.all_ids)
        )
        return np.asarray(self.all_ids[self.n_computed : end], dtype=np.int64)

    def mark_computed(self, n_tokens: int) -> None:
        self.n_computed += n_tokens

    # -- after the forward -----------------------------------------------------------------------
    def on_logits(self, logits: np.ndarray, now: float) -> GenerationEvent:
        """Handle the logits of the last token fed: a prefill progress event, or sample a token.
        (T, V) logits are those of every position of the chunk (``needs_every_position``)."""
        if logits.ndim == 2:
            self._record_prompt_logprobs(logits)
            logits = logits[-1]
        if self.n_computed < len(self.all_ids):  # a chunk before the newest token: its logits are unused
            return GenerationEvent(
                self.request_id, "prefill", prompt_done=self.n_computed, prompt_total=len(self.all_ids)
            )
        self.n_decode_steps += 1
        if self.keeps_prompt_logits and not self.generated and self.prompt_logits is None:
            self.prompt_logits = np.array(logits)  # its fork children's first tokens come from these
        token, logprob = self._sample(logits)
        return self._take(token, now, logprob)

    def _sample(self, logits: np.ndarray) -> tuple[int, TokenLogprob | None]:
        """The next token (and its log-probability when asked for)."""
        if self.processor is None:  # the classic options only: the logits go to sample_token untouched
            return sample_token(logits, self.options, self.rng, self.all_ids), None
        x = self.processor.process(logits, self.all_ids, self.generated)  # (V,) penalized, biased, masked
        token = sample_token(x, self.options, self.rng)  # the repetition penalty is already in x
        return token, self.processor.logprob(x, token)

    def _record_prompt_logprobs(self, logits: np.ndarray) -> None:
        """Rows (T, V) of the positions just computed: each gives the next prompt token's logprob."""
        k = self.options.prompt_logprobs
        first = self.n_computed - len(logits)  # position of the chunk's first row
        for offset, row in enumerate(logits):
            target = first + offset + 1  # the token this row predicts
            if k is not None and target == len(self.prompt_logprobs) and target < self.n_prompt:
                self.prompt_logprobs.append(token_logprob(row, self.prompt_ids[target], k))

    def on_draft_logits(
        self, logits: np.ndarray, draft_ids: Sequence[int], now: float
    ) -> tuple[GenerationEvent, int]:
        """Handle the logits (1 + k, V) of the newest token and of k drafted tokens fed after it:
        (one event for every token taken, how many drafts were taken).

        Each position is sampled exactly as a step without drafts would sample it (the same
        ``sample_token`` call, the same RNG draw); the draft at that position is taken when the sample
        equals it, and the first sample that differs ends the step. So a draft is accepted with the
        model's own probability for it, a rejection yields a sample of the rest of the distribution,
        and the tokens are those of decoding without drafts (greedy and seeded alike)."""
        self.n_decode_steps += 1
        ids: list[int] = []
        texts: list[str] = []
        n_taken = 0
        logprobs: list[TokenLogprob] = []
        for position, row in enumerate(logits):
            token, logprob = self._sample(row)
            event = self._take(token, now, logprob)
            ids.extend(event.token_ids)
            texts.append(event.text)
            logprobs.extend(event.logprobs)
            if event.result is not None or position >= len(draft_ids) or token != draft_ids[position]:
                break
            n_taken += 1
        self.n_draft_tokens += len(draft_ids)
        self.n_accepted_tokens += n_taken
        text = "".join(texts)
        return dataclasses.replace(event, text=text, token_ids=tuple(ids), logprobs=tuple(logprobs)), n_taken

    def valid_draft_length(self, draft_ids: Sequence[int]) -> int:
        """How many drafted tokens could be taken at all: those the constraint allows in a row."""
        return len(draft_ids) if self.matcher is None else self.matcher.valid_prefix(draft_ids)

    def _take(self, token: int, now: float, logprob: TokenLogprob | None = None) -> GenerationEvent:
        """A sampled token: append it, detokenize, apply the stop rules."""
        if self.first_token_at is None:
            self.first_token_at = now
        if token in self.eos_ids and (self.options.stop_on_eos or self.matcher is not None):
            return self.finish("stop", now, sampled=(token,))
        if self.matcher is not None and not self.matcher.accept(token):
            raise RuntimeError(f"the constraint refused token {token}: {self.matcher.error}")
        self.generated.append(token)
        self.all_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        text, stopped = self.stops.feed(self.decoder.feed(token))
        self.pieces.append(text)
        lps = (logprob,) if logprob is not None else ()
        if stopped or (self.matcher is not None and self.matcher.finished):  # the grammar allows only EOS
            return self.finish("stop", now, sampled=(token,), text=text, logprobs=lps)
        if len(self.generated) >= self.options.max_new_tokens:
            return self.finish("length", now, sampled=(token,), text=text, logprobs=lps)
        if self.cache is not None and len(self.all_ids) > self.cache.max_tokens:
            return self.finish("length", now, sampled=(token,), text=text, logprobs=lps)
        return GenerationEvent(self.request_id, "token", text=text, token_ids=(token,), logprobs=lps)

    def timed_out(self, now: float) -> bool:
        limit = self.options.max_time_ms
        return limit is not None and (now - self.submitted_at) * 1000.0 >= limit

    def finish(
        self,
        reason: FinishReason,
        now: float,
        *,
        sampled: tuple[int, ...] = (),
        text: str = "",
        error: str | None = None,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> GenerationEvent:
        """End the request: flush held-back text and build the result (the final event)."""
        tail = self.stops.feed(self.decoder.flush())[0] + self.stops.flush()  # "" after a stop string
        text += tail
        self.pieces.append(tail)
        self.finished_at = now
        self.prompt_logits = None  # children that have not started compute their prompt's last token
        self.result = self._result(reason, now, error)
        return GenerationEvent(self.request_id, "done", text=text, token_ids=sampled, result=self.result,
                               logprobs=logprobs)  # fmt: skip

    def _result(self, reason: FinishReason, now: float, error: str | None) -> GenerationResult:
        ttft = None if self.first_token_at is None else (self.first_token_at - self.submitted_at) * 1000.0
        decode_s = now - self.first_token_at if self.first_token_at is not None else 0.0
        n_decode = max(0, len(self.generated) - 1)
        queue_wait = (self.started_at or now) - self.submitted_at
        return GenerationResult(
            text="".join(self.pieces),
            token_ids=tuple(self.generated),
            finish_reason=reason,
            prompt_tokens=self.n_prompt,
            reused_tokens=self.n_reused,
            context_trimmed=self.context_trimmed,
            ttft_ms=ttft,
            decode_tokens_per_s=n_decode / decode_s if decode_s > 0 and n_decode else 0.0,
            total_ms=(now - self.submitted_at) * 1000.0,
            queue_wait_ms=queue_wait * 1000.0,
            error=error,
            decode_steps=self.n_decode_steps,
            draft_tokens=self.n_draft_tokens,
            accepted_draft_tokens=self.n_accepted_tokens,
            logprobs=tuple(self.logprobs),
            prompt_logprobs=tuple(self.prompt_logprobs),
            constraint_mask_ms=self.matcher.mask_s * 1000.0 if self.matcher is not None else 0.0,
        )
