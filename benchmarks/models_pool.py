"""The two-models-at-once part of ``bench_models.py`` (a library, no table of its own): SmolLM2 and
Gemma 3 in one ``ModelPool`` driven by one thread, as two tabs on two models are served.

- decode tokens/s of each model alone and while the other streams at once, in rounds that alternate
  alone / alone / both in one run; "at once" counts the tokens each model made in the window where
  both were streaming, so neither is flattered by finishing alone;
- whether both replies equal each model's own greedy reply;
- a load on demand (``pool.lease``) against the bare load of the same file (the pool's overhead);
- resident memory after loading each model alone and both, each in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from common import ROOT, report

from engine import BatchingOptions, GenerationEvent, InferenceOptions, download
from engine.model_pool import ModelPool, ModelPoolOptions, load_files

N_NEW = 96
PROMPTS = {
    "smollm2-135m": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
    "gemma3-270m": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
}

RSS_SCRIPT = """
import json, sys, time
from engine import kernels
from engine.model_pool import ModelPool
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
kernels.warm_up()
models = json.loads(sys.argv[1])
pool = ModelPool(models)
before = rss_mb()
for model_id in models:
    pool.lease(model_id)
print(json.dumps({"rss_mb": rss_mb() - before, "weights_mb": pool.loaded_bytes / 2**20}))
pool.stop()
"""


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")  # fmt: skip


class Timed:
    """A request's events with their times."""

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self.ended = 0.0

    def __call__(self, event: GenerationEvent) -> None:
        now = time.perf_counter()
        if event.kind == "token" or (event.kind == "done" and event.token_ids):
            self.token_times += [now] * max(1, len(event.token_ids))
        if event.result is not None:
            self.ended = now


def rate(timed: Timed, start: float, end: float) -> float:
    """Tokens/s of a request within [start, end]."""
    n = sum(1 for t in timed.token_times if start < t <= end)
    return n / (end - start) if end > start else 0.0


def run(pool: ModelPool, model_ids: list[str], options: InferenceOptions) -> dict[str, Any]:
    """Submit one request per model at once; each one's tokens/s while all stream, and its tokens."""
    timed = {m: Timed() for m in model_ids}
    handles = {m: pool.submit(m, PROMPTS[m], options, on_event=timed[m]) for m in model_ids}
    results = {m: h.result(600) for m, h in handles.items()}
    start = max(t.token_times[1] for t in timed.values())  # every model is decoding (after its 1st token)
    end = min(t.ended for t in timed.values())
    return {m: {"tokens_per_s": rate(timed[m], start, end), "token_ids": results[m].token_ids,
                "finish_reason": results[m].finish_reason} for m in model_ids}  # fmt: skip


def streaming(pool: ModelPool, model_ids: list[str], rounds: int) -> dict[str, Any]:
    greedy = InferenceOptions(temperature=0.0, max_new_tokens=N_NEW, stop_on_eos=False)
    alone: dict[str, list[float]] = {m: [] for m in model_ids}
    both: dict[str, list[float]] = {m: [] for m in model_ids}
    same: list[bool] = []
    for _ in range(rounds):
        single = {m: run(pool, [m], greedy)[m] for m in model_ids}
        together = run(pool, model_ids, greedy)
        for m in model_ids:
            alone[m].append(single[m]["tokens_per_s"])
            both[m].append(together[m]["tokens_per_s"])
            same.append(single[m]["token_ids"] == together[m]["token_ids"])
    return {
        m: {"alone_tokens_per_s": median(alone[m]), "at_once_tokens_per_s": median(both[m]),
            "share_of_alone": median(b / a for a, b in zip(alone[m], both[m], strict=True)),
            "rounds": rounds}
        for m in model_ids
    } | {"replies_equal_own_greedy": all(same)}  # fmt: skip


def load_overhead(models: dict[str, str]) -> dict[str, Any]:
    """A load through the pool (lease of a model on disk) against the bare load, alternating."""
    out = {}
    for model_id, path in models.items():
        bare, pooled = [], []
        for _ in range(2):
            started = time.perf_counter()
            load_files(path)
            bare.append(time.perf_counter() - started)
            pool = ModelPool({model_id: path})
            started = time.perf_counter()
            pool.lease(model_id)
            pooled.append(time.perf_counter() - started)
            pool.stop()
        out[model_id] = {"bare_load_s": min(bare), "pool_load_s": min(pooled),
                         "overhead_ms": (min(pooled) - min(bare)) * 1000}  # fmt: skip
    return out


def memory(models: dict[str, str]) -> dict[str, Any]:
    def rss(subset: dict[str, str]) -> dict[str, float]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(subset)], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    each = {m: rss({m: p}) for m, p in models.items()}
    both = rss(models)
    total = sum(r["rss_mb"] for r in each.values())
    return {"each_rss_mb": {m: r["rss_mb"] for m, r in each.items()}, "both_rss_mb": both["rss_mb"],
            "both_over_sum": both["rss_mb"] / total, "weights_mb": both["weights_mb"]}  # fmt: skip


