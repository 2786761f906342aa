"""What the user reads: every setting's label, the engine's messages and the limits in the user's words.

The engine's messages are precise and name its options (``max_bytes_total=25,165,824``); the window
says the same with the labels the settings dialog shows, sizes in MiB, no session ids, and names
the setting to change when one caused the problem, so the tab can offer a button that opens
Settings at that field. The precise message goes to the log. No Qt and no engine import here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20
INT_MAX = 2_147_483_647
MIB_RANGE = (0, 1_048_576, 2)  # MiB, two decimals

# (section, option name, objectName, label, kind, (minimum, maximum, step/decimals)); the settings
# dialog builds its fields from this list, and the messages below use the same labels.
FIELDS: list[tuple[str, str, str, str, str, tuple[float, ...]]] = [
    ("kv", "enabled", "kvEnabled", "Use the KV cache", "bool", ()),
    ("kv", "max_tokens_per_session", "kvMaxTokensPerSession", "Max tokens per session", "int", (0, INT_MAX)),
    ("kv", "max_sessions", "kvMaxSessions", "Max sessions", "int", (0, 1_000_000)),
    ("kv", "max_bytes_total", "kvMaxBytesTotal", "Memory limit, all sessions", "mib", MIB_RANGE),
    ("kv", "max_bytes_per_session", "kvMaxBytesPerSession", "Memory limit per session", "mib", MIB_RANGE),
    ("kv", "persist_across_requests", "kvPersistAcrossRequests", "Keep sessions between replies", "bool", ()),
    ("kv", "share_prefixes", "kvSharePrefixes", "Share common prompt prefixes between tabs", "bool", ()),
    ("kv", "dtype", "kvDtype", "Cache precision", "choice", ()),
    ("kv", "policy", "kvPolicy", "Eviction policy", "choice", ()),
    ("kv", "disk_enabled", "kvDiskEnabled", "Keep evicted and closed sessions on disk", "bool", ()),
    ("kv", "max_disk_bytes", "kvMaxDiskBytes", "Disk limit, all sessions", "mib", MIB_RANGE),
    ("batching", "enabled", "batchEnabled", "Batch requests of several tabs", "bool", ()),
    ("batching", "max_batch_size", "batchMaxBatchSize", "Max batch size", "int", (0, 4096)),
    ("batching", "max_batch_wait_ms", "batchMaxWaitMs", "Max batch wait", "float", (0, 100_000, 1)),
    ("batching", "max_total_queued_requests", "batchMaxQueuedRequests", "Max queued requests", "int",
     (0, 1_000_000)),
    ("batching", "prefill_only", "batchPrefillOnly", "Batch prompts only (decode one by one)", "bool", ()),
    ("batching", "max_prefill_chunk_tokens", "batchMaxPrefillChunkTokens", "Prompt tokens per step", "int",
     (0, 1_000_000)),
    ("batching", "cpu_threads", "cpuThreads", "CPU threads", "int", (0, 256)),
    ("batching", "activations", "int8Activations", "8-bit activations (faster batches, approximate)", "flag",
     ()),  # a check box: "float32" unticked, "int8" ticked (dialog.FLAGS)
    ("batching", "speculative", "specEnabled", "Guess tokens from the conversation (drafts)", "bool", ()),
    ("batching", "draft_tokens", "specMaxDraftTokens", "Most drafted tokens per step (0 = off)", "int",
     (0, 16)),
    ("batching", "draft_ngram_max", "specNgramMax", "Longest phrase looked up for drafts (tokens)", "int",
     (0, 8)),
    ("sampling", "max_new_tokens", "maxNewTokens", "Max new tokens", "int", (0, 1_000_000)),
    ("sampling", "temperature", "temperature", "Temperature (0 = greedy)", "float", (0, 100, 2)),
    ("sampling", "top_k", "topK", "Top-k (0 = off)", "int", (0, 1_000_000)),
    ("sampling", "top_p", "topP", "Top-p", "float", (0, 1, 3)),
    ("sampling", "min_p", "minP", "Min-p (0 = off)", "float", (0, 1, 3)),
    ("sampling", "repetition_penalty", "repetitionPenalty", "Repetition penalty (1 = off)", "float",
     (0, 100, 2)),
    ("sampling", "repetition_window", "repetitionWindow", "Repetition window (0 = all)", "int",
     (0, 1_000_000)),
    ("sampling", "seed", "seed", "Seed", "optional int", (-1, INT_MAX)),
    ("sampling", "stop", "stopStrings", "Stop strings (one per line)", "lines", ()),
    ("sampling", "max_time_ms", "maxTimeMs", "Time limit per reply", "optional int", (0, INT_MAX)),
    ("sampling", "stop_on_eos", "stopOnEos", "Stop at the end-of-text token", "bool", ()),
]  # fmt: skip
PAGES = {"kv": "KV cache", "batching": "Batching", "sampling": "Sampling"}
INT8_ACTIVATIONS_TIP = (
    "Rounds the activations to 8 bits where they meet 4-bit weights and multiplies integers (AVX-512 "
    "VNNI), as llama.cpp does: faster, most of all with several replies at once (Intel Xeon, SmolLM2: "
    "one reply 175 → 197 tokens/s, 8 at once 317 → 418). The price: results are approximate (logits "
    "within ~8% of the largest instead of equal to 6 digits), so even greedy replies (temperature 0) "
    "no longer equal the reference model's and part from them after a few tokens. Needs a CPU with "
    "AVX-512 VNNI (Intel Ice Lake or later, AMD Zen 4 or later). Takes effect at the next step."
)
INT8_UNAVAILABLE = {  # why the 8-bit activations cannot run here, by the kernels' path
    "numba": "Not available on this computer: its CPU lacks AVX-512 VNNI (Intel Ice Lake or later and "
    "AMD Zen 4 or later have it). Activations stay float32.",
    "numpy": "Not available with the NumPy kernels (SMALLMIND_KERNELS=numpy, or numba missing): they "
    "compute in float32.",
}
SECTION_KEYS = {"kv": "kv_cache", "batching": "batching", "sampling": "sampling"}
# "kv_cache.max_bytes_total" (the settings file's name of an option) -> its field's objectName
FIELD_NAMES = {f"{SECTION_KEYS[sec]}.{key}": name for sec, key, name, *_ in FIELDS}
LABELS = {key: label for _, key, _, label, *_ in reversed(FIELDS)}  # option name -> label (KV's "enabled")
BYTE_OPTIONS = {key for _, key, _, _, kind, _ in FIELDS if kind == "mib"}


def mib(n_bytes: float) -> str:
    """12,582,912 -> '12 MiB'; 11,796,480 -> '11.25 MiB'."""
    return f"{n_bytes / MiB:,.2f}".rstrip("0").rstrip(".") + " MiB"


def quoted(key: str) -> str:
    return f"“{LABELS.get(key, key)}”"


def _plain_number(text: str) -> int:
    return int(text.replace(",", ""))


def setting_problem(message: str) -> str:
    """An option class's ValueError in the settings dialog's words: labels for names, MiB for bytes.

    'max_bytes_per_session (268,435,456) must not exceed max_bytes_total (12,582,912)' ->
    '“Memory limit per session” (256 MiB) must not be more than “Memory limit, all sessions” (12 MiB)'.
    """
    text = re.sub(r"^(KvCacheOptions|BatchingOptions|InferenceOptions)\.", "", message)
    byte_names = "|".join(sorted(BYTE_OPTIONS))
    text = re.sub(
        rf"\b({byte_names})\b\s*[(=]\s*([\d,]+)\)?", lambda m: f"{m[1]} ({mib(_plain_number(m[2]))})", text
    )
    if any(re.match(rf"{name}\b", text) for name in BYTE_OPTIONS):
        text = re.sub(r"got (\d[\d,]*)$", lambda m: f"got {mib(_plain_number(m[1]))}", text)
        text = text.replace("a whole number ≥ 1", "more than 0 MiB")
    text = text.replace("must not exceed", "must not be more than")
    text = re.sub(r"^(\w+) = (.+?) is invalid; allowed: (.+)$", r"\1 cannot be \2; allowed: \3", text)
    names = "|".join(sorted(LABELS, key=len, reverse=True))
    return re.sub(rf"\b({names})\b", lambda m: quoted(m[1]), text)


@dataclass(frozen=True, slots=True)
class Problem:
    """An engine message said for the user; ``setting`` is the option to change ('' when none)."""

    text: str
    setting: str = ""  # "kv_cache.max_bytes_total": the tab offers to open Settings at this field
    suggested: int | None = None  # a value that would let this message through (the tab offers it)


_BUDGET = re.compile(
    r"KV cache budget exhausted: session \S+ needs ([\d,]+) more bytes, ([\d,]+) of max_bytes_total=([\d,]+) "
    r"are held by (\d+) other session\(s\) in use by running requests"
)
_TOO_SMALL = re.compile(r"max_bytes_per_session=([\d,]+) is smaller than one token of K/V \(([\d,]+) bytes\)")
_SESSIONS = re.compile(r"max_sessions=(\d+) sessions exist and (\d+) are in use")
_OVERFLOW = re.compile(r"prompt has ([\d,]+) tokens, more than the limit of ([\d,]+) tokens")
_SESSION_ID = re.compile(r"\b(session )?[0-9a-f]{32}\b")


def _replies(n: int) -> str:
    return f"{n} other repl{'y' if n == 1 else 'ies'} being generated"


def engine_problem(message: str) -> Problem:
    """A reply's or a refusal's engine message in the user's words (unknown ones lose their ids)."""
    if m := _BUDGET.search(message):
        needed, held, limit, others = (_plain_number(g) for g in m.groups())
        holders = f"this conversation and {_replies(others)}" if others else "this conversation"
        return Problem(
            f"Not enough cache memory for this reply: it needs {mib(needed)} more, and {mib(held)} of the "
            f"{mib(limit)} set by {quoted('max_bytes_total')} are held by {holders}. Wait for the other "
            f"replies to finish, or raise {quoted('max_bytes_total')} in Settings.",
            "kv_cache.max_bytes_total",
        )
    if m := _TOO_SMALL.search(message):
        per_session, per_token = (_plain_number(g) for g in m.groups())
        return Problem(
            f"{quoted('max_bytes_per_session')} ({mib(per_session)}) is smaller than one token of this "
            f"model's cache ({mib(per_token)}). Raise it in Settings.",
            "kv_cache.max_bytes_per_session",
        )
    if m := _SESSIONS.search(message):
        limit, busy = int(m[1]), int(m[2])
        return Problem(
            f"No cache session is free for this conversation: {quoted('max_sessions')} is {limit} and "
            f"{busy} of them are generating. Wait for a reply to finish, or raise {quoted('max_sessions')} "
            "in Settings.",
            "kv_cache.max_sessions",
        )
    if m := _OVERFLOW.search(message):
        n_tokens, limit = _plain_number(m[1]), _plain_number(m[2])
        return Problem(
            f"The conversation is {n_tokens:,} tokens, more than the {limit:,} tokens a tab may hold. "
            "Start a new chat, or raise the limit in Settings.",
            "kv_cache.max_tokens_per_session",
        )
    return Problem(_SESSION_ID.sub("this conversation", message))


