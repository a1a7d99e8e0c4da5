"""Device strings: every valid string parses and prints back; invalid ones are rejected with a message."""

from hypothesis import given
from hypothesis import strategies as st

import pytest

from furiosa_llm.hal import parse_device, parse_devices

cards = st.integers(0, 64)


@st.composite
def valid_npu(draw):
    card = draw(cards)
    form = draw(st.sampled_from(["card", "pe", "range"]))
    if form == "card":
        return f"npu:{card}"
    if form == "pe":
        return f"npu:{card}:{draw(st.integers(0, 7))}"
    span = draw(st.sampled_from([2, 4, 8]))
    start = draw(st.integers(0, 8 // span - 1)) * span
    return f"npu:{card}:{start}-{start + span - 1}"


valid = st.one_of(valid_npu(), st.just("cpu"), st.integers(0, 16).map(lambda i: f"cuda:{i}"))


@given(valid)
def test_valid_strings_round_trip(text):
    d = parse_device(text)
    assert str(d) == text
    assert parse_device(str(d)) == d


@given(st.lists(valid_npu(), min_size=1, max_size=6))
def test_lists_round_trip_or_reject_overlap(tokens):
    spec = ",".join(tokens)
    try:
        ds = parse_devices(spec)
    except ValueError as e:
        assert "overlaps" in str(e)
        return
    assert [str(d) for d in ds] == tokens
    assert parse_devices(",".join(map(str, ds))) == ds


@st.composite
def misaligned(draw):
    span = draw(st.sampled_from([2, 4, 8]))
    start = draw(st.integers(0, 7 - span + 1).filter(lambda s: s % span))
    return f"npu:{draw(cards)}:{start}-{start + span - 1}"


@st.composite
def bad_span(draw):
    start = draw(st.integers(0, 6))
    end = draw(st.integers(start + 1, 7).filter(lambda e: (e - start + 1) not in (1, 2, 4, 8)))
    return f"npu:{draw(cards)}:{start}-{end}"


high_pe = st.tuples(cards, st.integers(8, 99)).map(lambda t: f"npu:{t[0]}:{t[1]}")
junk = st.text(max_size=12).filter(lambda s: s.strip() != "cpu" and not s.strip().startswith(("npu:", "cuda")))


@given(st.one_of(misaligned(), bad_span(), high_pe, junk))
def test_invalid_strings_rejected_with_message(text):
    with pytest.raises(ValueError) as e:
        parse_device(text)
    msg = str(e.value)
    assert repr(text.strip()) in msg and len(msg) > len(repr(text.strip())) + 10
