"""The stats dock: the KV cache and the batcher, live (the worker sends a snapshot every 250 ms).

Numbers, three sparklines over the last five minutes, and the KV sessions in LRU order (the first
idle one is the next to be evicted when memory or the session count runs out).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDockWidget,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHeaderView,
    QLabel,
    QProgressBar,
    QScrollArea,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..colors import colors
from ..wording import MiB
from .sparkline import Sparkline

MIN_WIDTH = 300
RECENT_S = 5.0  # "Avg batch size" beside its average since the start: the last seconds'

# objectName -> (label, what it means: the tooltip, also in the README)
STATS: dict[str, tuple[str, str]] = {
    "statSessions": ("Sessions", "Conversations with K/V in the cache (generating ones are pinned)"),
    "statMemory": (
        "Memory",
        "K/V bytes reserved by sessions, of them holding tokens, and the peak, "
        "against the byte limit (max_bytes_total)",
    ),
    "statHitRate": (
        "Cache reuse",
        "Prompt tokens taken from the cache, of all prompt tokens (the token reuse ratio); beside it the "
        "hit rate: requests that reused at least one cached token, of all requests",
    ),
    "statEvictions": ("Evictions", "Sessions dropped to make room (least recently used first)"),
    "statReusedTokens": (
        "Reused tokens",
        "Prompt tokens taken from the cache instead of computed, and their share of all prompt tokens",
    ),
    "statAvgBatchSize": (
        "Avg batch size",
        "Requests served per forward pass (rows per step) over the last 5 s, and since the engine started",
    ),
    "statAvgBatchWait": ("Avg batch wait", "Time a request waited in the queue before its first step"),
    "statQueueDepth": ("Avg queue depth", "Requests waiting, averaged over steps (now: waiting / running)"),
    "statTokensPerSec": (
        "Tokens/s",
        "Generated tokens per second, and prompt tokens computed per second, over the last 5 s, all tabs",
    ),
    "statTokensPerStep": (
        "Tokens per step",
        "Tokens a reply takes per step (the mean accepted length): 1.0 without drafts; more where replies "
        "repeat the conversation and the drafted tokens are accepted. Beside it: drafted and accepted tokens",
    ),
    "statTtft": ("TTFT p50", "Median time from Send to the first token of the reply"),
    "statPreemptions": (
        "Preemptions",
        "Replies paused to give their K/V memory to an older one; they resume by themselves",
    ),
    "statWaitingForMemory": ("Waiting for memory", "Requests queued until the KV budget has room for them"),
    "statKernels": (
        "Kernels",
        "What computes the model: the numba kernels or NumPy, on how many threads (Settings → Batching → "
        "CPU threads), and “activations: int8” while the 8-bit activations are on (faster, approximate)",
    ),
    "statDiskSessions": (
        "On disk",
        "Sessions whose K/V are saved on disk (evicted from memory, or their tab closed): they come back "
        "without recomputing, even after a restart",
    ),
    "statDiskBytes": ("Disk", "Bytes of the saved sessions' files, against the disk limit (max_disk_bytes)"),
    "statDiskHits": (
        "Disk hits",
        "Requests whose K/V were loaded from disk, the prompt tokens they reused and the last load's time",
    ),
    "statApiServer": (
        "API server",
        "The local OpenAI-compatible server (Tools → Local server…): its address, the API requests it "
        "has served and those in flight (other programs' requests, batched with the tabs)",
    ),
    "statApiKinds": (
        "API requests",
        "The local server's requests by kind: chat, JSON output (json_object, json_schema), tool calls, "
        "text completions, embeddings",
    ),
}

# The engine of the tab shown: for a remote one, its own figures (the groups above are the local engine's)
TAB_ENGINE_STATS: dict[str, tuple[str, str]] = {
    "statTabEngine": (
        "Engine",
        "The engine that answers in the tab shown (its picker at the top of the tab)",
    ),
    "statTabTokensPerSec": (
        "Tokens/s",
        "A server's speed as this app sees it: its last reply's tokens per second after the first token, "
        "and its generated tokens per second over the last 5 s",
    ),
    "statTabTtft": ("TTFT", "Time from Send to the first text of the server's last reply, and the median"),
}
DISK_STATS = ("statDiskSessions", "statDiskBytes", "statDiskHits")  # the disk tier's group
API_KIND_NAMES = {"chat": "chat", "json_object": "JSON", "json_schema": "JSON schema", "tools": "tools",
                  "completions": "completions", "embeddings": "embeddings"}  # fmt: skip


def compact_mib(n_bytes: float) -> str:
    """A size in about three digits for the dock's narrow rows (wording.mib gives two decimals)."""
    value = n_bytes / MiB
    return f"{value:,.0f} MiB" if value >= 100 else f"{value:,.1f} MiB" if value >= 1 else f"{value:,.2f} MiB"