SWITCH_SCRIPT = """
import json, os, sys, time
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6.QtCore import QEventLoop, QTimer
from PySide6.QtWidgets import QApplication
from smallmind_app import create_window
app = QApplication([])
smol, gemma, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
gemma_name = os.path.basename(gemma)[: -len(".gguf")]
smol_name = os.path.basename(smol)[: -len(".gguf")]

def wait(ready, timeout=600.0):
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        loop = QEventLoop()
        QTimer.singleShot(1, loop.quit)
        loop.exec()

window = create_window()
wait(lambda: bool(window.model_info))
tab = window.chat_tabs[0]
pool = window.client.worker.local.pool

def switch(engine_id, name):
    picker = tab.engine_picker
    wait(lambda: picker.findData(engine_id) >= 0)
    index = picker.findData(engine_id)
    started = time.perf_counter()
    picker.setCurrentIndex(index)
    picker.activated.emit(index)
    wait(lambda: tab.engine.model_state == ("ready", name) and tab.engine.model_ready_at > started)
    return (tab.engine.model_ready_at - started) * 1000

out = {"to_loaded_ms": [], "to_disk_ms": [], "load_s": []}
for _ in range(rounds):
    out["to_disk_ms"].append(switch("model:" + gemma, gemma_name))  # on disk: loaded for this tab
    out["load_s"].append(next(m.load_s for m in pool.models() if m.model_id == gemma_name))
    out["to_loaded_ms"].append(switch("local", smol_name))  # back to SmolLM2, loaded
    out["to_loaded_ms"].append(switch("model:" + gemma, gemma_name))  # Gemma again, loaded now
    out["to_loaded_ms"].append(switch("local", smol_name))
    wait(lambda: pool.unload(gemma_name))  # on disk again for the next round
window.close()
print(json.dumps(out))
"""


def switching(models: dict[str, str], rounds: int) -> dict[str, Any]:
    """The real window (offscreen, its own SMALLMIND_HOME): a tab switched between SmolLM2 (loaded)
    and Gemma 3 (on disk, then loaded); the time from the pick to the tab saying its model is ready."""
    with tempfile.TemporaryDirectory(prefix="smallmind-switch-") as home:
        models_dir = Path(home) / "data" / "models"
        models_dir.mkdir(parents=True)
        for path in models.values():
            (models_dir / Path(path).name).symlink_to(path)
        smol, gemma = (str(models_dir / Path(p).name) for p in models.values())
        env = {"NUMBA_CACHE_DIR": str(ROOT / ".cache" / "numba"), **os.environ, "PYTHONPATH": str(ROOT),
               "SMALLMIND_HOME": home, "SMALLMIND_MODEL": smol}  # fmt: skip
        done = subprocess.run([sys.executable, "-c", SWITCH_SCRIPT, smol, gemma, str(rounds)], cwd=ROOT,
                              env=env, capture_output=True, text=True, check=True)  # fmt: skip
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    overhead = [t - s * 1000 for t, s in zip(raw["to_disk_ms"], raw["load_s"], strict=True)]
    return {"to_loaded_ms_max": max(raw["to_loaded_ms"]), "to_loaded_ms_median": median(raw["to_loaded_ms"]),
            "to_disk_ms_median": median(raw["to_disk_ms"]), "load_s_median": median(raw["load_s"]),
            "to_disk_over_load_ms_max": max(overhead), "raw": raw}  # fmt: skip


def pool_report(quick: bool, json_path: str | None) -> None:
    specs = [download.DEFAULT_MODEL, download.GEMMA3_270M]
    models = {
        s.key: str(download.default_model_path(s)) for s in specs if download.default_model_path(s).is_file()
    }
    if len(models) < 2:
        print("the pool figures need both SmolLM2 and Gemma 3 installed; skipped")
        return
    load_at_start = os.getloadavg()[0]
    pool = ModelPool(models, ModelPoolOptions(), BatchingOptions())
    pool.start()
    for model_id in models:  # loaded and warm before any timing
        pool.lease(model_id)
        pool.release(model_id)
        run(pool, [model_id], InferenceOptions(temperature=0.0, max_new_tokens=8, stop_on_eos=False))
    results: dict[str, Any] = {"cpu": cpu_model(), "load_average_start": load_at_start}
    results["streaming"] = streaming(pool, list(models), 2 if quick else 3)
    pool.stop()
    results["load"] = load_overhead(models)
    results["switching"] = switching(models, 2 if quick else 3)
    results["memory"] = memory(models)
    results["load_average_end"] = os.getloadavg()[0]
    s, mem = results["streaming"], results["memory"]
    rows = [("model", "alone decode", "both at once", "share of alone (target ≥ 40%)", "load: pool / bare",
             "RSS alone")]  # fmt: skip
    for m in models:
        load = results["load"][m]
        rows.append((m, f"{s[m]['alone_tokens_per_s']:.1f} tok/s", f"{s[m]['at_once_tokens_per_s']:.1f} tok/s",
                     f"{s[m]['share_of_alone']:.0%}", f"{load['pool_load_s']:.2f} s / {load['bare_load_s']:.2f} s "
                     f"({load['overhead_ms']:+.0f} ms)", f"{mem['each_rss_mb'][m]:.0f} MiB"))  # fmt: skip
    rows.append(("both", "", "", f"replies equal own greedy: {s['replies_equal_own_greedy']}", "",
                 f"{mem['both_rss_mb']:.0f} MiB ({mem['both_over_sum']:.0%} of the sum; target ≤ 110%)"))  # fmt: skip
    sw = results["switching"]
    rows.append(("a tab switching", f"to a loaded model: {sw['to_loaded_ms_median']:.0f} ms median, "
                 f"{sw['to_loaded_ms_max']:.0f} ms max (target < 100)", "", "",
                 f"to Gemma on disk: {sw['to_disk_ms_median']:.0f} ms = its load {sw['load_s_median'] * 1000:.0f} ms "
                 f"+ at most {sw['to_disk_over_load_ms_max']:.0f} ms (target < 200)", ""))  # fmt: skip
    print(
        f"CPU: {results['cpu']}; load average {load_at_start:.1f} at the start, "
        f"{results['load_average_end']:.1f} at the end (2 cores shared with other work: noisy)"
    )
    report("models-pool", results, rows, json_path)
