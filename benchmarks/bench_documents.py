"""Document libraries (engine/documents): indexing speed, search latency, and retrieval quality.

    python benchmarks/bench_documents.py [--files 2000] [--mb 50] [--queries 200] [--no-window]
                                         [--json out.json]

- corpus: ``--files`` files holding ``--mb`` MB of text, made here (nothing is downloaded): 40 are a
  gazetteer of invented towns written by this script (the labelled set below), the others are
  paragraphs drawn at random (fixed seed) from this Python's own standard library sources (PSF
  licence: read on this machine, never copied into the repository), as .py, .txt, .md and .html;
- index: a fresh ``update_library`` of the whole corpus (target: <= 60 s), then again with nothing
  changed, then after 20 files changed; while the fresh index runs in a thread, this thread wakes
  every 5 ms and records how late it woke (what a GUI thread would feel: the indexer holds the GIL);
- window: the real window (offscreen, the tiny app model) indexes the same corpus from Tools →
  Documents while a 5 ms timer on the GUI thread records its lateness (as bench_app.py does);
- search: ``index.search`` (BM25, 30 candidates) and ``retrieve`` (1,000-token budget) for the labelled
  questions and random queries of 2-6 corpus words (target: < 50 ms);
- quality: 40 questions about the gazetteer whose answer passage is known (the town's section holding
  the answer sentence); recall@5 (the answer among the first 5 passages) and MRR, BM25 only.
Nothing is asserted: the figures are printed with the CPU model and the machine's load (it is shared).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import peak_rss_mb, report

from engine.documents import DocumentIndex, retrieve, update_library

SEED = 20261129


def words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


PREFIXES = words(
    "Oster Kiln Bram Ash Thorn Mill Wyn Hart Stan Corn Elm Fen Gold Holl Lang Marsh Nor Ped Rook Sal"
)
SUFFIXES = words("vale moor wick bury ford ham stead ley combe worth by thorpe mouth field gate hollow ness cote "
                 "well burn")  # fmt: skip
RIVERS = words("Brenn Aldwater Tamsey Corrow Lisk Fennet Othery Garrow Mell Severin Dunmore Yarrow Ketter Hobb "
               "Wrenn")  # fmt: skip
TRADES = words(
    "wool glass salt copper cider lace timber pottery cheese rope paper bells clocks leather honey"
)
FOUNDERS = words(
    "wool merchants|monks|fishermen|miners|a Norman knight|river pilots|salt traders|weavers", "|"
)
MONTHS = words("January February March April May June July August September October November December")
FESTIVALS = words("lantern harvest kite boat apple bonfire music flower")
FILLER = [
    "The surrounding country is farmland divided by hedgerows and small woods.",
    "The roads to the coast were improved in the last century and a railway halt followed.",
    "Visitors come for the walks along the valley and the views from the ridge.",
    "The market square is lined with houses of local stone and a few timber-framed inns.",
    "Several families have farmed the same fields for generations.",
    "A parish school, a library and a small museum serve the town and the villages around it.",
    "The climate is mild, with wet winters and long summer evenings.",
    "Many of the old workshops have become homes, cafes and studios.",
    "The town council meets in a hall built on the site of the medieval market cross.",
    "Footpaths link the town with the neighbouring villages across the common land.",
]


@dataclass(frozen=True)
class Town:
    name: str
    river: str
    founded: int
    founder: str
    population: int
    trade: str
    arches: int
    festival: str
    month: str
    neighbours: tuple[str, str]


@dataclass(frozen=True)
class Question:
    text: str
    town: str  # the section (heading) that answers it
    answer: str  # a piece of the answer sentence, to tell the right passage


def make_towns(rng: random.Random, n: int = 400) -> list[Town]:
    names = [p + s for p in PREFIXES for s in SUFFIXES]
    rng.shuffle(names)
    names = names[:n]
    years = rng.sample(range(1050, 1890), n)
    towns = []
    for name, year in zip(names, years, strict=True):
        others = rng.sample([x for x in names if x != name], 2)
        towns.append(Town(name, rng.choice(RIVERS), year, rng.choice(FOUNDERS), rng.randrange(800, 40000),
                          rng.choice(TRADES), rng.randrange(2, 12), rng.choice(FESTIVALS), rng.choice(MONTHS),
                          (others[0], others[1])))  # fmt: skip
    return towns


def town_section(town: Town, rng: random.Random) -> str:
    t = town
    facts = [
        f"{t.name} is a market town on the river {t.river}, a day's walk from {t.neighbours[0]}.",
        f"It was founded in {t.founded} by {t.founder}.",
        f"About {t.population:,} people live there today.",
        f"For centuries the town has been known for its {t.trade}, traded as far as {t.neighbours[1]}.",
        f"The old stone bridge over the {t.river} has {t.arches} arches.",
        f"Every {t.month} the town holds a {t.festival} festival.",
    ]
    filler = " ".join(rng.sample(FILLER, 4))
    return f"## {t.name}\n\n{' '.join(facts)}\n\n{filler}\n"


def make_questions(towns: list[Town], rng: random.Random, n: int = 40) -> list[Question]:
    chosen = rng.sample(towns, n)
    questions = []
    kinds = ["founded", "river", "trade", "people", "arches", "festival", "combined", "combined"]
    for i, t in enumerate(chosen):
        kind = kinds[i % len(kinds)]
        if kind == "founded":
            q = Question(
                f"In what year was {t.name} established, and by whom?", t.name, f"founded in {t.founded}"
            )
        elif kind == "river":
            q = Question(f"Which river flows past {t.name}?", t.name, f"on the river {t.river}")
        elif kind == "trade":
            q = Question(f"What goods made {t.name} famous?", t.name, f"known for its {t.trade}")
        elif kind == "people":
            q = Question(f"How many inhabitants does {t.name} have?", t.name, f"{t.population:,} people")
        elif kind == "arches":
            q = Question(f"How many arches has the bridge at {t.name}?", t.name, f"{t.arches} arches")
        elif kind == "festival":
            q = Question(
                f"When is the {t.festival} festival held in {t.name}?", t.name, f"{t.festival} festival"
            )
        else:  # no name: the river and the year must find it
            q = Question(
                f"Which town on the {t.river} dates from {t.founded}?", t.name, f"founded in {t.founded}"
            )
        questions.append(q)
    return questions


def stdlib_paragraphs(limit_bytes: int = 40 << 20) -> list[str]:
    """Blank-line separated paragraphs of this Python's standard library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for paragraph in text.split("\n\n"):
            if len(paragraph) > 80:
                paragraphs.append(paragraph)
                total += len(paragraph)
        if total > limit_bytes:
            break
    return paragraphs


