"""Properties of the reader of the user record Rails stores for a channel
token (`/current_users/{token}`): any bytes give a ChannelUser or None,
never an exception; a record as Rails writes it gives its ids back."""

from __future__ import annotations

import json

import pytest
from channels_common.auth import ChannelUser, parse_current_user, valid_token
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import json_values, mutated

ids = st.integers(-(2**53), 2**53)


@given(st.none() | ids, st.lists(ids | st.booleans() | st.text(max_size=3), max_size=6),
       st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("id", "group_ids")), json_values, max_size=3))
def test_a_record_as_rails_writes_it_gives_its_ids(user_id, groups, extra):
    raw = json.dumps({"id": user_id, "group_ids": groups, **extra}).encode()
    assert parse_current_user(raw) == ChannelUser(
        id=user_id, group_ids=tuple(g for g in groups if isinstance(g, int) and not isinstance(g, bool)))


@given(st.binary(max_size=200) | st.text(max_size=100) | ids.flatmap(
    lambda i: mutated(json.dumps({"id": i, "group_ids": [1, 2]}).encode())))
def test_any_record_gives_a_user_or_none(raw):
    assert parse_current_user(raw) is None or isinstance(parse_current_user(raw), ChannelUser)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"id":' * 50_000])
def test_deeply_nested_records_give_none(raw):
    assert parse_current_user(raw) is None


@given(st.text(max_size=300) | st.none() | st.integers())
def test_any_token_gets_a_verdict(token):
    assert valid_token(token) == (isinstance(token, str) and 0 < len(token) <= 256 and token.isprintable())
