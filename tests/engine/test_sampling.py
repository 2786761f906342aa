"""Tests of engine.sampling: option validation, sample_token against references, stop strings."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.sampling import InferenceOptions, StopStringMatcher, make_rng, sample_token

SAMPLING = InferenceOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # plain softmax sampling
GREEDY = InferenceOptions(temperature=0.0)


@st.composite
def logit_arrays(draw: st.DrawFn) -> np.ndarray:
    """Float32 logits (V,): spread-out values, or small integers with many ties, or a few hand-picked."""
    size = draw(st.integers(1, 300))
    if draw(st.booleans()):  # generated element by element: hypothesis can shrink to the edge cases
        elements = st.one_of(st.integers(-3, 3).map(float), st.floats(-50, 50, width=32))
        return draw(hnp.arrays(np.float32, st.integers(1, 8), elements=elements))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    if draw(st.booleans()):
        return rng.integers(-3, 4, size).astype(np.float32)  # many ties, also at the top
    return (rng.standard_normal(size) * draw(st.floats(0.01, 30.0))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# InferenceOptions


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -5),
        ("max_new_tokens", 2.5),
        ("max_new_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 4.0),
        ("top_p", -0.01),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("repetition_window", -1),
        ("repetition_window", None),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", "42"),
        ("stop", ("",)),
        ("stop", "###"),
        ("stop", ("ok", 3)),
        ("stop", None),
        ("max_time_ms", 0),
        ("max_time_ms", -10),
        ("max_time_ms", 1.5),
        ("stop_on_eos", 1),
        ("stop_on_eos", "yes"),
    ],
)
def test_invalid_option_raises_value_error_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name) as info:
        InferenceOptions(**{name: value})
    assert "allowed" in str(info.value)


def test_boundary_values_are_accepted() -> None:
    o = InferenceOptions(
        max_new_tokens=1,
        temperature=0,
        top_k=0,
        top_p=0,
        min_p=1,
        repetition_penalty=3,
        repetition_window=0,
        seed=0,
        max_time_ms=1,
        stop_on_eos=False,
    )
    assert isinstance(o.temperature, float) and isinstance(o.top_p, float) and isinstance(o.min_p, float)
    assert InferenceOptions(top_k=10**9, top_p=1.0, min_p=0.0).top_k == 10**9


def test_stop_list_becomes_a_tuple_and_options_are_frozen() -> None:
    o = InferenceOptions(stop=["###", "User:"])  # type: ignore[arg-type]
    assert o.stop == ("###", "User:")
    with pytest.raises(AttributeError):
        o.top_k = 3  # type: ignore[misc]
    hash(o)  # frozen with a tuple: usable as a key


def test_dict_round_trip_through_json() -> None:
    o = InferenceOptions(temperature=0.3, top_k=7, seed=99, stop=("a", "bc"), max_time_ms=500)
    d = json.loads(json.dumps(o.to_dict()))
    assert InferenceOptions.from_dict(d) == o
    assert InferenceOptions.from_dict({}) == InferenceOptions()
    assert InferenceOptions.from_dict({"top_p": 1}).top_p == 1.0


def test_from_dict_rejects_unknown_keys() -> None:  # the wording is engine/options.py's, for all three
    with pytest.raises(ValueError, match=r"^unknown InferenceOptions option\(s\): top_kk; the options are"):
        InferenceOptions.from_dict({"top_kk": 3, "temperature": 0.5})


def test_is_greedy() -> None:
    assert GREEDY.is_greedy
    assert InferenceOptions(top_k=1).is_greedy
    assert InferenceOptions(top_p=0.0).is_greedy
    assert not InferenceOptions().is_greedy


def test_make_rng_is_seeded_or_fresh() -> None:
    seeded = InferenceOptions(seed=5)
    assert make_rng(seeded).random() == make_rng(seeded).random()
    fresh = InferenceOptions()
    assert make_rng(fresh).random() != make_rng(fresh).random()


# ---------------------------------------------------------------------------------------------------
# sample_token: references


@settings(max_examples=80, deadline=None)
@given(logit_arrays())
def test_greedy_equals_argmax(logits: np.ndarray) -> None:
    assert sample_token(logits, GREEDY, make_rng(GREEDY)) == int(np.argmax(logits))


@settings(max_examples=40, deadline=None)
@given(logit_arrays(), st.floats(0.01, 100.0), st.integers(0, 2**32))
def test_top_k_1_is_greedy_at_any_temperature(logits: np.ndarray, temperature: float, seed: int) -> None:
    o = InferenceOptions(top_k=1, temperature=temperature, seed=seed)
    assert sample_token(logits, o, make_rng(o)) == int(np.argmax(logits))


@settings(max_examples=40, deadline=None)
@given(logit_arrays(), st.integers(0, 2**32))
def test_tiny_top_p_is_greedy(logits: np.ndarray, seed: int) -> None:
    o = InferenceOptions(temperature=1.0, top_k=0, top_p=1e-9, seed=seed)
    assert sample_token(logits, o, make_rng(o)) == int(np.argmax(logits))


@settings(max_examples=40, deadline=None)
@given(logit_arrays(), st.integers(1, 20), st.floats(0.05, 5.0), st.integers(0, 2**32))
def test_top_k_never_returns_a_token_outside_the_top_k(
    logits: np.ndarray, k: int, temperature: float, seed: int
) -> None:
    o = InferenceOptions(top_k=k, temperature=temperature, top_p=1.0, seed=seed)
    rng = make_rng(o)
    kth_largest = np.sort(logits)[-min(k, logits.size)]
    for _ in range(5):
        assert logits[sample_token(logits, o, rng)] >= kth_largest


def test_top_k_on_a_full_size_vocabulary_draws_from_exactly_the_top_k() -> None:
    logits = np.random.default_rng(5).standard_normal(49_152).astype(np.float32)
    top_40 = set(np.argsort(logits)[-40:].tolist())
    o = InferenceOptions(temperature=1e4, top_k=40, top_p=1.0, seed=2)  # near uniform over the 40
    rng = make_rng(o)
    assert {sample_token(logits, o, rng) for _ in range(800)} == top_40


def _reference_nucleus(logits: np.ndarray, top_p: float) -> set[int]:
    """Top-p by a full sort (logit descending, ties by token id) at temperature 1."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max())
    probs = e / e.sum()
    order = np.lexsort((np.arange(probs.size), -z))
    n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p, side="left")) + 1
    return set(order[:n_keep].tolist())


