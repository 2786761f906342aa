"""Print the hostile-input figures of docs/security.md's "Files, templates and remote engines": hostile
GGUF headers opened as the app does, hostile chat templates rendered, and a planted KV disk file under
the background driver. Each GGUF and template case runs in a fresh subprocess (killed after 20 s); its
peak RSS growth is read from VmHWM, reset just before the open or render (Linux).

    python scripts/hostile_files_figures.py          # this checkout
    cd ../main && python ../wt/i23-files/scripts/hostile_files_figures.py   # another checkout: its engine
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path.cwd()  # the engine measured (in subprocesses) is the current directory's checkout's
HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))  # the fixtures that write the hostile files: this script's checkout's

from tests.fixtures import hostile_files  # noqa: E402
from tests.fixtures.tiny_model import write_tiny_gguf  # noqa: E402

TIMEOUT_S = 20
MEASURE = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, ".")
from engine import Model, Tokenizer
from engine.gguf import GgufFile
status = Path("/proc/self/status")
def rss(key):
    return int(next(l for l in status.read_text().splitlines() if l.startswith(key)).split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from the RSS now
before, started = rss("VmRSS"), time.perf_counter()
try:
    if sys.argv[1] == "gguf":
        Model.from_gguf(GgufFile(sys.argv[2]))
        outcome = "loaded"
    else:
        tok = Tokenizer.from_gguf(sys.argv[2], chat_template=sys.argv[3])
        outcome = f"rendered {len(tok.apply_chat_template([{'role': 'user', 'content': 'hi'}])):,} chars"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
elapsed = time.perf_counter() - started
print(f"{elapsed:6.2f} s  peak RSS +{max(0, rss('VmHWM') - before) / 2**20:4.0f} MiB  {outcome[:110]}")
"""
PLANTED_KV = r"""
import importlib.util, logging, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, ".")
from engine import BatchedInferenceEngine, BatchingOptions, InferenceOptions, KvCacheOptions, LruKvCacheStore
from engine import GgufFile, Model, SessionId, Tokenizer
spec = importlib.util.spec_from_file_location("fixture", sys.argv[1] + "/tests/fixtures/hostile_files.py")
fixture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixture)  # this script's checkout's fixture, over the measured checkout's engine
rewrite_kv_header = fixture.rewrite_kv_header
from tests.fixtures.tiny_model import write_tiny_model
directory = Path(tempfile.mkdtemp())
f = GgufFile(write_tiny_model(directory / "tiny.gguf").path)
model, tok = Model.from_gguf(f), Tokenizer.from_gguf(f)
options, first = InferenceOptions(max_new_tokens=4), [{"role": "user", "content": "hello there"}]
def engine():
    store = LruKvCacheStore(KvCacheOptions(disk_dir=str(directory / "kv")))
    return BatchedInferenceEngine(model, tok, BatchingOptions(max_batch_wait_ms=0), store)
e = engine()
h = e.submit(first, options, session_id=SessionId("planted"))
while not h.done():
    e.step()
e.store.remove(SessionId("planted"), to_disk=True)
e.store.close()
(path,) = (directory / "kv").glob("*.kv")
rewrite_kv_header(path, lambda header: header.pop("model"))
tracebacks = []
class Count(logging.Handler):
    def emit(self, record):
        if record.exc_info:
            tracebacks.append(record)
logging.getLogger().addHandler(Count())
logging.getLogger().setLevel(logging.INFO)
e = engine()
planted = e.submit(first + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}],
                   options, session_id=SessionId("planted"))
other = e.submit([{"role": "user", "content": "unrelated"}], options, session_id=SessionId("other"))
e.start()
started = time.perf_counter()
while time.perf_counter() - started < 3 and not (planted.done() and other.done()):
    time.sleep(0.01)
ended = lambda h: h.result(0).finish_reason if h.done() else "not finished"
print(f"after {time.perf_counter() - started:.2f} s: planted {ended(planted)}, unrelated {ended(other)}, "
      f"{len(tracebacks)} tracebacks logged, the file {'is still there' if path.exists() else 'deleted'}")
e.stop(5)
"""
TEMPLATES = {
    "'a' * (messages|length*2e8)": "{{'a' * (messages|length*200000000)}}",
    "'a'|center(10**9)": "{{ 'a'|center(1000000000) }}",
    "nested range(100000) loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
    ),
    "10 ** 100000000": "{{ 10 ** 100000000 }}",
}


def run(*args: str) -> str:
    try:
        done = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=CHECKOUT, capture_output=True,
                              text=True, timeout=TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"still running after {TIMEOUT_S} s (killed)"
    return done.stdout.strip() or done.stderr.strip()[-200:]


def main() -> None:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    print(f"checkout {CHECKOUT}; {cpu or platform.processor()}; load average {os.getloadavg()[0]:.1f}")
    directory = Path(tempfile.mkdtemp())
    files = {
        "800k one-byte strings": hostile_files.write_many_strings_gguf(directory / "strings.gguf"),
        "400k one-byte entries": hostile_files.write_many_keys_gguf(directory / "keys.gguf"),
        "150k tensor infos": hostile_files.write_many_tensors_gguf(directory / "tensors.gguf"),
        "arrays nested 10k deep": hostile_files.write_nested_arrays_gguf(directory / "nested.gguf"),
    }
    for name, path in files.items():
        print(
            f"GGUF {name:24s} ({path.stat().st_size / 2**20:.1f} MiB): {run('gguf', str(path))}", flush=True
        )
    model = write_tiny_gguf(directory / "tiny.gguf")
    for name, template in TEMPLATES.items():
        print(f"template {name:28s}: {run('template', str(model), template)}", flush=True)
    done = subprocess.run([sys.executable, "-c", PLANTED_KV, str(HERE)], cwd=CHECKOUT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    print(f"KV file with a valid CRC and no 'model': {done.stdout.strip() or done.stderr.strip()[-300:]}")


if __name__ == "__main__":
    main()