def as_html(text: str) -> str:
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    body = "\n".join(f"<p>{p}</p>" for p in escaped.split("\n\n"))
    return (
        f"<html><head><title>page</title><style>p{{margin:0}}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_corpus(folder: Path, n_files: int, n_bytes: int, rng: random.Random) -> tuple[list[Question], int]:
    towns = make_towns(rng)
    per_file = len(towns) // 40
    written = 0
    for k in range(40):
        sections = [town_section(t, rng) for t in towns[k * per_file : (k + 1) * per_file]]
        text = f"# Gazetteer, part {k + 1}\n\n" + "\n".join(sections)
        written += (folder / f"gazetteer-{k + 1:02}.md").write_text(text, encoding="utf-8")
    pool = stdlib_paragraphs()
    per_distractor = (n_bytes - written) // (n_files - 40)
    suffixes = [".py", ".txt", ".md", ".html"]
    for i in range(n_files - 40):
        parts, size = [], 0
        while size < per_distractor:
            parts.append(rng.choice(pool))
            size += len(parts[-1]) + 2
        text = "\n\n".join(parts)
        suffix = suffixes[i % len(suffixes)]
        sub = folder / f"part{i % 20:02}"
        sub.mkdir(exist_ok=True)
        text = as_html(text) if suffix == ".html" else text
        written += (sub / f"doc{i:04}{suffix}").write_text(text, encoding="utf-8")
    return make_questions(towns, rng), written


class LatenessProbe:
    """Wakes every 5 ms on this thread and records how late each wake-up came (ms)."""

    def __init__(self) -> None:
        self.lateness_ms: list[float] = []

    def run_until(self, done: threading.Event) -> None:
        while not done.is_set():
            started = time.perf_counter()
            time.sleep(0.005)
            self.lateness_ms.append(max(0.0, (time.perf_counter() - started) * 1000 - 5.0))

    def summary(self) -> dict[str, float]:
        values = sorted(self.lateness_ms) or [0.0]
        return {"probes": len(values), "p50_ms": statistics.median(values),
                "p99_ms": values[int(0.99 * (len(values) - 1))], "max_ms": values[-1]}  # fmt: skip


def timed_ms(fn, *args, **kwargs) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return (time.perf_counter() - started) * 1000, out


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": statistics.median(ordered), "p95_ms": ordered[int(0.95 * (len(ordered) - 1))],
            "max_ms": ordered[-1]}  # fmt: skip