@settings(max_examples=40, deadline=None)
@given(logit_arrays(), st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 2**32))
def test_top_p_without_top_k_stays_in_the_nucleus(logits: np.ndarray, top_p: float, seed: int) -> None:
    o = InferenceOptions(temperature=1.0, top_k=0, top_p=top_p, seed=seed)
    rng = make_rng(o)
    nucleus = _reference_nucleus(logits, top_p)
    assert all(sample_token(logits, o, rng) in nucleus for _ in range(10))


def test_top_p_without_top_k_keeps_a_nucleus_larger_than_the_first_candidates() -> None:
    data_rng = np.random.default_rng(0)
    logits = data_rng.uniform(-1.0, 0.0, 4096).astype(np.float32)
    likely = data_rng.choice(4096, 100, replace=False)
    logits[likely] = 10.0 + data_rng.uniform(0.0, 1e-3, 100)  # 100 hold 99.89% of the mass, 99 < 99%
    o = InferenceOptions(temperature=1.0, top_k=0, top_p=0.99, seed=4)
    rng = make_rng(o)
    assert {sample_token(logits, o, rng) for _ in range(1500)} == set(likely.tolist())


def test_min_p_1_keeps_only_the_most_likely_tokens() -> None:
    logits = np.array([1.0, 3.0, 3.0, 0.0, 2.9], dtype=np.float32)
    o = InferenceOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0, seed=1)
    rng = make_rng(o)
    drawn = {sample_token(logits, o, rng) for _ in range(200)}
    assert drawn == {1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))  # min_p 0.5 keeps p >= 0.25
    o = InferenceOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=8)
    rng = make_rng(o)
    assert {sample_token(logits, o, rng) for _ in range(300)} == {0, 1}


def test_empirical_distribution_matches_softmax() -> None:
    logits = np.array([1.0, 0.5, -0.3, 2.0, 0.0], dtype=np.float32)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    rng = np.random.default_rng(1234)
    n = 20_000
    counts = np.bincount([sample_token(logits, SAMPLING, rng) for _ in range(n)], minlength=5)
    freq = counts / n
    std_err = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < 4.5 * std_err), (freq, expected)


def test_large_temperature_is_near_uniform_over_the_top_k() -> None:
    logits = np.linspace(-5, 5, 100, dtype=np.float32)
    o = InferenceOptions(temperature=1e6, top_k=5, top_p=1.0, seed=7)
    rng = make_rng(o)
    counts = np.bincount([sample_token(logits, o, rng) for _ in range(3000)], minlength=100)
    assert counts[:95].sum() == 0
    assert np.all(np.abs(counts[95:] / 3000 - 0.2) < 0.03), counts[95:]  # about 4 standard errors


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # softmax of these logits is about [0.6, 0.3, 0.1]: top_p 0.7 keeps tokens 0 and 1 only.
    logits = np.log(np.array([0.6, 0.3, 0.1], dtype=np.float32))
    o = InferenceOptions(temperature=1.0, top_k=0, top_p=0.7, seed=3)
    rng = make_rng(o)
    assert {sample_token(logits, o, rng) for _ in range(300)} == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    o = InferenceOptions(temperature=0.0, repetition_penalty=2.0, repetition_window=0)
    rng = make_rng(o)
    positive = np.array([2.0, 1.5, -3.0], dtype=np.float32)  # token 0: 2.0 / 2 = 1.0 < 1.5
    assert sample_token(positive, o, rng) == 0
    assert sample_token(positive, o, rng, context_ids=[0]) == 1
    negative = np.array([-1.0, -1.5, -3.0], dtype=np.float32)  # token 0: -1.0 * 2 = -2.0 < -1.5
    assert sample_token(negative, o, rng, context_ids=np.array([0, 0, 2])) == 1


