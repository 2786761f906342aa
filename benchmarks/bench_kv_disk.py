"""KV on disk: time to first token (TTFT) of a ~1,500-token conversation resumed from the disk tier
vs recomputed, in one run.

    python benchmarks/bench_kv_disk.py [--model PATH] [--quick] [--runs N] [--app] [--json out.json]

The conversation is bench_kv_cache.py's five SmolLM2 turns: four turns and their replies are cached,
then the fifth user message is sent. Cases, each timed from the request to the first token
(``prepare`` + a forward of the tokens not reused + argmax):

- recomputed: a fresh store, the whole prompt computed (what an evicted session cost before);
- restart, from disk: the session was written when its tab closed; a new store on the same folder
  (the app restarted) loads it. The file's pages are dropped from the page cache first
  (``posix_fadvise(DONTNEED)``, this file only), so the read comes from the disk itself;
- restart, tab opened 1 s before: as "from disk", but the app's read-ahead of an opened tab's file
  (``prefetch``, posix_fadvise WILLNEED) had one second (the user typing) before the message;
- restart, page cache: the same with the file's pages still cached (the usual case right after
  an eviction);
- evicted: in one store, another session's prefill evicts this one to disk (written in the
  background), then it comes back;
- in memory: the session never left (the memory tier's TTFT, for reference).

Also: the background write's duration and the file size, the store's open time (index scan), and
checks that every mode's first token is the same and its logits within 1e-4 (relative) of the
recomputed ones (a mismatch stops the benchmark). Both KV dtypes (float32, float16) unless --quick.
Target: recomputed / from disk >= 10x. Medians of --runs runs after a warm-up; never asserted.

``--app`` adds the case through the real window (offscreen): a saved four-turn conversation, its
fifth message sent cold, the app closed and started again, the reply regenerated and a sixth message
sent; the replies' own "prompt tokens reused" and TTFT.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bench_kv_cache import USERS, blas_config, conversation, load
from common import default_model_path, report

from engine import KvCacheOptions, LruKvCacheStore, Model, SessionId
from engine.model import Row

TARGET = 10.0
TOL = 1e-4
TAB, OTHER = SessionId("tab"), SessionId("other-tab")
PREFETCHED = "restart, tab opened 1 s before"
TYPING_S = 1.0  # between opening a tab (its file read ahead) and sending: a fast typist


def first_token(model: Model, store: LruKvCacheStore, prompt: Sequence[int]) -> tuple[float, int, np.ndarray]:
    """(seconds to the first token, tokens reused, last logits) for ``prompt`` in session TAB."""
    started = time.perf_counter()
    entry, n_reused = store.prepare(
        TAB, model.kv_shape(store.options.dtype), prompt, model.config.context_length
    )
    logits = model.forward_last([Row(np.asarray(prompt[n_reused:]), entry)])[0]  # (V,)
    int(logits.argmax())
    return time.perf_counter() - started, n_reused, logits


def disk_store(model: Model, directory: Path, dtype: str, **options: Any) -> LruKvCacheStore:
    store = LruKvCacheStore(KvCacheOptions(dtype=dtype, disk_dir=str(directory), **options))
    store.set_model_identity(model.identity)
    return store


def cache_history(model: Model, store: LruKvCacheStore, history: Sequence[int]) -> None:
    """The first four turns and their replies in session TAB, as chatting would leave them (untimed)."""
    entry, n_reused = store.prepare(
        TAB, model.kv_shape(store.options.dtype), history, model.config.context_length
    )
    model.forward_last([Row(np.asarray(history[n_reused:]), entry)])


def drop_page_cache(directory: Path) -> bool:
    """Ask the kernel to forget the cached pages of the session files (only those files)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in directory.glob("*.kv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def one_run(model: Model, history: list[int], prompt: list[int], dtype: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shape = model.kv_shape(dtype)
    out["recomputed"] = first_token(model, LruKvCacheStore(KvCacheOptions(dtype=dtype)), prompt)
    with tempfile.TemporaryDirectory(prefix="bench-kv-disk-") as tmp:
        directory = Path(tmp)
        store = disk_store(model, directory, dtype)
        cache_history(model, store, history)
        out["in memory"] = first_token(model, store, prompt)
        entry = store.try_get(TAB)
        assert entry is not None
        entry.trim(len(history))  # back to the four turns: what the tab holds when it closes
        started = time.perf_counter()
        store.remove(TAB, to_disk=True)  # the tab closes: handed to the writer, returns at once
        out["hand_over_s"] = time.perf_counter() - started
        store.flush_disk()
        out["write_s"] = time.perf_counter() - started
        store.close()
        out["file_bytes"] = sum(p.stat().st_size for p in directory.glob("*.kv"))
        for case, drop in (("restart, from disk", True), ("restart, page cache", False), (PREFETCHED, True)):
            out[f"{case} dropped"] = drop and drop_page_cache(directory)
            started = time.perf_counter()
            restarted = disk_store(model, directory, dtype)
            out[f"{case} open_s"] = time.perf_counter() - started
            if case == PREFETCHED:  # the app reads an opened tab's file ahead; the user types meanwhile
                restarted.prefetch(TAB)
                time.sleep(TYPING_S)
            out[case] = first_token(model, restarted, prompt)
            restarted.remove(TAB)  # not to disk: the next case reads the same file
            restarted.close()
        room = int(len(prompt) * 1.3) * shape.bytes_per_token  # one session fits, not two
        small = disk_store(model, directory, dtype, max_bytes_total=room, max_bytes_per_session=room)
        cache_history(model, small, history)  # from the file, and its last token computed
        small.get_or_create(OTHER, shape).ensure_capacity(len(prompt) // 2)  # another tab's prefill
        assert TAB not in small, "the other session did not evict the first one"
        small.flush_disk()
        out["evicted"] = first_token(model, small, prompt)
        small.close()
    return out


CASES = ("recomputed", "restart, from disk", PREFETCHED, "restart, page cache", "evicted", "in memory")


def measure(model: Model, history: list[int], prompt: list[int], dtype: str, runs: int) -> dict[str, Any]:
    one_run(model, history[:64], prompt[:80], dtype)  # warm-up: kernels compiled, files code loaded
    results = [one_run(model, history, prompt, dtype) for _ in range(runs)]
    reference = results[0]["recomputed"][2]
    summary: dict[str, Any] = {"dtype": dtype, "runs": runs, "prompt_tokens": len(prompt)}
    for case in CASES:
        times = [r[case][0] for r in results]
        logits = results[0][case][2]
        if int(logits.argmax()) != int(reference.argmax()):
            raise SystemExit(f"{dtype} {case}: the first token differs from the recomputed one")
        diff = float(np.abs(logits - reference).max() / np.abs(reference).max())
        bar = TOL if dtype == "float32" else 1e-2  # float16 K/V: their rounding, as in memory
        if case != "in memory" and diff > bar:
            raise SystemExit(f"{dtype} {case}: logits differ by {diff:.2e} > {bar:.0e}")
        summary[case] = {"ttft_s": statistics.median(times), "reused_tokens": results[0][case][1],
                         "rel_diff": diff}  # fmt: skip
    for key in ("hand_over_s", "write_s", "file_bytes", "restart, from disk open_s",
                "restart, page cache open_s", "restart, from disk dropped"):  # fmt: skip
        summary[key] = statistics.median(r[key] for r in results)
    recomputed = summary["recomputed"]["ttft_s"]
    for case in CASES:
        summary[case]["speedup"] = recomputed / summary[case]["ttft_s"]
    return summary


def table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("KV dtype / case", "prompt tokens (reused)", "TTFT", "recomputed / case")]
    for summary in results["dtypes"]:
        for case in CASES:
            row = summary[case]
            target = f" (target >= {TARGET:.0f}x)" if case == "restart, from disk" else ""
            rows.append(
                (
                    f"{summary['dtype']}: {case}",
                    f"{summary['prompt_tokens']} ({row['reused_tokens']})",
                    f"{row['ttft_s'] * 1e3:,.0f} ms",
                    f"{row['speedup']:.1f}x{target}",
                )
            )
        rows.append(
            (
                f"{summary['dtype']}: file, write",
                f"{summary['file_bytes'] / 2**20:.1f} MiB",
                f"written in {summary['write_s'] * 1e3:,.0f} ms (background; hand-over "
                f"{summary['hand_over_s'] * 1e3:.2f} ms)",
                f"store open {summary['restart, from disk open_s'] * 1e3:.0f} ms",
            )
        )
    return rows


def app_case(model_path: str) -> dict[str, Any]:
    """Through the real window (offscreen) with SmolLM2: a saved four-turn conversation, the fifth
    message sent cold; the app closed and started again; then the reply regenerated (the same prompt)
    and a sixth message sent: their TTFT and "prompt tokens reused" as the reply's stats show them."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from bench_app import Waiter, open_window
    from bench_kv_cache import REPLIES, SYSTEM
    from PySide6.QtWidgets import QApplication

    from smallmind_app import paths
    from smallmind_app.history.store import ConversationStore

    app = QApplication.instance() or QApplication([])
    waiter, out = Waiter(), {}
    sampling = {"max_new_tokens": 8, "temperature": 0.0}
    with tempfile.TemporaryDirectory(prefix="bench-kv-disk-app-") as home:
        os.environ[paths.HOME_ENV] = home
        with ConversationStore(paths.database_file()) as store:
            conversation = store.create_conversation("Garden", SYSTEM)
            for question, answer in zip(USERS[:4], REPLIES[:4], strict=True):
                store.add_message(conversation.id, "user", question)
                store.add_message(conversation.id, "assistant", answer)

        def reply(window: Any, act: Any) -> dict[str, Any]:
            tab = window.chat_tabs[0]
            act(tab)
            waiter.waitUntil(lambda: not tab.is_generating, timeout=600_000)
            return dict(tab.entries[-1].stats)

        def send(text: str) -> Any:
            return lambda tab: (tab.prompt_edit.setPlainText(text), tab.send_button.click())

        window = open_window(waiter, Path(model_path), sampling=sampling)
        out["cold: 5th message"] = reply(window, send(USERS[4]))
        window.close()  # the worker writes the session to disk before its thread ends
        window = open_window(waiter, Path(model_path), sampling=sampling)
        out["restart: regenerate"] = reply(window, lambda tab: tab.regenerate())
        out["restart: 6th message"] = reply(window, send("Thank you! One more: what should I plant first?"))
        window.close()
    app.processEvents()
    keys = ("prompt_tokens", "reused_tokens", "ttft_ms")
    return {case: {key: stats.get(key) for key in keys} for case, stats in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="SmolLM2 GGUF (default: the installed model)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run, float32 only")
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (default 3)")
    parser.add_argument("--json", default=None, help="also write the JSON document here")
    parser.add_argument("--app", action="store_true", help="also the case through the real window")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    model, tok = load(args.model or default_model_path())
    prompts, replies = conversation(tok, USERS[0], len(USERS))
    history = prompts[-2] + replies[-1]  # turns 1-4 and the fourth reply: what the session caches
    prompt = prompts[-1]  # turn 5: the history and the fifth user message
    assert prompt[: len(history)] == history
    results: dict[str, Any] = {
        "blas_config": blas_config(),
        "blas_threads": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "history_tokens": len(history),
        "dtypes": [
            measure(model, history, prompt, dtype, runs)
            for dtype in (("float32",) if args.quick else ("float32", "float16"))
        ],
    }
    rows = table(results)
    if args.app:
        results["app"] = app_case(args.model or default_model_path())
        rows.append(("app (real window)", "prompt tokens (reused)", "TTFT (reply stats)", ""))
        for case, row in results["app"].items():
            rows.append(
                (case, f"{row['prompt_tokens']} ({row['reused_tokens']})", f"{row['ttft_ms']:,.0f} ms", "")
            )
    report("kv_disk", results, rows, args.json)


if __name__ == "__main__":
    main()