def too_long(n_tokens: int, limit: int, context: int, cause: str, suggested: int | None) -> Problem:
    """A message longer than one tab may hold; ``cause`` is the option that set the limit ('' = the
    model's context)."""
    if not cause:
        return Problem(
            f"Not sent: this message is {n_tokens:,} tokens, more than the model's context of {context:,} "
            "tokens. Shorten it or split it into several messages."
        )
    key = cause.split(".", 1)[1]
    shown = (mib(suggested) if key in BYTE_OPTIONS else f"{suggested:,} tokens") if suggested else ""
    offer = f" Raise it to {shown}, or shorten the message." if suggested else ""
    what = quoted(key)
    return Problem(
        f"Not sent: this message is {n_tokens:,} tokens, more than the {limit:,} tokens a tab may hold "
        f"(set by {what}; the model's context is {context:,} tokens).{offer}",
        cause,
        suggested,
    )


# -- a request the worker did not send ---------------------------------------------------------------
ALREADY_GENERATING = "A reply is already being generated here."
NO_MODEL = "No model is loaded; open Settings to choose one."
CONTINUE_LOCAL_ONLY = "Continue works with this computer's models; a server's reply can only be regenerated."
REMOTE_ENGINE_GONE = (
    "This tab's server is not in Settings → Engines any more; pick another engine at the top of the tab."
)
NOT_SENT = {  # the kind of the engine's refusal -> the tab's sentence ({} is the engine's message)
    "queue_full": "Not sent: the engine is busy ({}). Press Regenerate to send it again in a moment.",
    "context_overflow": "Not sent: the conversation is too long for one KV session ({}).",
    "cache_budget": "Not sent: the KV cache budget is exhausted ({}).",
    "": "Not sent: {}",
}