def test_repetition_window_only_looks_at_recent_tokens() -> None:
    logits = np.array([2.0, 1.5, -5.0], dtype=np.float32)
    windowed = InferenceOptions(temperature=0.0, repetition_penalty=2.0, repetition_window=2)
    assert sample_token(logits, windowed, make_rng(windowed), context_ids=[0, 2, 2]) == 0  # 0 not seen
    whole = InferenceOptions(temperature=0.0, repetition_penalty=2.0, repetition_window=0)
    assert sample_token(logits, whole, make_rng(whole), context_ids=[0, 2, 2]) == 1  # 1.0 < 1.5


def test_context_id_outside_the_vocabulary_raises() -> None:
    o = InferenceOptions(repetition_penalty=1.2)
    with pytest.raises(ValueError, match="context_ids"):
        sample_token(np.zeros(4, dtype=np.float32), o, make_rng(o), context_ids=[1, 4])


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    steps = np.random.default_rng(0).standard_normal((60, 500)).astype(np.float32)

    def run(seed: int) -> list[int]:
        o = InferenceOptions(seed=seed, temperature=1.5, top_k=50)
        rng = make_rng(o)
        return [sample_token(x, o, rng) for x in steps]

    assert run(11) == run(11)
    assert run(11) != run(12)


# ---------------------------------------------------------------------------------------------------
# sample_token: NaN, inf, the caller's array


def test_nan_logits_count_as_minus_infinity() -> None:
    logits = np.array([np.nan, 1.0, 2.0, np.nan, 0.5], dtype=np.float32)
    assert sample_token(logits, GREEDY, make_rng(GREEDY)) == 2
    rng = np.random.default_rng(0)
    assert {sample_token(logits, SAMPLING, rng) for _ in range(300)} == {1, 2, 4}


def test_plus_infinity_logits_are_chosen_among_themselves() -> None:
    logits = np.array([0.0, np.inf, 5.0, np.inf, np.nan], dtype=np.float32)
    assert sample_token(logits, GREEDY, make_rng(GREEDY)) == 1
    rng = np.random.default_rng(0)
    assert {sample_token(logits, InferenceOptions(), rng) for _ in range(100)} == {1, 3}


@pytest.mark.parametrize("options", [GREEDY, InferenceOptions(), SAMPLING])
def test_all_nan_or_minus_infinity_raises(options: InferenceOptions) -> None:
    logits = np.array([np.nan, -np.inf, np.nan], dtype=np.float32)
    with pytest.raises(ValueError, match="all logits are NaN or -inf"):
        sample_token(logits, options, np.random.default_rng(0))


def test_finite_survivors_win_over_minus_infinity_within_the_top_k() -> None:
    logits = np.full(100, -np.inf, dtype=np.float32)
    logits[42] = -1e30
    rng = np.random.default_rng(0)
    assert all(sample_token(logits, InferenceOptions(), rng) == 42 for _ in range(20))


@pytest.mark.parametrize(
    "options",
    [GREEDY, InferenceOptions(), SAMPLING, InferenceOptions(repetition_penalty=1.3, min_p=0.1)],
)
def test_callers_logits_are_not_modified(options: InferenceOptions) -> None:
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    logits[[3, 10]] = np.nan
    before = logits.copy()
    logits.flags.writeable = False  # any write attempt would raise
    sample_token(logits, options, np.random.default_rng(0), context_ids=[1, 2, 3, 500])
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_other_dtypes_work(dtype: type) -> None:
    logits: np.ndarray = np.array([1, 7, 3], dtype=dtype)
    assert sample_token(logits, GREEDY, make_rng(GREEDY)) == 1
    # defaults (temperature 0.7, top_p 0.95): token 1 has p = 1 / (1 + e^(-6/0.7) + e^(-4/0.7)) = 0.9965,
    # past top_p on its own, so top-p keeps it alone whatever the draw
    assert {sample_token(logits, InferenceOptions(), np.random.default_rng(s)) for s in range(20)} == {1}
    # a full-distribution draw is the same token for token as from the float64 logits
    free = InferenceOptions(temperature=1.0, top_k=0, top_p=1.0)
    as_f64 = logits.astype(np.float64)
    rngs = np.random.default_rng(3), np.random.default_rng(3)
    draws = [(sample_token(logits, free, rngs[0]), sample_token(as_f64, free, rngs[1])) for _ in range(200)]
    assert all(a == b for a, b in draws) and {a for a, _ in draws} == {0, 1, 2}


