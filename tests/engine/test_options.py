"""engine/options.py: every options class turns into a JSON-style dict and back the same way, and
refuses an unknown key with the same sentence."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from engine import BatchingOptions, InferenceOptions, KvCacheOptions

CHANGED = {  # options other than the defaults
    BatchingOptions: BatchingOptions(False, 3, 2.5, 7, True, 64),
    KvCacheOptions: KvCacheOptions(
        enabled=False,
        max_sessions=3,
        max_tokens_per_session=100,
        max_bytes_per_session=1 << 20,
        max_bytes_total=2 << 20,
        persist_across_requests=False,
        share_prefixes=False,
        dtype="float16",
    ),
    InferenceOptions: InferenceOptions(temperature=0.3, top_k=7, seed=99, stop=("a", "bc"), max_time_ms=500),
}


@pytest.mark.parametrize("cls", list(CHANGED), ids=lambda c: c.__name__)
def test_dicts_round_trip_through_json(cls: type) -> None:
    options = CHANGED[cls]
    data = options.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(cls)]
    assert cls.from_dict(json.loads(json.dumps(data))) == options
    assert cls.from_dict({}) == cls()


@pytest.mark.parametrize("cls", list(CHANGED), ids=lambda c: c.__name__)
def test_unknown_keys_are_refused_in_one_wording(cls: type) -> None:
    names = ", ".join(f.name for f in dataclasses.fields(cls))
    expected = f"unknown {cls.__name__} option(s): bogus, zzz; the options are {names}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        cls.from_dict({"zzz": 1, "bogus": 2})