class StatsDock(QDockWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Engine stats", parent)
        self.setObjectName("statsDock")
        self.setAllowedAreas(Qt.DockWidgetArea.LeftDockWidgetArea | Qt.DockWidgetArea.RightDockWidgetArea)
        self.labels: dict[str, QLabel] = {}
        self._last_steps = 0
        self._last_rows = 0.0
        self._recent: deque[tuple[float, int, float]] = deque()  # (time, steps, rows) of the last seconds
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.setContentsMargins(8, 4, 8, 8)
        self.memory_bar = QProgressBar(objectName="memoryBar", maximumHeight=8)
        self.memory_bar.setTextVisible(False)
        self.memory_bar.setToolTip("Reserved K/V memory against the limit (max_bytes_total)")
        layout.addWidget(self._group("KV cache", list(STATS)[:5]))
        layout.addWidget(self._group("KV on disk", list(DISK_STATS)))
        layout.addWidget(self._group("Batcher", [name for name in list(STATS)[5:] if name not in DISK_STATS]))
        layout.addWidget(self._group("This tab's engine", list(TAB_ENGINE_STATS)))
        self.tokens_plot = Sparkline("Tokens/s", "", "sparkline_tokens")
        self.memory_plot = Sparkline("Memory", "MiB", "sparkline_memory")
        self.batch_plot = Sparkline("Batch size", "", "sparkline_batch")
        for plot in (self.tokens_plot, self.memory_plot, self.batch_plot):
            layout.addWidget(plot)
        models_title = QLabel("<b>Local models</b> (memory, speed)")
        models_title.setWordWrap(True)
        layout.addWidget(models_title)
        self.model_table = QTableWidget(0, 4, objectName="modelTable")
        self.model_table.setHorizontalHeaderLabels(["Model", "State", "MiB", "Tok/s"])
        self.model_table.setToolTip(
            "Each local model: loaded or not, its weights' memory + its sessions' K/V memory (its "
            "sessions), the tokens it generates per second"
        )
        self._plain_table(self.model_table)
        self.model_table.setMinimumHeight(80)
        layout.addWidget(self.model_table)
        layout.addWidget(QLabel("<b>Sessions</b> (least recently used first)"))
        self.table = QTableWidget(0, 4, objectName="sessionTable")
        self.table.setHorizontalHeaderLabels(["Tab", "Tokens", "MiB", "State"])
        self._plain_table(self.table)
        header = self.table.horizontalHeader()  # the tab's name gets the rest (column 0 stretched)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Fixed)  # "idle · evicted next" wraps
        self.table.setColumnWidth(3, self.fontMetrics().horizontalAdvance("waiting to run") + 14)
        self.table.setWordWrap(True)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setMinimumHeight(110)
        layout.addWidget(self.table, 1)
        scroll = QScrollArea(objectName="statsScroll")  # a small window scrolls the dock, never clips it
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(body)
        self.body = body
        self.setWidget(scroll)
        self.setMinimumWidth(MIN_WIDTH)
        self.show_no_model()

    def _plain_table(self, table: QTableWidget) -> None:
        """A read-only table: no row numbers, no selection, the first column stretched."""
        table.verticalHeader().setVisible(False)
        table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        table.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        header = table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in range(1, table.columnCount()):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)

    def show_models(self, models: list[Mapping[str, Any]]) -> None:
        """Each local model: its state, weights in memory, its share of the KV cache, its speed (the
        worker's ``pool_stats_dict`` rows, or its model list when they change)."""
        self.model_table.setRowCount(len(models))
        for row, model in enumerate(models):
            weights = model["weights_bytes"] / MiB if model["state"] == "loaded" else 0.0
            kv = (
                f" + {model['reserved_bytes'] / MiB:.1f} ({model['sessions']})"
                if model.get("sessions")
                else ""
            )
            speed = f"{model['tokens_per_second']:.1f}" if "tokens_per_second" in model else "–"
            name = model["model_id"] + ("  (default)" if model.get("default") else "")
            for column, text in enumerate((name, model["state"], f"{weights:.0f}{kv}", speed)):
                item = self.model_table.item(row, column)
                if item is None:
                    item = QTableWidgetItem()
                    self.model_table.setItem(row, column, item)
                item.setText(text)
                if column >= 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def _group(self, title: str, names: list[str]) -> QGroupBox:
        box = QGroupBox(title)
        form = QFormLayout(box)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignLeft)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setContentsMargins(8, 6, 8, 6)
        form.setVerticalSpacing(3)
        for name in names:
            label, meaning = STATS.get(name) or TAB_ENGINE_STATS[name]
            value = QLabel("–", objectName=name)
            value.setWordWrap(True)
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            value.setToolTip(meaning)
            caption = QLabel(label)
            caption.setToolTip(meaning)
            form.addRow(caption, value)
            self.labels[name] = value
            if name == "statMemory":
                form.addRow("", self.memory_bar)
        return box

    def show_no_model(self) -> None:
        for label in self.labels.values():
            label.setText("–")

    def update_stats(self, stats: Mapping[str, Any], titles: Mapping[str, str]) -> None:
        """Show one snapshot from the worker; ``titles`` maps conversation ids to tab names."""
        kv, metrics, limits = stats["kv"], stats["metrics"], stats["limits"]
        set_text = {name: label.setText for name, label in self.labels.items()}
        set_text["statSessions"](f"{kv['current_sessions']}  ({kv['pinned_sessions']} generating)")
        limit = kv["max_bytes_total"]
        set_text["statMemory"](
            f"{compact_mib(kv['current_bytes'])} reserved of {compact_mib(limit)}\n"
            f"{compact_mib(kv['used_bytes'])} used · peak {compact_mib(kv['peak_bytes'])}"
        )
        self.memory_bar.setMaximum(1000)
        self.memory_bar.setValue(int(1000 * min(1.0, kv["current_bytes"] / limit)) if limit else 0)
        misses = kv["misses"]
        set_text["statHitRate"](
            f"{kv['token_reuse_ratio']:.0%} of prompt tokens  (hit rate {kv['hit_rate']:.0%}: "
            f"{kv['hits']} hit{'s' * (kv['hits'] != 1)}, {misses} miss{'es' * (misses != 1)})"
        )
        set_text["statEvictions"](f"{kv['evictions']}")
        set_text["statReusedTokens"](
            f"{kv['reused_tokens']:,}  ({kv['token_reuse_ratio']:.0%} of prompt tokens)"
        )
        recent, since_start = self._recent_batch_size(metrics), metrics["average_batch_size"]
        set_text["statAvgBatchSize"](f"{recent:.2f} last 5 s  ({since_start:.2f} since start)")
        set_text["statAvgBatchWait"](f"{metrics['average_batch_wait_ms']:.1f} ms")
        set_text["statQueueDepth"](
            f"{metrics['average_queue_depth']:.2f}  (now {metrics['queue_depth']} waiting, "
            f"{metrics['running']} running)"
        )
        prompt_rate = metrics.get("prompt_tokens_per_second", 0.0)
        set_text["statTokensPerSec"](
            f"{metrics['tokens_per_second']:.1f} generated · {prompt_rate:,.0f} prompt"
        )
        set_text["statTtft"](f"{metrics['ttft_p50_ms']:.0f} ms" if metrics["ttft_p50_ms"] else "–")
        self._show_memory_pressure(metrics)
        self._show_drafting(metrics)
        self._show_api_server(stats.get("api"))
        self._show_kernels(stats.get("kernels"))
        self._show_disk(kv)
        if not limits.get("enabled", True):
            set_text["statSessions"]("KV cache disabled")
        self._add_points(kv, metrics)
        self._fill_table(stats["sessions"], titles)
        if "models" in stats:
            self.show_models(stats["models"])

    def show_tab_engine(self, label: str, figures: Mapping[str, Any] | None) -> None:
        """The engine of the tab shown: ``figures`` is a remote engine's (``worker.remote_stats``),
        None for the local engine (its figures are the groups above)."""
        self.labels["statTabEngine"].setText(label)
        if figures is None:
            self.labels["statTabTokensPerSec"].setText("see Batcher above")
            self.labels["statTabTtft"].setText("see Batcher above")
            return
        last_rate, last_ttft = figures.get("last_tokens_per_s"), figures.get("last_ttft_ms")
        rate = f"{last_rate:.1f} last reply · " if last_rate is not None else ""
        self.labels["statTabTokensPerSec"].setText(f"{rate}{figures['tokens_per_second']:.1f} now")
        if last_ttft is not None:
            ttft = f"{last_ttft:.0f} ms last reply"
        else:  # its first reply is under way, or none was asked yet
            ttft = "first reply under way" if figures.get("in_flight") else "no reply yet"
        median = f" · p50 {figures['ttft_p50_ms']:.0f} ms" if figures.get("ttft_p50_ms") else ""
        self.labels["statTabTtft"].setText(ttft + median)

    def _show_memory_pressure(self, metrics: Mapping[str, Any]) -> None:
        """Preemptions so far, and requests waiting for KV memory now."""
        self.labels["statPreemptions"].setText(f"{metrics.get('preemptions', 0):,}")
        self.labels["statWaitingForMemory"].setText(f"{metrics.get('waiting_for_memory', 0)}")

    def _show_disk(self, kv: Mapping[str, Any]) -> None:
        if not kv.get("disk_enabled"):
            for name in DISK_STATS:
                self.labels[name].setText("off")
            return
        failures = kv["disk_write_failures"]
        problem = f"\n{failures} write{'s' * (failures != 1)} failed (see the log)" if failures else ""
        self.labels["statDiskSessions"].setText(f"{kv['disk_sessions']:,}")
        self.labels["statDiskBytes"].setText(
            f"{compact_mib(kv['disk_bytes'])} of {compact_mib(kv['max_disk_bytes'])}{problem}"
        )
        load = f" · last load {kv['disk_load_ms']:.0f} ms" if kv["disk_hits"] else ""
        self.labels["statDiskHits"].setText(
            f"{kv['disk_hits']:,}  ({kv['disk_reused_tokens']:,} tokens{load})"
        )

    def _show_drafting(self, metrics: Mapping[str, Any]) -> None:
        """Tokens per step (speculative decoding), and drafted / accepted tokens so far."""
        per_step = metrics.get("mean_accepted_length", 0.0)
        drafted, accepted = metrics.get("drafted_tokens", 0), metrics.get("accepted_tokens", 0)
        self.labels["statTokensPerStep"].setText(
            f"{per_step:.2f}  ({accepted:,} of {drafted:,} drafted accepted)" if per_step else "–"
        )

    def _show_kernels(self, facts: Mapping[str, Any] | None) -> None:
        """'numba · 2 threads', and '· activations: int8' while the 8-bit activations run."""
        if not facts:
            self.labels["statKernels"].setText("–")
            return
        threads = int(facts.get("threads", 0))
        text = f"{facts.get('path') or '?'} · {threads} thread{'s' * (threads != 1)}"
        if facts.get("activations") == "int8":
            text += " · activations: int8"
        self.labels["statKernels"].setText(text)

    def _show_api_server(self, api: Mapping[str, Any] | None) -> None:
        if not api:
            self.labels["statApiServer"].setText("off")
            self.labels["statApiKinds"].setText("–")
            return
        self.labels["statApiServer"].setText(
            f"{api['url']}  ({api['served']:,} served, {api['in_flight']} in flight)"
        )
        kinds = {kind: n for kind, n in api.get("kinds", {}).items() if n}
        shown = " · ".join(f"{API_KIND_NAMES.get(kind, kind)} {n:,}" for kind, n in sorted(kinds.items()))
        self.labels["statApiKinds"].setText(shown or "none yet")

    def _add_points(self, kv: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        self.tokens_plot.add(metrics["tokens_per_second"])
        self.memory_plot.add(kv["current_bytes"] / MiB)
        steps = metrics["steps"]
        rows = metrics["average_batch_size"] * steps
        if steps < self._last_steps:  # a new engine (another model): counters restarted
            self._last_steps, self._last_rows = 0, 0.0
        new_steps = steps - self._last_steps
        self.batch_plot.add((rows - self._last_rows) / new_steps if new_steps else 0.0)
        self._last_steps, self._last_rows = steps, rows

    def _recent_batch_size(self, metrics: Mapping[str, Any]) -> float:
        """Rows per step over the last ``RECENT_S`` seconds (the average since the start hides a change:
        1.2 while three tabs generate, after a long while of one)."""
        now, steps = time.monotonic(), metrics["steps"]
        rows = metrics["average_batch_size"] * steps
        if self._recent and steps < self._recent[-1][1]:  # a new engine: its counters started again
            self._recent.clear()
        self._recent.append((now, steps, rows))
        while len(self._recent) > 2 and now - self._recent[1][0] >= RECENT_S:
            self._recent.popleft()
        _, first_steps, first_rows = self._recent[0]
        if steps > first_steps:
            return (rows - first_rows) / (steps - first_steps)
        return metrics["average_batch_size"] if len(self._recent) == 1 else 0.0

    def _fill_table(self, sessions: list[Mapping[str, Any]], titles: Mapping[str, str]) -> None:
        self.table.setRowCount(len(sessions))
        idle = [i for i, s in enumerate(sessions) if not s["pinned"] and not s.get("waiting")]
        next_evicted = idle[0] if idle else None  # the LRU policy's choice: the oldest idle session
        several_models = (
            len({s.get("model") for s in sessions} - {"", None}) > 1
        )  # then each row names its own
        for row, session in enumerate(sessions):
            sid = session["session_id"]
            if session["pinned"]:
                state = "generating"
            elif session.get("waiting"):
                state = "waiting to run"
            elif row == next_evicted:
                state = "idle · evicted next"
            else:
                state = "idle"
            title = titles.get(sid, sid[:8])
            cells = [
                f"{title} · {session['model']}" if several_models and session.get("model") else title,
                f"{session['n_tokens']:,}",
                f"{session['reserved_bytes'] / MiB:.2f}",
                state,
            ]
            for column, text in enumerate(cells):
                item = self.table.item(row, column)
                if item is None:
                    item = QTableWidgetItem()
                    self.table.setItem(row, column, item)
                item.setText(text)
                item.setToolTip(text if column in (0, 3) else "")  # a long tab name ends in "…"
                if column in (1, 2):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                item.setForeground(QColor(colors()["busy" if session["pinned"] else "text"]))

    def restyle(self) -> None:
        """The theme changed: the plots repaint with its colors (the table's rows at the next update)."""
        for plot in (self.tokens_plot, self.memory_plot, self.batch_plot):
            plot.update()