def quality(index: DocumentIndex, questions: list[Question]) -> dict[str, float]:
    ranks = []
    for q in questions:
        hits = index.search(["corpus"], q.text, limit=30)
        rank = next((i + 1 for i, h in enumerate(hits) if h.heading == q.town and q.answer in h.text), None)
        ranks.append(rank)
    found5 = sum(1 for r in ranks if r is not None and r <= 5)
    return {"questions": len(questions), "recall_at_1": sum(1 for r in ranks if r == 1) / len(ranks),
            "recall_at_5": found5 / len(ranks), "mrr": sum(1 / r for r in ranks if r) / len(ranks)}  # fmt: skip


def random_queries(rng: random.Random, index: DocumentIndex, n: int) -> list[str]:
    words = " ".join(rng.choice(stdlib_paragraphs(2 << 20)) for _ in range(200)).split()
    words = [w.strip("()[]{}.,:;'\"=") for w in words if w.isascii() and len(w) > 3]
    return [" ".join(rng.sample(words, rng.randrange(2, 7))) for _ in range(n)]


def window_lateness(corpus: Path, root: Path) -> dict[str, float] | None:
    """The real window (offscreen, tiny model) indexes ``corpus`` through Tools → Documents while a
    5 ms timer on the GUI thread records how late it fires (as bench_app.py's event-loop probe)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QElapsedTimer, QEventLoop, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from smallmind_app import create_window
    from tests.fixtures.tiny_model import write_tiny_gguf
    from tests.fixtures.window import APP_MODEL

    app = QApplication.instance() or QApplication([])
    os.environ["SMALLMIND_HOME"] = str(root / "home")  # this script's own settings and index
    os.environ["SMALLMIND_MODEL"] = str(write_tiny_gguf(root / "app-tiny.gguf", **APP_MODEL))
    window = create_window()
    window.show()
    loop = QEventLoop()

    def run_until(ready, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not ready() and time.monotonic() < deadline:
            QTimer.singleShot(5, loop.quit)
            loop.exec()

    run_until(lambda: bool(window.model_info), 120)
    if not hasattr(window, "documents"):  # an app without the Documents dialog yet
        window.close()
        return None
    lateness: list[float] = []
    clock = QElapsedTimer()
    probe = QTimer(interval=5, timerType=Qt.TimerType.PreciseTimer)

    def tick() -> None:
        if clock.isValid():
            lateness.append(max(0.0, clock.nsecsElapsed() / 1e6 - 5.0))
        clock.restart()

    probe.timeout.connect(tick)
    done: dict[str, object] = {}
    window.documents.client.indexer.finished.connect(lambda name, report: done.update(report))
    started = time.perf_counter()
    probe.start()
    window.documents.open_dialog()
    window.documents.add_library("corpus", [str(corpus)])
    run_until(lambda: bool(done), 600)
    probe.stop()
    elapsed_s = time.perf_counter() - started
    window.close()
    app.processEvents()
    return {**percentiles_of(lateness), "elapsed_s": elapsed_s, "probes": len(lateness)}


def percentiles_of(values: list[float]) -> dict[str, float]:
    ordered = sorted(values) or [0.0]
    return {"p50_ms": statistics.median(ordered), "p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
            "max_ms": ordered[-1]}  # fmt: skip


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-window", dest="window", action="store_false",
                        help="skip the window's event-loop probe while it indexes the corpus")  # fmt: skip
    args = parser.parse_args()
    rng = random.Random(SEED)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        corpus = root / "corpus"
        corpus.mkdir()
        questions, n_bytes = write_corpus(corpus, args.files, int(args.mb * 1e6), rng)
        index = DocumentIndex(root / "documents.sqlite3")
        index.create_library("corpus", [corpus])

        probe, done, box = LatenessProbe(), threading.Event(), {}

        def index_all() -> None:
            with DocumentIndex(index.path) as own:  # the indexer's own connection, as in the app
                box["report"] = update_library(own, "corpus")
            done.set()

        worker = threading.Thread(target=index_all)
        worker.start()
        probe.run_until(done)
        worker.join()
        fresh = box["report"]
        load_during = os.getloadavg()
        unchanged = update_library(index, "corpus")
        for path in sorted(corpus.rglob("doc00[0-1]?.txt"))[:20]:
            path.write_text(path.read_text(encoding="utf-8") + "\n\nOne more paragraph.\n", encoding="utf-8")
        changed = update_library(index, "corpus")

        queries = [q.text for q in questions] + random_queries(
            rng, index, max(0, args.queries - len(questions))
        )
        for q in queries[:10]:  # warm the page cache
            index.search(["corpus"], q)
        search_ms = [timed_ms(index.search, ["corpus"], q, 30)[0] for q in queries]
        retrieve_ms = [timed_ms(retrieve, index, ["corpus"], q, 1000)[0] for q in queries]
        scores = quality(index, questions)
        info = index.library("corpus")
        db_mb = sum(p.stat().st_size for p in root.glob("documents.sqlite3*")) / 1e6
        index.close()
        window = window_lateness(corpus, root) if args.window else None

    results = {
        "cpu_model": cpu_model(),
        "load_average_before": load_before,
        "load_average_after_index": load_during,
        "corpus": {"files": args.files, "mb": n_bytes / 1e6, "passages": info.n_passages, "index_mb": db_mb},
        "index_fresh": {"elapsed_s": fresh.elapsed_s, "files": fresh.n_files, "read": fresh.n_read,
                        "skipped": len(fresh.skipped), "mb_per_s": n_bytes / 1e6 / fresh.elapsed_s},
        "index_unchanged_s": unchanged.elapsed_s,
        "index_20_changed": {"elapsed_s": changed.elapsed_s, "read": changed.n_read},
        "probe_lateness_while_indexing": probe.summary(),
        "search": percentiles(search_ms),
        "retrieve_1000_tokens": percentiles(retrieve_ms),
        "quality_bm25": scores,
        "peak_rss_mb": peak_rss_mb(),
        "window_while_indexing": window,
    }  # fmt: skip
    lat = results["probe_lateness_while_indexing"]
    s, r = results["search"], results["retrieve_1000_tokens"]
    rows = [
        ("figure", "value", "target"),
        ("CPU (lscpu model name)", results["cpu_model"], ""),
        ("load average 1/5/15 min before; after indexing",
         f"{load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}; {load_during[0]:.1f}", "shared machine"),
        ("corpus", f"{args.files} files, {n_bytes / 1e6:.1f} MB, {info.n_passages:,} passages; index {db_mb:.0f} MB", ""),
        ("index, fresh", f"{fresh.elapsed_s:.1f} s ({n_bytes / 1e6 / fresh.elapsed_s:.1f} MB/s)", "<= 60 s"),
        ("index, nothing changed; 20 files changed", f"{unchanged.elapsed_s:.2f} s; {changed.elapsed_s:.2f} s", ""),
        ("5 ms probe lateness while indexing p50 / p99 / max",
         f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} / {lat['max_ms']:.1f} ms", "p99 < 50 ms"),
        (f"search (BM25, 30 candidates), {len(queries)} queries median / p95 / max",
         f"{s['median_ms']:.1f} / {s['p95_ms']:.1f} / {s['max_ms']:.1f} ms", "< 50 ms"),
        ("retrieve (1,000-token budget) median / p95 / max",
         f"{r['median_ms']:.1f} / {r['p95_ms']:.1f} / {r['max_ms']:.1f} ms", "< 50 ms"),
        (f"quality, {scores['questions']} labelled questions: recall@1 / recall@5 / MRR",
         f"{scores['recall_at_1']:.2f} / {scores['recall_at_5']:.2f} / {scores['mrr']:.2f}", "recall@5 >= 0.8"),
        ("peak RSS", f"{results['peak_rss_mb']:.0f} MB", ""),
    ]  # fmt: skip
    if window is not None:
        rows.append(("window: indexing the corpus from Tools → Documents (s)", f"{window['elapsed_s']:.1f} s",
                     "<= 60 s"))  # fmt: skip
        rows.append(("window: GUI event-loop lateness (5 ms probe) while indexing p50 / p99 / max",
                     f"{window['p50_ms']:.1f} / {window['p99_ms']:.1f} / {window['max_ms']:.1f} ms",
                     "p99 < 50 ms"))  # fmt: skip
    report("documents", results, rows, args.json)


if __name__ == "__main__":
    main()
