"""Print how close the engine is to the float32 reference: SmolLM2's last-position logits (max |diff|
relative to max |logit|, bar 1e-3) and greedy continuations, for the six reference prompts.

    python scripts/reference_check.py            # the kernels the engine picks (numba when installed)
    SMALLMIND_KERNELS=numpy python scripts/reference_check.py
    python scripts/reference_check.py --kv-dtype q8_0   # through a float16 or 8-bit KV cache
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.gguf import GgufFile  # noqa: E402
from engine.model import Model  # noqa: E402
from tests.conftest import _INSTALLED_SMOLLM2  # noqa: E402
from tests.engine.conftest import rel_diff  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "smollm2-135m"


def greedy(model: Model, ids: list[int], n_new: int, dtype: str) -> tuple[np.ndarray, list[int]]:
    """The prompt's last logits and ``n_new`` argmax tokens after it, through a ``dtype`` KV cache."""
    cache = model.new_cache(len(ids) + n_new, dtype=dtype)
    first = logits = model.forward(ids, cache)[-1]
    out: list[int] = []
    for _ in range(n_new):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]], cache)[-1]
    return first, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kv-dtype", default="float32", help="the KV cache's dtype: float32, float16, q8_0")
    dtype = parser.parse_args().kv_dtype
    prompts = json.loads((REFERENCE / "prompts.json").read_text("utf-8"))["prompts"]
    with np.load(REFERENCE / "logits.npz") as data:
        logits = {key: data[key] for key in data.files}
    model = Model.from_gguf(GgufFile(_INSTALLED_SMOLLM2))
    runs = {p["key"]: greedy(model, p["input_ids"], len(p["greedy_ids"]), dtype) for p in prompts}
    worst = max(rel_diff(runs[p["key"]][0], logits[p["key"]]) for p in prompts)
    same = sum(runs[p["key"]][1] == p["greedy_ids"] for p in prompts)
    print(f"kernels {model.weights.kernels}, KV {dtype}: max rel logit diff {worst:.2e} (bar 1e-3); "
          f"greedy identical {same}/{len(prompts)}")  # fmt: skip


if __name__ == "__main__":
    main()