def invalid_sampling(message: str) -> str:
    return f"Invalid sampling settings: {message}"


def not_sent(kind: str, message: str) -> str:
    """A sentence for the tab: what happened, the engine's numbers, what the user can do."""
    return NOT_SENT.get(kind, NOT_SENT[""]).format(message)


# -- the limits of a reply and of a tab ---------------------------------------------------------------
FINISH_NOTES = {  # a reply's finish reason -> the note under it ("length" says which limit: limit_reached)
    "cancelled": "stopped",
    "timeout": "stopped: time limit",
    "error": "failed",
}
STATUS_CHARS = 90  # the status line beside a tab's buttons is cut there (the transcript has the whole text)


def tab_limit(stats: Mapping[str, Any], trimmed: bool = False) -> str:
    """'the model's context', or 'the 273 tokens a tab may hold (“Memory limit per session”)';
    ``trimmed``: the limit that trimmed the prompt (the one when it was sent), when known."""
    limit_key, setting_key = ("session_limit", "limit_setting")
    if trimmed and "trimmed_limit" in stats:
        limit_key, setting_key = ("trimmed_limit", "trimmed_setting")
    setting = str(stats.get(setting_key) or "")
    if not setting or limit_key not in stats:
        return "the model's context"
    label = LABELS.get(setting.split(".", 1)[1], setting)
    return f"the {int(stats[limit_key]):,} tokens a tab may hold (set by “{label}”)"


