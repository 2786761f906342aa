"""SmallMind against llama.cpp, measured fairly: every figure of both engines in its own process with
the user's environment, the engines alternating, best of several rounds (``anchor.py``); the CPU
model printed; each target of issue 24 marked met or missed.

    python benchmarks/bench_vs_llamacpp.py [--model PATH] [--rounds 3] [--threads N] [--quick]
                                           [--only decode,batched,...] [--json out.json]

Figures (SmolLM2-135M by default; greedy; drafting off, so both engines compute one token per
sequence per step):
  decode      single-stream decode of 128 tokens after a 32-token prompt
  batched     8 chat requests x 100 new tokens at once, aggregate (llama.cpp: its batch API, several
              sequences per llama_decode); with ``sequential`` it gives the seed's batching table
  prefill     a 256-token prompt in one forward
  long        decode at 6,144 tokens of context (our K/V cache in each dtype, llama.cpp's float16)
  memory      resident memory after load
  sequential  the same 8 requests one after another (the seed table's baseline)
  steps       our decode step of 8 and 16 sequences against the 1-sequence step (ours only)

Without llama-cpp-python (the optional ``bench`` extra) the llama.cpp column is empty and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from anchor import (
    USER_ENV,
    compare,
    cpu_flags,
    cpu_model,
    llama_cpp_defaults,
    llama_cpp_version,
    load_average,
    physical_cores,
    prompts,
    run_child,
)

FIGURES = ("decode", "batched", "prefill", "long", "memory", "sequential", "steps", "accuracy")
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference" / "smollm2-135m"
N_CONTEXT = 6144
ISSUE = "issue 24"


def default_model() -> str:
    return str(run_child("smallmind", "model_path", {})["path"])


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def verdict(value: float | None, target: float, at_most: bool = False) -> str:
    if value is None:
        return "not measured"
    met = value <= target if at_most else value >= target
    return f"{'≤' if at_most else '≥'} {target:g}x: {'met' if met else 'MISSED'}"


def measure(args: argparse.Namespace, model: str, ids: dict[str, Any]) -> dict[str, Any]:
    base = {"model": model, "threads": args.threads, "activations": args.activations}
    rounds, r = args.rounds, {}
    only = set(args.only.split(",")) if args.only else set(FIGURES)
    if "decode" in only:
        r["decode"] = compare("decode", {**base, "prompt_ids": ids["decode"], "n_new": 128}, rounds)
    if "batched" in only:
        spec = {**base, "messages": ids["chat_messages"], "prompt_ids": ids["chat_ids"], "n_new": 100}
        r["batched"] = compare("batched", spec, rounds)
    if "sequential" in only:
        spec = {**base, "messages": ids["chat_messages"], "prompt_ids": ids["chat_ids"], "n_new": 100}
        r["sequential"] = compare("sequential", spec, max(1, rounds - 1))
    if "prefill" in only:
        r["prefill"] = compare("prefill", {**base, "prompt_ids": ids["prefill"]}, rounds)
    if "long" in only:
        engines = {
            f"smallmind {d}": {"engine": "smallmind", "kv_dtype": d} for d in args.kv_dtypes.split(",")
        }
        engines["llama.cpp"] = {"engine": "llama.cpp"}
        engines["llama.cpp, flash attention off"] = {"engine": "llama.cpp", "flash_attn": 0}
        spec = {**base, "prompt_ids": ids["long"], "n_new": 16, "reps": 2}
        r["long"] = compare("long_decode", spec, max(1, rounds - 1), engines=engines)
    if "memory" in only:
        r["memory"] = compare("memory", base, rounds, key="rss_mib", lower_is_better=True)
    if "accuracy" in only and Path(model).name.startswith("SmolLM2-135M"):  # the reference's weights
        r["accuracy"] = compare("accuracy", {**base, "reference_dir": str(REFERENCE)}, 1,
                                key="max_rel_diff", lower_is_better=True)  # fmt: skip
    if "steps" in only:
        spec = {**base, "prompt_ids": ids["decode"]}
        r["steps"] = compare("steps", spec, rounds, key="ratio_8", lower_is_better=True,
                             engines={"smallmind": {"engine": "smallmind"}})  # fmt: skip
    return r


def table(r: dict[str, Any], kv_dtypes: list[str]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("figure (SmolLM2-135M)", "SmallMind", "llama.cpp", "ours / llama.cpp",
                                    f"target ({ISSUE})")]  # fmt: skip

    def tps(figure: dict[str, Any] | None, label: str) -> float | None:
        entry = figure.get(label) if figure else None
        return entry["tokens_per_s"] if entry else None

    def row(name: str, ours: float | None, theirs: float | None, target: float | None, unit: str) -> None:
        x = ratio(ours, theirs)
        rows.append((name, f"{ours:.1f} {unit}" if ours else "-", f"{theirs:.1f} {unit}" if theirs else "-",
                     f"{x:.2f}x" if x else "-", verdict(x, target) if target else ""))  # fmt: skip

    if "decode" in r:
        row("single-stream decode, 128 tokens", tps(r["decode"], "smallmind"),
            tps(r["decode"], "llama.cpp"), 1.0, "tok/s")  # fmt: skip
    if "batched" in r:
        row("8 requests x 100 tokens, aggregate (llama.cpp: batch API)", tps(r["batched"], "smallmind"),
            tps(r["batched"], "llama.cpp"), 1.3, "tok/s")  # fmt: skip
    if "prefill" in r:
        row(
            "prefill, 256 tokens",
            tps(r["prefill"], "smallmind"),
            tps(r["prefill"], "llama.cpp"),
            1.5,
            "tok/s",
        )
    if "long" in r:
        options = {
            "auto": tps(r["long"], "llama.cpp"),
            "off": tps(r["long"], "llama.cpp, flash attention off"),
        }
        fa, theirs = max(((k, v) for k, v in options.items() if v), key=lambda kv: kv[1], default=("-", None))
        other = {k: v for k, v in options.items() if k != fa and v}
        note = f"flash attention {fa}" + "".join(f"; {k}: {v:.1f}" for k, v in other.items())
        for i, d in enumerate(kv_dtypes):
            row(f"decode at {N_CONTEXT:,} tokens of context (our KV {d}; llama.cpp float16, its faster: {note})",
                tps(r["long"], f"smallmind {d}"), theirs, 1.0 if i == 0 else None, "tok/s")  # fmt: skip
    if "memory" in r:
        ours, theirs = r["memory"]["smallmind"], r["memory"].get("llama.cpp")
        file_mib = ours["file_mib"]
        x = ours["rss_mib"] / file_mib
        rows.append((f"resident memory after load (file {file_mib:.0f} MiB)",
                     f"{ours['rss_mib']:.0f} MiB ({x:.1f}x the file; +{ours['over_start_mib']:.0f} over start)",
                     f"{theirs['rss_mib']:.0f} MiB (+{theirs['over_start_mib']:.0f} over start)" if theirs else "-",
                     f"{ours['rss_mib'] / theirs['rss_mib']:.2f}x" if theirs else "-",
                     verdict(x, 3.0, at_most=True).replace("x:", "x the file:")))  # fmt: skip
    if "batched" in r and "sequential" in r:
        seq, bat = r["sequential"], r["batched"]
        x = ratio(tps(bat, "smallmind"), tps(seq, "smallmind"))
        y = ratio(tps(bat, "llama.cpp"), tps(seq, "llama.cpp"))
        rows.append(("seed table: 8 concurrent x 100 tokens vs one after another",
                     f"{tps(bat, 'smallmind'):.1f} vs {tps(seq, 'smallmind'):.1f} tok/s = {x:.2f}x",
                     f"{tps(bat, 'llama.cpp'):.1f} vs {tps(seq, 'llama.cpp'):.1f} tok/s = {y:.2f}x" if y else "-",
                     "", verdict(x, 5.0)))  # fmt: skip
    if "accuracy" in r:
        ours, theirs = r["accuracy"]["smallmind"], r["accuracy"].get("llama.cpp")
        rows.append((f"decode-step logits vs the float32 reference, max |diff| / max |logit| "
                     f"(our activations {ours['activations']})", f"{ours['max_rel_diff']:.1e}",
                     f"{theirs['max_rel_diff']:.1e}" if theirs else "-", "", ""))  # fmt: skip
    if "steps" in r:
        s = r["steps"]["smallmind"]
        ms = s["step_ms"]
        rows.append(("decode step of 8 rows / 1 row", f"{ms['8']:.1f} / {ms['1']:.1f} ms = {s['ratio_8']:.2f}x",
                     "", "", verdict(s["ratio_8"], 1.5, at_most=True)))  # fmt: skip
        rows.append(("decode step of 16 rows / 1 row", f"{ms['16']:.1f} / {ms['1']:.1f} ms = {s['ratio_16']:.2f}x",
                     "", "", verdict(s["ratio_16"], 2.0, at_most=True)))  # fmt: skip
    return rows


def same_tokens(r: dict[str, Any]) -> dict[str, str]:
    """How many greedy tokens the two engines agree on (llama.cpp quantizes activations to 8 bits,
    so its argmax can part from ours after a near tie: information, not a check)."""
    out = {}
    for name in ("decode", "batched"):
        a, b = (r.get(name) or {}).get("smallmind"), (r.get(name) or {}).get("llama.cpp")
        if not (a and b):
            continue
        x, y = a["token_ids"], b["token_ids"]
        if name == "decode":
            agree = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
            out[name] = f"first {agree} of {len(x)} tokens equal"
        else:
            out[name] = (
                f"{sum(p == q for p, q in zip(x, y, strict=False))} of {len(x)} requests' tokens equal"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M as installed)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure (best kept)")
    parser.add_argument("--threads", type=int, default=physical_cores(), help="threads for both engines")
    parser.add_argument("--kv-dtypes", default="float32,float16,q8_0", help="our K/V dtypes at long context "
                        "(the first is the one held to the target)")  # fmt: skip
    parser.add_argument("--activations", default="float32", choices=("float32", "int8"),
                        help="our kernels' activations (int8: the opt-in 8-bit mode, with AVX-512 VNNI)")  # fmt: skip
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--quick", action="store_true", help="one round per figure")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    version = llama_cpp_version()
    model = args.model or default_model()
    header = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": args.threads,
        "llama_cpp_python": version or "not installed", "model": model,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_average(),
        "user_env_omp": {k: v for k, v in USER_ENV.items() if k.startswith(("OMP_", "NUMBA_", "OPENBLAS"))},
    }  # fmt: skip
    print(f"CPU: {header['cpu']} ({header['cpu_flags']}); {args.threads} threads each; "
          f"llama-cpp-python {header['llama_cpp_python']}; load average {header['load_average_start']:.2f}",
          flush=True)  # fmt: skip
    if version is None:
        print("llama-cpp-python is not installed (pip install -e '.[bench]'): the llama.cpp column is "
              "empty; our figures are still measured.", flush=True)  # fmt: skip
    ids = prompts(model, N_CONTEXT)
    if version is not None:
        header["llama_cpp_settings"] = llama_cpp_defaults(model, args.threads).get(
            "note", "llama.cpp's defaults"
        )
    results = measure(args, model, ids)
    header["load_average_end"] = load_average()
    from common import git_commit

    document = {"benchmark": "vs_llamacpp", "machine": {**header, "commit": git_commit()},
                "results": results, "agreement": same_tokens(results)}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2, default=float))
    rows = table(results, args.kv_dtypes.split(","))
    print(f"\nCPU: {header['cpu']}; threads {args.threads}; llama-cpp-python {header['llama_cpp_python']}; "
          f"load average {header['load_average_start']:.2f} -> {header['load_average_end']:.2f}; "
          f"commit {document['machine']['commit']}; best of {args.rounds} alternating rounds")  # fmt: skip
    if "llama_cpp_settings" in header:
        print(f"llama.cpp settings: {header['llama_cpp_settings']}")
    for name, text in document["agreement"].items():
        print(f"greedy agreement, {name}: {text}")
    print()
    header_row, *body = rows
    print("| " + " | ".join(header_row) + " |")
    print("|" + "|".join("---" for _ in header_row) + "|")
    for line in body:
        print("| " + " | ".join(line) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
