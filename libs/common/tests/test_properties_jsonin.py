"""Properties of the one bounded parse of outside JSON (jsonin): against
the standard library's parser as the oracle, any input gives the value the
standard parser gives or JSONInputError, never another exception; nothing
the standard parser accepts within the depth limit is refused (strings full
of brackets, quotes and escapes included), and everything nested past it is,
before parsing."""

from __future__ import annotations

import json

from channels_common.jsonin import (
    NOT_JSON,
    NOT_UTF8,
    TOO_DEEP,
    TOO_LARGE,
    JSONInputError,
    loads,
    loads_with_text,
)
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import mutated

# Strings that stress the bracket pre-scan: brackets, quotes, backslashes.
tricky = st.text(st.sampled_from('[]{}"\\ab\u00e9\u2028\ud800'), max_size=8) | st.text(max_size=6)
scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False,
                                                                                allow_infinity=False) | tricky
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky, inner, max_size=3), max_leaves=25)
dumps = st.sampled_from([
    lambda v: json.dumps(v), lambda v: json.dumps(v, ensure_ascii=False),
    lambda v: json.dumps(v, indent=1), lambda v: json.dumps(v, separators=(",", ":")),
])


def depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def oracle(text: str):
    def reject(name):
        raise ValueError(name)

    return json.JSONDecoder(parse_constant=reject).decode(text)


@given(values, dumps, st.integers(1, 8), st.booleans())
def test_json_within_the_depth_limit_reads_back_and_past_it_is_refused(value, dump, limit, as_bytes):
    text = dump(value)
    data = text.encode("utf-8", "surrogatepass") if as_bytes else text
    if as_bytes and "\ud800" in text:
        return  # a lone surrogate is no UTF-8: refused as such (below)
    try:
        got = loads(data, max_bytes=1 << 20, max_depth=limit)
    except JSONInputError as exc:
        assert exc.reason == TOO_DEEP and depth(value) > limit, (exc.reason, depth(value), limit, text)
        return
    assert depth(value) <= limit and got == oracle(text)


@given(st.text(max_size=80) | values.flatmap(lambda v: mutated(json.dumps(v).encode()).map(
    lambda b: b.decode("utf-8", "replace"))), st.integers(1, 8))
def test_any_text_gives_the_standard_parsers_value_or_a_json_input_error(text, limit):
    try:
        expected = oracle(text)
    except (ValueError, RecursionError):
        expected = JSONInputError
    try:
        got_text, got = loads_with_text(text, max_bytes=1 << 20, max_depth=limit)
    except JSONInputError as exc:
        assert exc.reason in (TOO_DEEP, NOT_JSON)
        assert expected is JSONInputError or depth(expected) > limit, (text, exc.reason)
        return
    assert got_text == text and got == expected and depth(got) <= limit


@given(st.binary(max_size=80) | values.flatmap(lambda v: mutated(json.dumps(v).encode())))
def test_any_bytes_give_a_value_or_a_json_input_error(data):
    try:
        loads(data, max_bytes=1 << 20)
    except JSONInputError as exc:
        assert exc.reason in (NOT_UTF8, TOO_DEEP, NOT_JSON)


@given(st.integers(65, 200_000), st.sampled_from(["[", '{"a":', '[{"b":']), st.booleans())
def test_deep_nesting_is_refused_before_parsing(n, opener, closed):
    text = opener * n + ("1" + "]" * n if closed and opener == "[" else "")
    for data in (text, text.encode()):
        try:
            loads(data, max_bytes=1 << 22)
        except JSONInputError as exc:
            assert exc.reason in (TOO_DEEP, NOT_JSON)
            continue
        raise AssertionError("accepted")


@given(st.integers(1, 1000))
def test_size_is_refused_first(over):
    try:
        loads(b"[" * (100 + over), max_bytes=100)
    except JSONInputError as exc:
        assert exc.reason == TOO_LARGE
        return
    raise AssertionError("accepted")
