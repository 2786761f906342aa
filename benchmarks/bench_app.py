"""The app's figures that its tests check only by events: how late the GUI's event loop runs while
four tabs generate, how many text signals the worker sends per reply, and RSS over the window soak.

    QT_QPA_PLATFORM=offscreen python benchmarks/bench_app.py [--runs 3] [--soak-tabs 4]
                                                             [--soak-turns 5] [--json out.json]

Each scenario is the one of a test, on the same tiny app model (tests/fixtures/window.APP_MODEL):
- event loop: ``test_window.py::test_event_loop_stays_responsive_while_four_tabs_generate`` (4 tabs x
  600 tokens) with a 5 ms probe timer; lateness = how much later than 5 ms each tick came;
- event loop, code replies: the same, but each tab shows Python source in fenced blocks (the engine's
  own model.py, 40 lines a block) instead of the tiny model's text, as many characters at the same
  moments as the model sent: the transcript highlights a growing code block on every render;
- transcript render: one view holding 40 messages (20 replies with code) while a 41st streams code,
  re-rendered 29 times as it grows: the document's changed tail replaced (as the app does) vs
  rebuilt whole each time (as before issue 17), time per render including the repaint;
- text signals: ``test_worker.py::test_text_arrives_coalesced_and_in_order`` (2 replies x 300 tokens)
  at the worker's real flush interval (``TEXT_FLUSH_S``);
- window soak: ``test_reliability.py::test_window_soak_ci`` (the driver is tests/fixtures/window_soak.py).
Every setting lives under a temporary SMALLMIND_HOME. Nothing is asserted: the figures are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

from common import report
from PySide6.QtCore import QElapsedTimer, QEventLoop, Qt, QTimer
from PySide6.QtWidgets import QApplication

from smallmind_app import create_window, paths
from smallmind_app.settings.app_settings import AppSettings, save_settings
from smallmind_app.worker import replies as worker_module
from smallmind_app.worker.client import EngineClient
from tests.fixtures.qt_recorder import Recorder
from tests.fixtures.tiny_model import write_tiny_gguf
from tests.fixtures.window import APP_MODEL, MODEL_TIMEOUT_MS, send, wait_idle
from tests.fixtures.window_soak import WindowSoak, WindowSoakConfig, window_soak_settings

HELLO = [{"role": "user", "content": "Hello there"}]


class Waiter:
    """pytest-qt's ``qtbot.waitUntil`` without pytest: run the event loop until ``ready()``."""

    def waitUntil(self, ready: Callable[[], object], timeout: int = 5000) -> None:  # pytest-qt spelling
        deadline = time.monotonic() + timeout / 1000
        loop = QEventLoop()
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready within {timeout} ms")
            QTimer.singleShot(5, loop.quit)
            loop.exec()


def fresh_home(root: Path, name: str) -> None:
    """A new SMALLMIND_HOME: no settings, no conversations."""
    home = root / name
    home.mkdir(parents=True)
    os.environ[paths.HOME_ENV] = str(home)


def open_window(waiter: Waiter, model: Path, **sections: Any) -> Any:
    save_settings(AppSettings().with_changes(**sections))
    os.environ["SMALLMIND_MODEL"] = str(model)
    window = create_window()
    window.show()
    waiter.waitUntil(lambda: bool(window.model_info), timeout=MODEL_TIMEOUT_MS)
    return window


def code_text() -> str:
    """Python source in fenced blocks of 40 lines, with a sentence between blocks."""
    lines = (Path(__file__).resolve().parents[1] / "engine" / "model.py").read_text().splitlines()
    blocks = ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    return "".join(f"Part {i}:\n\n```python\n{block}\n```\n\n" for i, block in enumerate(blocks))


def show_code(tab: Any) -> None:
    """The tab shows code where the model's text would be: same length, same moments."""
    source, append = code_text(), tab.append_text
    shown = [0]

    def append_code(text: str, n_tokens: int | None = None) -> None:
        start, shown[0] = shown[0], shown[0] + len(text)
        append(source[start % len(source) : start % len(source) + len(text)], n_tokens)

    tab.append_text = append_code


def render_run() -> dict[str, float]:
    from smallmind_app.chat.conversation_model import Entry
    from smallmind_app.chat.transcript import TranscriptView

    source = code_text()
    entries = []
    for i in range(20):
        entries.append(Entry("user", f"Question {i}"))
        entries.append(
            Entry("assistant", source[i * 800 : (i + 1) * 800] + "\n```\n", stats={"n_tokens": 99})
        )
    reply = Entry("assistant", "", status="streaming")
    entries += [Entry("user", "One more"), reply]
    view = TranscriptView()
    view.resize(700, 600)
    view.show()
    figures = {}
    for mode in ("tail", "whole"):
        reply.content = ""
        view.invalidate()
        view.render(entries)  # the history is shown once before the reply streams
        QApplication.processEvents()
        times_ms = []
        for n_chars in range(100, 3000, 100):
            reply.content = source[:n_chars]
            if mode == "whole":
                view.invalidate()
            started = time.perf_counter()
            view.render(entries)
            QApplication.processEvents()
            times_ms.append((time.perf_counter() - started) * 1000)
        figures[f"{mode}_median_ms"] = statistics.median(times_ms)
        figures[f"{mode}_max_ms"] = max(times_ms)
    view.close()
    return figures


