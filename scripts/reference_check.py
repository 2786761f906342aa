"""Print how close the engine is to the float32 reference: SmolLM2's last-position logits (max |diff|
relative to max |logit|, bar 1e-3) and greedy continuations, for the six reference prompts.

    python scripts/reference_check.py            # the kernels the engine picks (numba when installed)
    SMALLMIND_KERNELS=numpy python scripts/reference_check.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.gguf import GgufFile  # noqa: E402
from engine.model import Model  # noqa: E402
from tests.conftest import _INSTALLED_SMOLLM2  # noqa: E402
from tests.engine.conftest import greedy_continuation, rel_diff  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "smollm2-135m"


def main() -> None:
    prompts = json.loads((REFERENCE / "prompts.json").read_text("utf-8"))["prompts"]
    with np.load(REFERENCE / "logits.npz") as data:
        logits = {key: data[key] for key in data.files}
    model = Model.from_gguf(GgufFile(_INSTALLED_SMOLLM2))
    worst = max(rel_diff(model.forward(p["input_ids"])[-1], logits[p["key"]]) for p in prompts)
    same = sum(greedy_continuation(model, p["input_ids"], len(p["greedy_ids"])) == p["greedy_ids"]
               for p in prompts)  # fmt: skip
    print(f"kernels {model.weights.kernels}: max rel logit diff {worst:.2e} (bar 1e-3); "
          f"greedy identical {same}/{len(prompts)}")  # fmt: skip


if __name__ == "__main__":
    main()
