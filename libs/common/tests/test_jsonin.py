"""The one parse of JSON from outside: bounds checked before parsing, one
error type whatever is wrong."""

from __future__ import annotations

import json

import pytest
from channels_common import jsonin
from channels_common.jsonin import MAX_DEPTH, JSONInputError


@pytest.mark.parametrize(
    "data, value",
    [
        (b'{"room":"a","n":[1,2,{"x":null}]}', {"room": "a", "n": [1, 2, {"x": None}]}),
        ('"é"', "é"),
        (b'"[[[[ brackets in a string \\" [[[ are text"', '[[[[ brackets in a string " [[[ are text'),
        (b'[' * MAX_DEPTH + b']' * MAX_DEPTH, json.loads(b'[' * MAX_DEPTH + b']' * MAX_DEPTH)),
        (b'{"a":"\\\\"}', {"a": "\\"}),  # an escaped backslash ends before the quote
        (b"  7 ", 7),
    ],
)
def test_parses_json(data, value):
    assert jsonin.loads(data, max_bytes=1 << 20) == value


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"[" * 100_000, "too_deep"),  # refused before the parser could recurse
        (b"]" * 100 + b"[" * 100, "not_json"),  # brackets that do not balance
        (b"[" * 60 + b"]" * 60 + b"[" * 10, "not_json"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "too_deep"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "too_deep"),
        (b'["' + b"x" * 2000 + b'"]', "too_large"),
        (b"\xff\xfe", "not_utf8"),
        (b"{not json", "not_json"),
        (b"[NaN]", "not_json"),  # Python's extensions to JSON are refused
        (b"Infinity", "not_json"),
        (b'"unterminated \\', "not_json"),
        (b"1" * 5000, "not_json"),  # past Python's limit on digits
        (b"", "not_json"),
    ],
)
def test_refuses_with_one_error_type(data, reason):
    with pytest.raises(JSONInputError) as refused:
        jsonin.loads(data, max_bytes=1000 if reason == "too_large" else 1 << 20)
    assert refused.value.reason == reason
    assert isinstance(refused.value, ValueError)


def test_depth_is_judged_outside_strings_only():
    deep_text = json.dumps({"note": "[" * 10_000 + "{" * 10_000})
    assert jsonin.loads(deep_text.encode(), max_bytes=1 << 20)["note"].startswith("[[[")
    # A string never closed hides no brackets either: it is simply not JSON.
    with pytest.raises(JSONInputError, match="not_json"):
        jsonin.loads(b'["' + b'\\"' * 10_000 + b"[" * 10_000, max_bytes=1 << 20)


def test_the_bounds_are_checked_before_parsing(monkeypatch):
    calls = []
    monkeypatch.setattr(jsonin._DECODER, "decode", lambda text: calls.append(text))
    for data in (b"[" * 100_000, b"[" * 70 + b"]" * 70, b"{}" * 1000):
        with pytest.raises(JSONInputError):
            jsonin.loads(data, max_bytes=1000)
    assert calls == []


def test_text_and_value():
    assert jsonin.loads_with_text(b' {"a": 1}\n', max_bytes=100) == (' {"a": 1}\n', {"a": 1})


@pytest.mark.parametrize("padding", [0, 2000])  # few brackets, and more than the quick passes take
def test_brackets_in_strings_neither_hide_nor_add_depth(padding):
    pad = b'"p": [' + b"[]," * padding + b"[]], "
    deep = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    # Closing brackets inside a string do not cancel real depth...
    hidden = b"{" + pad + b'"a": "' + b"]" * 100 + b'", "b": "x", "c": ' + deep + b"}"
    with pytest.raises(JSONInputError, match="too_deep"):
        jsonin.loads(hidden, max_bytes=1 << 20)
    # ...nor opening ones inside strings (escaped quotes and all) add any.
    shallow = b"{" + pad + b'"a": "\\"' + b"[" * 100 + b'\\\\", "b": "", "c": "{{{{", "d": [["x"]]}'
    assert jsonin.loads(shallow, max_bytes=1 << 20)["d"] == [["x"]]


def test_text_is_bounded_as_bytes_are():
    with pytest.raises(JSONInputError, match="too_deep"):
        jsonin.loads("[" * 100 + "]" * 100, max_bytes=1000)
    assert jsonin.loads('{"é": ["[[[["]}', max_bytes=1000) == {"é": ["[[[["]}