def event_loop_run(waiter: Waiter, model: Path, code: bool = False) -> dict[str, float]:
    window = open_window(waiter, model, sampling={"max_new_tokens": 600, "stop_on_eos": False, "seed": 11})
    tabs = [window.chat_tabs[0]] + [window.new_chat() for _ in range(3)]
    if code:
        for tab in tabs:
            show_code(tab)
    lateness_ms: list[float] = []
    clock = QElapsedTimer()
    probe = QTimer(interval=5, timerType=Qt.TimerType.PreciseTimer)

    def tick() -> None:
        if clock.isValid():
            lateness_ms.append(max(0.0, clock.nsecsElapsed() / 1e6 - 5.0))
        clock.restart()

    probe.timeout.connect(tick)
    for i, tab in enumerate(tabs):
        send(tab, f"Write a long story number {i}")
    started = time.perf_counter()
    probe.start()
    wait_idle(waiter, *tabs)
    probe.stop()
    elapsed_s = time.perf_counter() - started
    tokens = sum(tab.entries[-1].stats["n_tokens"] for tab in tabs)
    window.close()
    lateness_ms.sort()
    return {
        "probes": len(lateness_ms),
        "lateness_p50_ms": statistics.median(lateness_ms),
        "lateness_p99_ms": lateness_ms[int(0.99 * (len(lateness_ms) - 1))],
        "lateness_max_ms": lateness_ms[-1],
        "tokens": tokens,
        "elapsed_s": elapsed_s,
    }


def text_signals_run(waiter: Waiter, model: Path) -> dict[str, float]:
    client = EngineClient()
    recorder = Recorder(client.worker)
    client.start()
    client.load_model(str(model))
    waiter.waitUntil(lambda: bool(recorder.loaded), timeout=MODEL_TIMEOUT_MS)
    sampling = {"max_new_tokens": 300, "stop_on_eos": False, "seed": 4}
    client.submit("a", HELLO, sampling)
    client.submit("b", [{"role": "user", "content": "Why is the sky blue?"}], sampling)
    waiter.waitUntil(lambda: {"a", "b"} <= set(recorder.results), timeout=MODEL_TIMEOUT_MS)
    client.shutdown()
    pieces = [len(recorder.texts[c]) for c in ("a", "b")]
    tokens = [recorder.results[c]["generated_tokens"] for c in ("a", "b")]
    return {
        "signals_per_reply": statistics.mean(pieces),
        "tokens_per_signal": sum(tokens) / sum(pieces),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of the event-loop and text scenarios")
    parser.add_argument("--soak-tabs", type=int, default=4)
    parser.add_argument("--soak-turns", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    app = QApplication.instance() or QApplication([])
    waiter = Waiter()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        model = write_tiny_gguf(root / "app-tiny.gguf", **APP_MODEL)
        loops, codes, texts, renders = [], [], [], []
        for run in range(args.runs + 1):  # the first run warms up
            fresh_home(root, f"loop{run}")
            loops.append(event_loop_run(waiter, model))
            fresh_home(root, f"code{run}")
            codes.append(event_loop_run(waiter, model, code=True))
            renders.append(render_run())
            fresh_home(root, f"text{run}")
            texts.append(text_signals_run(waiter, model))
        loop, text = median_of(loops[1:] or loops), median_of(texts[1:] or texts)
        code = median_of(codes[1:] or codes)
        render = median_of(renders[1:] or renders)

        fresh_home(root, "soak")
        cfg = WindowSoakConfig(n_tabs=args.soak_tabs, n_turns=args.soak_turns, seed=args.seed)
        window = open_window(waiter, model, **window_soak_settings(cfg))
        soak = WindowSoak(waiter, window, cfg)
        figures = soak.run()
        window.close()
        figures["violations"] = len(soak.violations)
    app.processEvents()

    results = {
        "event_loop": loop,
        "event_loop_code": code,
        "transcript_render": render,
        "text_signals": text | {"text_flush_s": worker_module.TEXT_FLUSH_S},
        "window_soak": figures,
        "runs": args.runs,
    }
    rows = [
        ("scenario", "figure", "value"),
        ("event loop, 4 tabs x 600 tokens", "probe lateness p50 / p99 / max",
         f"{loop['lateness_p50_ms']:.1f} / {loop['lateness_p99_ms']:.1f} / {loop['lateness_max_ms']:.1f} ms"),
        ("event loop, 4 tabs x 600 tokens", "tokens, duration", f"{loop['tokens']:.0f}, {loop['elapsed_s']:.1f} s"),
        ("event loop, 4 tabs, code replies", "probe lateness p50 / p99 / max",
         f"{code['lateness_p50_ms']:.1f} / {code['lateness_p99_ms']:.1f} / {code['lateness_max_ms']:.1f} ms"),
        ("render, 40 messages + a streaming code reply", "tail replaced: median / max",
         f"{render['tail_median_ms']:.1f} / {render['tail_max_ms']:.1f} ms"),
        ("render, 40 messages + a streaming code reply", "whole rebuilt: median / max (ratio)",
         f"{render['whole_median_ms']:.1f} / {render['whole_max_ms']:.1f} ms "
         f"({render['whole_median_ms'] / render['tail_median_ms']:.1f}x)"),
        ("worker text, 2 x 300 tokens", f"signals per reply (flush {worker_module.TEXT_FLUSH_S * 1000:.0f} ms)",
         f"{text['signals_per_reply']:.0f} ({text['tokens_per_signal']:.1f} tokens per signal)"),
        (f"window soak, {cfg.n_tabs} tabs x {cfg.n_turns} turns", "RSS start -> end",
         f"{figures['rss_start_mb']} -> {figures['rss_end_mb']} MB"),
        (f"window soak, {cfg.n_tabs} tabs x {cfg.n_turns} turns", "served / failed / refused, duration",
         f"{figures['requests_served']} / {figures['failed']} / {figures['rejected_queue_full']}, "
         f"{figures['duration_s']} s"),
        (f"window soak, {cfg.n_tabs} tabs x {cfg.n_turns} turns", "violations", str(figures["violations"])),
    ]  # fmt: skip
    report("app", results, rows, args.json)


if __name__ == "__main__":
    main()
