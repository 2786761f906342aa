"""The long soak, for the README's "Reliability" section: 8 conversations x 30 turns against the real
engine under cancels, closed tabs, queue bursts and live settings changes (the driver is
tests/fixtures/soak.py, shared with tests/engine/test_soak.py).

    python benchmarks/soak.py [--model tiny|PATH] [--driver threads|step|both] [--conversations 8]
                              [--turns 30] [--max-prompt-tokens 1500] [--max-new-tokens 16]
                              [--seed N] [--json out.json]

The default model is the tiny random-weight Llama with a 2,048-token context (so 1,500-token prompts
fit); ``--model PATH`` runs a real GGUF (SmolLM2: use fewer turns and shorter prompts). Prints the
figures (requests served, cancels, evictions, peak KV bytes, RSS, max inter-token latency, duration)
as JSON and a table; exits 1 if an invariant was violated or a wait timed out. Nothing is timed
against a threshold: the figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import report

from engine import Model, Tokenizer
from engine.gguf import GgufFile
from tests.fixtures.soak import SoakConfig, SoakFailure, soak
from tests.fixtures.tiny_model import write_tiny_gguf

COLUMNS = (
    ("driver", "driver"),
    ("requests_served", "served"),
    ("cancels", "cancels"),
    ("timeouts", "timeouts"),
    ("failed_budget", "budget errors"),
    ("rejected_queue_full", "queue full"),
    ("tabs_closed", "tabs closed"),
    ("settings_changes", "settings changes"),
    ("evictions", "evictions"),
    ("peak_kv_bytes", "peak KV bytes"),
    ("rss_start_mb", "RSS start MB"),
    ("rss_end_mb", "RSS end MB"),
    ("max_inter_token_ms", "max inter-token ms"),
    ("duration_s", "duration s"),
    ("violations", "violations"),
)


def load(model: str, workdir: Path) -> tuple[Model, Tokenizer, str]:
    if model == "tiny":
        path = write_tiny_gguf(workdir / "tiny2k.gguf", context_length=2048)
        name = "tiny (2 layers, D=64, 2,048-token context)"
    else:
        path, name = Path(model), Path(model).name
    f = GgufFile(path)
    return Model.from_gguf(f), Tokenizer.from_gguf(f), name


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="'tiny' (default) or a GGUF path")
    parser.add_argument("--driver", choices=("threads", "step", "both"), default="threads")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--max-prompt-tokens", type=int, default=1500)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    drivers = ("threads", "step") if args.driver == "both" else (args.driver,)
    results: dict[str, Any] = {"runs": []}
    rows: list[tuple[str, ...]] = [("model", *(title for _, title in COLUMNS))]
    failed = False
    with tempfile.TemporaryDirectory() as workdir:
        model, tok, name = load(args.model, Path(workdir))
        results["model"] = name
        for driver in drivers:
            config = SoakConfig(
                n_conversations=args.conversations,
                n_turns=args.turns,
                max_prompt_tokens=args.max_prompt_tokens,
                max_new_tokens=args.max_new_tokens,
                driver=driver,
                seed=args.seed,
            )
            try:
                figures, violations = soak(model, tok, config)
            except SoakFailure as exc:  # a wait timed out: report it and go on to the next driver
                print(f"soak ({driver}) hung: {exc}", file=sys.stderr)
                results["runs"].append({"driver": driver, "hung": str(exc).splitlines()[0]})
                failed = True
                continue
            figures["violation_messages"] = violations[:20]
            failed |= bool(violations)
            results["runs"].append(figures)
            rows.append((name, *(f"{figures[key]:,}" if isinstance(figures[key], int) else str(figures[key])
                                 for key, _ in COLUMNS)))  # fmt: skip
    report("soak", results, rows, args.json)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
