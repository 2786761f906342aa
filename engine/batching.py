"""The batched inference engine: one scheduler serving every conversation in shared forward passes.

``step()`` is the only way work gets done (vLLM's shape: schedule -> run the model -> update from
the output). Each running request has "computed" and "total" token counts and every step closes
part of the gap: a prefill chunk (at most ``max_prefill_chunk_tokens`` per step across the batch, so
other tabs keep streaming while a long prompt is processed) or one decode token. All rows go through
ONE forward: the linear layers run on the stacked rows, attention per sequence against its own KV
entry; each row is sampled with its own options and RNG.

Modes (``BatchingOptions``): continuous batching (default); ``prefill_only`` (the seed's mode:
prompts batched, each decode step run per request); ``enabled=False`` (one request at a time).
Whoever drives the engine calls ``step()``: the Qt worker, the background thread of ``start()``, or a
benchmark. ``submit``/``cancel``/``update_options`` are thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import drivers, kernels
from .constraints import GrammarCompiler
from .drafting import add_drafts, verify
from .embeddings import EMBEDDING_OPTIONS, EmbeddingRequest, embedding_input_ids
from .errors import CacheBudgetError, ContextOverflowError, EngineStoppedError
from .generation import GenerationEvent, GenerationRequest, GenerationResult, ResultHandle
from .kv_store import KvCacheOptions, LruKvCacheStore, SessionId
from .logprobs import TokenLogprob
from .metrics import InMemoryRuntimeMetrics
from .model import Model
from .model import Row as ModelRow
from .options import options_from_dict, options_to_dict
from .prompting import PromptBuilder
from .sampling import InferenceOptions
from .scheduler import MemoryScheduler, Row, RunningRequest, request_failure
from .speculative import Drafter

log = logging.getLogger(__name__)

MAX_DRAFT_TOKENS = 16
MAX_DRAFT_NGRAM = 8
EventCallback = Callable[[GenerationEvent], object]
Prompt = str | Sequence[Mapping[str, str]]
ACTIVATIONS = kernels.ACTIVATIONS  # ("float32", "int8"): BatchingOptions.activations


default_activations = kernels.default_activations  # BatchingOptions.activations' default


def int8_activations_available() -> bool:
    """Whether ``activations="int8"`` takes effect here: the numba kernels on a CPU with AVX-512 VNNI
    and VBMI (elsewhere the kernels keep float32 activations)."""
    try:
        if kernels.backend() != "numba":
            return False
    except ValueError:  # $SMALLMIND_KERNELS names no path: the model's load says so
        return False
    from .kernels import vnni

    return vnni.available()


@dataclass(frozen=True, slots=True)
class BatchingOptions:
    """The batcher's settings (names follow the runtime spec, in snake_case)."""

    enabled: bool = True
    max_batch_size: int = 8
    max_batch_wait_ms: float = 10.0
    max_total_queued_requests: int = 100
    prefill_only: bool = False
    max_prefill_chunk_tokens: int = 256
    cpu_threads: int = 0  # threads the kernels compute on; 0 = auto (cores free of other work)
    speculative: bool = True  # draft tokens from each request's context and verify them (speculative.py)
    draft_tokens: int = 7  # most tokens drafted per request per step; 0 turns drafting off
    draft_ngram_max: int = 3  # the longest n-gram looked up in the context to find a draft
    # the kernels' activations (process-wide, numba path): "float32" (greedy output equal to the float32
    # reference) or "int8" (8-bit, with AVX-512 VNNI: faster batched steps, logits within ~8%);
    # default $SMALLMIND_ACTIVATIONS, else float32
    activations: str = field(default_factory=default_activations)

    def __post_init__(self) -> None:
        for name in ("enabled", "prefill_only", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BatchingOptions.{name} must be true or false, got {getattr(self, name)!r}")
        limits = {"max_batch_size": (1, 256), "max_total_queued_requests": (1, 100_000),
                  "max_prefill_chunk_tokens": (1, 65_536),
                  "cpu_threads": (0, kernels.MAX_THREADS), "draft_tokens": (0, MAX_DRAFT_TOKENS),
                  "draft_ngram_max": (1, MAX_DRAFT_NGRAM)}  # fmt: skip
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"BatchingOptions.{name} must be a whole number in [{low}, {high}], got {value!r}"
                )
        wait = self.max_batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 10_000:
            raise ValueError(f"BatchingOptions.max_batch_wait_ms must be in [0, 10000] ms, got {wait!r}")
        if self.activations not in ACTIVATIONS:
            allowed = ", ".join(ACTIVATIONS)
            raise ValueError(
                f"BatchingOptions.activations must be one of {allowed}, got {self.activations!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchingOptions:
        return options_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return options_to_dict(self)


class RequestHandle(ResultHandle):
    """The caller's side of a submitted request: cancel it, wait for its result."""

    def __init__(
        self, seq: GenerationRequest, engine: BatchedInferenceEngine, on_event: EventCallback | None
    ) -> None:
        super().__init__(seq.request_id, seq.session_id, on_event)
        self._engine = engine
        self._seq = seq  # for requests forked from this one (n > 1)

    @property
    def prompt_logprobs(self) -> tuple[TokenLogprob | None, ...]:
        """The prompt's log-probabilities computed so far (options.prompt_logprobs): all of them once
        the first token has been reported."""
        return tuple(self._seq.prompt_logprobs)

    def cancel(self) -> None:
        """Ask the engine to stop this request at the next step (thread-safe)."""
        super().cancel()
        self._engine._wake()


class BatchedInferenceEngine:
    """Serves every request through one scheduling step; see the module docstring.

    The rooms around it: ``scheduler.py`` (the queue, admission, KV room, preemption, the end of a
    request), ``drafting.py`` (speculative drafts in a step), ``drivers.py`` (the background thread
    and asyncio), ``prompting.py`` (messages to prompt ids)."""

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        batching_options: BatchingOptions | None = None,
        kv_cache_store: LruKvCacheStore | None = None,
        metrics: InMemoryRuntimeMetrics | None = None,
        max_concurrent_sessions: int = 100,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.store = kv_cache_store if kv_cache_store is not None else LruKvCacheStore()
        self.store.set_model_identity(getattr(model, "identity", None))  # the disk tier's files must match
        self.metrics = metrics if metrics is not None else InMemoryRuntimeMetrics()
        self._batching = batching_options or BatchingOptions()
        self._apply_to_kernels(self._batching)
        self._prompts = PromptBuilder(tokenizer)
        self.step_lock = threading.RLock()  # held for a whole step; options change between steps
        self.drafter = Drafter()  # prompt-lookup drafts: which requests draft how many tokens
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size)  # constraints -> matchers
        self.scheduler = MemoryScheduler(
            model, self.store, self.metrics, lambda: self._batching, self._after_forward,
            self.drafter.forget, max_concurrent_sessions,
        )  # fmt: skip
        self.driver = drivers.ThreadDriver(self.step, self.seconds_until_ready, self._log_once)
        self._stopped = False
        self._external_driver = False
        self._wakeup_listeners: list[Callable[[], None]] = []
        self._logged: set[str] = set()  # faults logged with a traceback already (_log_once)

    # -- options -----------------------------------------------------------------------------
    @property
    def batching_options(self) -> BatchingOptions:
        return self._batching

    @property
    def cache_options(self) -> KvCacheOptions:
        return self.store.options

    @property
    def max_concurrent_sessions(self) -> int:
        return self.scheduler.queue.max_concurrent_sessions

    def update_options(
        self, batching: BatchingOptions | None = None, cache: KvCacheOptions | None = None
    ) -> None:
        """Apply new settings between steps (waits for a running step to end)."""
        with self.step_lock:
            if batching is not None:
                self._batching = batching
                self._apply_to_kernels(batching)
            if cache is not None:
                self.store.update_options(cache)
            self.scheduler.memory_blocked = False
        self._wake()

    def _apply_to_kernels(self, batching: BatchingOptions) -> None:
        """The kernels' process-wide settings: threads, and on the numba path the activations (the
        NumPy path multiplies float32 weights: nothing to set, numba never imported)."""
        kernels.set_threads(batching.cpu_threads)
        if self.kernel_path == "numba":
            kernels.set_activations(batching.activations)

    @property
    def kernel_path(self) -> str:
        """The path the model's matrices were built for: "numba" or "numpy"."""
        return str(getattr(getattr(self.model, "weights", None), "kernels", "numpy"))

    @property
    def activations(self) -> str:
        """The activations in effect for this model: "int8" only on the numba path with the mode on
        and the CPU able (``int8_activations_available``); else "float32"."""
        return kernels.activations() if self.kernel_path == "numba" else "float32"

    def session_token_limit(self) -> int:
        """How many tokens one conversation may hold (prompt and reply) with the current settings."""
        context = self.model.config.context_length
        options = self.store.options
        if not options.enabled:
            return context
        return options.effective_max_tokens(self.model.kv_shape(options.dtype), context)

    # -- submitting ----------------------------------------------------------------------------
    def submit(
        self,
        prompt_or_messages: Prompt,
        options: InferenceOptions | None = None,
        session_id: SessionId | None = None,
        on_event: EventCallback | None = None,
        fork_of: RequestHandle | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> RequestHandle:
        """Queue a request (thread-safe). Raises QueueFullError, ContextOverflowError, ValueError
        (a ``ConstraintError`` for a grammar the constraint library refuses).

        ``fork_of``: a request with the same prompt submitted before (n > 1 choices): this one starts
        once that one's prompt is computed and copies its K/V instead of computing them again.
        ``tools``: the functions a chat template with its own tool format describes (and messages may
        then hold tool results and assistant tool calls)."""
        options = options or InferenceOptions()
        if self._stopped:
            raise EngineStoppedError("the engine is stopped; no new requests are accepted")
        prompt_ids, trimmed = self._prompts.build(
            prompt_or_messages, self.session_token_limit(), options, tools
        )
        self._check_fits_alone(len(prompt_ids), options)
        matcher = self.grammars.matcher(options.constraint) if options.constraint is not None else None
        if fork_of is not None:  # its first token can come from the parent's logits (engine/forks.py)
            fork_of._seq.keeps_prompt_logits = True
        seq = GenerationRequest(
            prompt_ids,
            options,
            decoder=self.tokenizer.stream_decoder(skip_special=True),
            eos_ids=frozenset(self.tokenizer.eos_ids),
            session_id=session_id,
            context_trimmed=trimmed,
            matcher=matcher,
            fork_parent=fork_of._seq if fork_of is not None else None,
        )
        return self._enqueue(seq, on_event)

    def submit_embedding(
        self, text_or_ids: str | Sequence[int], on_event: EventCallback | None = None
    ) -> RequestHandle:
        """Queue an embedding request (thread-safe): its result's ``embedding`` is the mean of the
        model's final hidden states over the input's tokens, L2-normalized (engine/embeddings.py).
        Text is encoded as plain text (special-token spellings stay text), after BOS if the model
        adds one. Raises ValueError, ContextOverflowError, QueueFullError."""
        if self._stopped:
            raise EngineStoppedError("the engine is stopped; no new requests are accepted")
        ids = embedding_input_ids(self.tokenizer, text_or_ids, self.model.config.vocab_size)
        limit = self.session_token_limit()
        if len(ids) > limit:
            raise ContextOverflowError(len(ids), limit, what="the input")
        self._check_fits_alone(len(ids), EMBEDDING_OPTIONS)
        seq = EmbeddingRequest(ids, EMBEDDING_OPTIONS, decoder=self.tokenizer.stream_decoder(),
                               eos_ids=frozenset(self.tokenizer.eos_ids))  # fmt: skip
        return self._enqueue(seq, on_event)

    def _enqueue(self, seq: GenerationRequest, on_event: EventCallback | None) -> RequestHandle:
        handle = RequestHandle(seq, self, on_event)
        self.scheduler.enqueue(seq, handle, lambda: self._stopped)  # stop() drains under the same lock
        if isinstance(seq.session_id, SessionId):  # in use from now on: the least recently used is another
            self.store.touch(seq.session_id)
        self._wake()
        return handle

    def _check_fits_alone(self, n_prompt: int, options: InferenceOptions) -> None:
        """Refuse a request whose K/V could not fit the budget even with nothing else cached; every
        other request waits or is preempted, never failed, for lack of KV memory."""
        cache = self.store.options
        if not cache.enabled:
            return
        n_tokens = min(n_prompt + options.max_new_tokens, self.session_token_limit())  # then "length"
        n_bytes = n_tokens * self.model.kv_shape(cache.dtype).bytes_per_token
        if n_bytes > cache.max_bytes_total:
            raise CacheBudgetError(
                f"the request needs {n_bytes:,} bytes of KV cache ({n_prompt} prompt tokens + "
                f"max_new_tokens={options.max_new_tokens}), "
                f"more than max_bytes_total={cache.max_bytes_total:,}"
            )

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step: the scheduler picks the rows (scheduler.py has the memory policy),
        drafts are added, one forward runs, each row is sampled. Returns False when there was
        nothing to run (idle, or waiting for company for ``max_batch_wait_ms``)."""
        if threading.current_thread() is not self.driver.thread:
            self._external_driver = True
        scheduler = self.scheduler
        with self.step_lock:
            now = time.perf_counter()
            try:
                scheduler.reap(now)
                if scheduler.waiting_for_company(now):
                    return False
                rows = self._add_drafts(scheduler.schedule(now))
                if not rows:
                    return bool(scheduler.running)
                for batch in self._batches(rows):
                    self._run(batch)
                return True
            except Exception as exc:  # no request to blame: the running ones fail, the engine goes on
                scheduler.fail_running(str(request_failure("the engine step", exc)), time.perf_counter())
                return True
            finally:  # also after a step that only reaped or admitted: the dock shows these
                scheduler.publish_queue_state()

    def _log_once(self, key: str, message: str, *args: object, exc: BaseException) -> None:
        """A warning with its traceback the first time, a debug line after (a fault must not flood)."""
        if key in self._logged:
            log.debug(message, *args)
        else:
            self._logged.add(key)
            log.warning(message, *args, exc_info=exc)

    def seconds_until_ready(self) -> float | None:
        """0 when a step would run now, the time left to wait for company, or None when idle."""
        return self.scheduler.seconds_until_ready()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def _add_drafts(self, rows: list[Row]) -> list[Row]:
        options = self._batching
        if not options.speculative or options.draft_tokens == 0:
            return rows

        def failed(exc: Exception) -> None:
            self._log_once("drafting", "drafting failed (%s: %s); steps run without drafts until it works",
                           type(exc).__name__, exc, exc=exc)  # fmt: skip

        return add_drafts(rows, self.drafter, options.draft_tokens, options.draft_ngram_max,
                          options.prefill_only, self.model.config.context_length, failed)  # fmt: skip

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        """The rows grouped into forward passes by the batching mode."""
        prefill = [(run, chunk) for run, chunk in rows if run.seq.in_prefill]
        decode = [(run, chunk) for run, chunk in rows if not run.seq.in_prefill]
        if self._batching.prefill_only:
            return ([prefill] if prefill else []) + [[row] for row in decode]
        return [prefill + decode]

    def _run(self, batch: list[Row]) -> None:
        started = time.perf_counter()
        scheduler = self.scheduler
        ready = [(run, chunk) for run, chunk in batch if scheduler.is_running(run)]
        for run, _ in batch:
            if not scheduler.is_running(run):  # ended earlier in this step: its draft is not verified
                run.draft = None
        if not ready:
            return
        try:
            logits = self._forward(ready)
        except Exception as exc:  # no one request to blame: this batch's requests fail, not the engine
            failed = request_failure(f"the forward pass of {len(ready)} request(s)", exc)
            now = time.perf_counter()
            for run, _ in ready:
                run.draft = None
                scheduler.retire(run, run.seq.finish("error", now, error=str(failed)))
            return
        now = time.perf_counter()
        n_prefill = sum(len(c) for r, c in ready if r.seq.in_prefill or r.recompute)
        n_decode = len(ready) - sum(1 for r, _ in ready if r.seq.in_prefill)
        self.metrics.record_step(len(ready), n_prefill, n_decode, now - started,
                                 scheduler.n_waiting, scheduler.n_running)  # fmt: skip
        for (run, chunk), row_logits in zip(ready, logits, strict=True):  # a row's logits: (V,) or (T, V)
            if run.draft is not None:
                self._publish(run, verify(run, row_logits, now, self.drafter, self.metrics), now)
                continue
            run.seq.mark_computed(len(chunk))
            self._after_forward(run, row_logits, now)

    def _forward(self, ready: list[Row]) -> np.ndarray | list[np.ndarray]:
        """The logits of each row's last token, and of every drafted position of a drafting row."""
        rows = [ModelRow(chunk, run.seq.cache) for run, chunk in ready]  # type: ignore[arg-type]
        tails = [_n_tails(run, chunk) for run, chunk in ready]
        embedding = [isinstance(run.seq, EmbeddingRequest) for run, _ in ready]
        if all(n == 1 for n in tails) and not any(embedding):
            return self.model.forward_last(rows)
        hidden: list[np.ndarray] | None = [] if any(embedding) else None
        logits = (
            self.model.forward_tails(rows, tails)  # [(n_i, V)]
            if hidden is None
            else self.model.forward_tails(rows, tails, hidden)
        )
        if hidden is not None:  # each embedding row's final hidden states, (T, D)
            ends = np.cumsum([len(chunk) for _, chunk in ready])
            for (run, chunk), end, wanted in zip(ready, ends, embedding, strict=True):
                if wanted:
                    run.seq.on_hidden(hidden[0][end - len(chunk) : end])  # type: ignore[attr-defined]
        return [row if n > 1 else row[0] for row, n in zip(logits, tails, strict=True)]

    def _after_forward(self, run: RunningRequest, logits: np.ndarray, now: float) -> None:
        seq = run.seq
        try:
            event = seq.on_logits(logits, now)
        except Exception as exc:
            log.exception("sampling failed for request %d", seq.request_id)
            event = seq.finish("error", now, error=f"sampling failed: {exc}")
        if event.kind != "prefill":
            self.metrics.record_sampled(0, 0)
        self._publish(run, event, now)

    def _publish(self, run: RunningRequest, event: GenerationEvent, now: float) -> None:
        """Count a step's tokens for a request and tell its caller (or retire it when it ended)."""
        seq = run.seq
        if event.kind != "prefill" and (event.token_ids or event.kind == "token"):
            self.metrics.record_tokens(len(event.token_ids))
            if run.last_token_at is None:
                self.metrics.record_ttft((now - seq.submitted_at) * 1000.0)
            else:
                self.metrics.record_inter_token((now - run.last_token_at) * 1000.0)
            run.last_token_at = now
        if event.result is not None:
            self.scheduler.retire(run, event)
        else:
            run.handle._deliver(event)

    # -- drivers (drivers.py) ----------------------------------------------------------------------
    def add_wakeup_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the submitting thread) whenever new work arrives: for a driver that
        steps the engine from its own event loop while others submit (the app's API server)."""
        self._wakeup_listeners.append(listener)

    def _wake(self) -> None:
        self.driver.wake()
        for listener in self._wakeup_listeners:
            listener()

    def start(self) -> None:
        """Drive the engine from a background thread (headless and asyncio use)."""
        self.driver.start()

    def ensure_driver(self) -> None:
        """Start the background thread unless someone else steps the engine."""
        if not self._external_driver:
            self.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the driver thread and fail every waiting or running request with a clear message."""
        with self.scheduler.queue.lock:
            self._stopped = True
        self._wake()
        self.driver.stop(timeout)
        with self.step_lock:
            self.scheduler.end_all("the engine was stopped before this request finished", time.perf_counter())

    async def generate(
        self,
        prompt_or_messages: Prompt,
        options: InferenceOptions | None = None,
        session_id: SessionId | None = None,
    ) -> GenerationResult:
        """Run one request to the end and return its result."""
        return await drivers.generate(self, prompt_or_messages, options, session_id)

    def generate_streaming(
        self,
        prompt_or_messages: Prompt,
        options: InferenceOptions | None = None,
        session_id: SessionId | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Yield the request's events as the engine produces them; the last one carries the result."""
        return drivers.generate_streaming(self, prompt_or_messages, options, session_id)


def _n_tails(run: RunningRequest, chunk: np.ndarray) -> int:
    """How many of a row's last positions need logits: the drafts and the token before them, every
    prompt position of a request that wants the prompt's log-probabilities, else the last one."""
    seq = run.seq
    if run.draft is not None:
        return 1 + len(run.draft.token_ids)
    if seq.options.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.n_prompt:
        return len(chunk)
    return 1