@pytest.mark.parametrize("shape", [(0,), (2, 3)])
def test_bad_logits_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="1-D"):
        sample_token(np.zeros(shape, dtype=np.float32), GREEDY, make_rng(GREEDY))


# ---------------------------------------------------------------------------------------------------
# StopStringMatcher


def test_no_stop_strings_emits_everything_at_once() -> None:
    m = StopStringMatcher(())
    assert m.feed("Hello <") == ("Hello <", False)
    assert m.flush() == ""


def test_stop_string_split_across_pieces() -> None:
    m = StopStringMatcher(["</s>"])
    assert m.feed("Hello <") == ("Hello ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("s> and more") == ("", True)
    assert m.stopped
    assert m.feed("after") == ("", True)
    assert m.flush() == ""


def test_partial_match_that_is_not_a_stop_is_emitted() -> None:
    m = StopStringMatcher(["</s>"])
    assert m.feed("a </") == ("a ", False)
    assert m.feed("b> c") == ("</b> c", False)
    assert not m.stopped


def test_text_before_the_stop_in_one_piece_is_emitted() -> None:
    m = StopStringMatcher(["User:", "###"])
    assert m.feed("answer ## not yet") == ("answer ## not yet", False)
    assert m.feed(" done.\nUser: hi ### x") == (" done.\n", True)


def test_several_candidates_in_one_piece() -> None:
    m = StopStringMatcher(["abc", "xyz"])
    assert m.feed("ab xy abx xyab") == ("ab xy abx xy", False)
    assert m.feed("c") == ("", True)


def test_overlapping_prefixes() -> None:
    m = StopStringMatcher(["abc", "ab"])
    assert m.feed("xa") == ("x", False)
    assert m.feed("b") == ("", True)  # "ab" completes first
    m = StopStringMatcher(["aab"])
    assert m.feed("aa") == ("", False)
    assert m.feed("a") == ("a", False)  # "aaa": only the last "aa" can still start "aab"
    assert m.feed("b!") == ("", True)


def test_flush_returns_held_back_text() -> None:
    m = StopStringMatcher(["<|im_end|>"])
    assert m.feed("done <|im") == ("done ", False)
    assert m.flush() == "<|im"
    assert m.flush() == ""


def test_matcher_rejects_empty_stop_strings() -> None:
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(["ok", ""])


def _reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """What a matcher fed the whole text one character at a time must emit."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


@settings(max_examples=80, deadline=None)
@given(
    st.text("abc", max_size=30),
    st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.integers(0, 30), max_size=8),
)
def test_result_does_not_depend_on_how_the_text_is_split(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    m = StopStringMatcher(stops)
    emitted, stopped = "", False
    for lo, hi in itertools.pairwise(bounds):
        piece, stopped = m.feed(text[lo:hi])
        emitted += piece
    emitted += m.flush()
    assert (emitted, stopped) == _reference_stop(text, stops)


def _held_back(text: str, stops: list[str]) -> int:
    """The longest suffix of ``text`` that is a proper prefix of a stop string: all a stream may hold."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@settings(max_examples=80, deadline=None)
@given(
    st.text("ab", max_size=60),
    st.lists(st.text("ab", min_size=1, max_size=12), min_size=1, max_size=4),
    st.lists(st.integers(0, 60), max_size=12),
)
def test_streaming_holds_back_only_a_possible_stop_string_prefix(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    m = StopStringMatcher(stops)
    emitted = ""
    for lo, hi in itertools.pairwise(bounds):
        piece, stopped = m.feed(text[lo:hi])
        emitted += piece
        if stopped:
            break
        assert emitted == text[: hi - _held_back(text[:hi], stops)]
    assert (emitted + m.flush(), m.stopped) == _reference_stop(text, stops)


def test_a_long_stop_string_costs_memory_linear_in_its_length() -> None:
    """Every prefix of a 20,000-character stop string kept in a set was ~200 MB (issue 23)."""
    import tracemalloc

    stop = "ab" * 10_000
    tracemalloc.start()
    try:
        m = StopStringMatcher([stop, "x" * 20_000])
        assert m.feed(stop[:-1]) == ("", False)  # all of it may still become the stop string
        assert m.feed("a") == (stop[:-1], False)  # "...baa": only the last "a" may start it now
        assert m.feed(stop[1:]) == ("", True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"the matcher peaked at {peak:,} bytes for 40,000 characters of stop strings"
