"""Hypothesis strategies shared by the property tests (test_properties*.py
beside each package's tests): cuts of a byte string into reads, JSON
values, valid inputs with a few bytes changed."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st


@st.composite
def segmentations(draw, data: bytes, max_cuts: int = 40) -> list[bytes]:
    """`data` cut into reads at arbitrary points (empty reads included):
    joined, the reads are `data` again."""
    if not data:
        return [data]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=max_cuts)))
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


# JSON as the services receive it: nested objects and arrays of scalars.
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

# Bytes that are mostly a valid input with a few bytes changed, inserted or
# dropped: arbitrary bytes rarely get past a parser's first check.
@st.composite
def mutated(draw, valid: bytes, max_edits: int = 4) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, max_edits))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(("flip", "insert", "drop")))
        if action == "insert" or not data:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif action == "drop":
            del data[min(at, len(data) - 1)]
        else:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
    return bytes(data)