def limit_reached(stats: Mapping[str, Any]) -> str:
    """Which limit ended a reply: its max new tokens, or a full tab."""
    if stats.get("stopped_by") == "session":
        return f"the conversation reached {tab_limit(stats)}"
    if stats.get("max_new_tokens"):
        return f"“{LABELS['max_new_tokens']}” ({int(stats['max_new_tokens']):,}) reached"
    return "the token limit"


def problem_buttons(setting: str, suggested: int | None) -> tuple[tuple[str, str], tuple[str, str] | None]:
    """The texts and tooltips of a tab's two buttons for a problem a setting caused: (open Settings at
    it), (raise it to ``suggested`` and send again; None without a value)."""
    key = setting.split(".", 1)[-1]
    fix = (f"Settings: {LABELS.get(key, key)}…", "Open Settings at the setting that caused this")
    if not suggested:
        return fix, None
    shown = mib(suggested) if "bytes" in key else f"{suggested:,} tokens"
    return fix, (
        f"Raise to {shown} and send",
        f"Set “{LABELS.get(key, key)}” to {shown} and send the message again",
    )


def tab_limit_lowered(new: int, old: int, setting: str) -> str:
    """The status bar's note when a settings change lowered the tokens a tab may hold."""
    cause = f", set by “{LABELS[setting.split('.', 1)[1]]}”" if setting else ""
    return (
        f"Each tab now holds at most {new:,} tokens (was {old:,}){cause}: longer conversations "
        "leave out their oldest messages."
    )


def waiting_reason(kind: str, running: int = 0, limit: int = 0) -> tuple[str, str, str]:
    """Why a reply waits in the queue: (the tab's status line, the reply's footer, the setting that
    would let it start sooner). ``kind``: "memory" (the KV budget is held by other replies) or
    "batch" (every place in the batch is taken: ``running`` replies, ``limit`` at once)."""
    if kind == "memory":
        return (
            f"waiting for memory: other replies hold the cache ({quoted('max_bytes_total')}); "
            "it starts when one ends…",
            "waiting for memory…",
            "kv_cache.max_bytes_total",
        )
    replies = f"{running} repl{'y is' if running == 1 else 'ies are'} being generated"
    if limit <= 1:
        return (
            f"waiting for a batch slot: {replies}, one at a time ({quoted('max_batch_size')} is 1, or "
            "batching is off)…",
            "waiting for a batch slot…",
            "batching.max_batch_size",
        )
    return (
        f"waiting for a batch slot: {replies} ({quoted('max_batch_size')} is {limit})…",
        "waiting for a batch slot…",
        "batching.max_batch_size",
    )


def short_status(text: str) -> str:
    """A long message cut to one status line, at a word."""
    return text if len(text) <= STATUS_CHARS else text[: STATUS_CHARS - 1].rsplit(" ", 1)[0] + "…"
