"""Properties of bots' parser of chatbot/* messages and of the HTML
renderer behind it: any payload gives a Command or Rejected (never another
exception); a payload as Rails publishes it gives the command it describes;
a payload over the size limit is refused before it is parsed; any HTML
renders to text, in size bounded by the input's, with work linear in it
(counted, not timed: see `render_work`).

Payloads come whole from one pub/sub message, so segmentation is the RESP
reader's property (libs/common/tests/test_properties_resp.py)."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from channels_bots.messages import (
    MAX_PAYLOAD_BYTES,
    PUBLISH_CHANNEL,
    TEST_CHANNEL,
    Command,
    Rejected,
    parse,
)
from channels_bots.render import html_to_text
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.bots.tests.render_work import render_work
from tests.strategies import json_values, mutated

servers = st.tuples(st.sampled_from(["http", "https", "HTTPS"]), st.from_regex(r"[a-z0-9.-]{1,30}(:[0-9]{1,5})?",
                                                                              fullmatch=True),
                    st.sampled_from(["", "/", "/matrix"])).map(lambda t: f"{t[0]}://{t[1]}{t[2]}")
tokens = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)
rooms = st.from_regex(r"#[a-z0-9_]{1,20}:[a-z0-9.]{1,20}|![A-Za-z0-9]{1,20}(:[a-z0-9.]{1,20})?", fullmatch=True)

# HTML as Loomio users write it, plus the markup a hostile one might: tags
# of every kind, declarations, comments, entities, broken pieces.
html_pieces = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["<p>", "</p>", "<ul>", "<ol>", "<li>", "</li>", "</ul>", "<br>", "<hr/>", "<pre>", "</pre>",
                     "<blockquote>", "</blockquote>", "<script>", "</script>", "<td>", "<a href='x'>", "</a>",
                     "<img alt='i'>", "&amp;", "&#99999999;", "&bogus;", "<!-- c -->", "<!DOCTYPE html>", "<!x>",
                     "<![CDATA[x]]>", "<![if x]>", "<![endif]>", "<![x[", "<![ y", "<!", "</", "<?pi>", "<", ">"]),
)
htmls = st.lists(html_pieces, max_size=30).map("".join)


@st.composite
def publications(draw):
    """(channel, payload, what the command must hold)."""
    server, token, room = draw(servers), draw(tokens), draw(rooms)
    if draw(st.booleans()):
        message = draw(st.text(max_size=40))
        obj = {"server": server, "access_token": token, "channel": room, "message": message}
        content = {"msgtype": "m.notice", "body": message}
        channel, kind = TEST_CHANNEL, "test"
    else:
        html = draw(htmls)
        obj = {"config": {"server": server, "access_token": token, "channel": room}, "payload": {"html": html}}
        content = {"msgtype": "m.text", "body": html_to_text(html), "format": "org.matrix.custom.html",
                   "formatted_body": html}
        channel, kind = PUBLISH_CHANNEL, "publish"
    extra = draw(st.dictionaries(st.text(max_size=5).filter(lambda k: k not in obj), json_values, max_size=2))
    return channel, json.dumps({**obj, **extra}).encode(), (kind, server.rstrip("/"), token, room, content)


@given(publications())
@example((PUBLISH_CHANNEL, json.dumps({"config": {"server": "https://m.x", "access_token": "t", "channel": "!r"},
                                       "payload": {"html": "<p>a<![x[b</p>"}}).encode(),
          ("publish", "https://m.x", "t", "!r", {"msgtype": "m.text", "body": "a", "format": "org.matrix.custom.html",
                                                "formatted_body": "<p>a<![x[b</p>"})))
def test_a_payload_as_rails_publishes_it_gives_its_command(case):
    channel, data, (kind, server, token, room, content) = case
    command = parse(channel, data)
    assert isinstance(command, Command)
    assert (command.kind, command.bot.server, command.bot.access_token, command.room, command.content) == (
        kind, server, token, room, content)


@given(st.sampled_from([TEST_CHANNEL, PUBLISH_CHANNEL, "chatbot/other"]),
       st.binary(max_size=200) | publications().flatmap(lambda case: mutated(case[1])))
def test_any_payload_gives_a_command_or_rejected(channel, data):
    try:
        command = parse(channel, data)
    except Rejected as exc:
        assert exc.reason in ("unknown_channel", "too_large", "not_json", "incomplete", "invalid")
        assert "access_token" not in str(exc) or "malformed" in str(exc) or "missing" in str(exc)
        return
    assert isinstance(command, Command)


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"config":' * 20_000])
def test_deeply_nested_json_is_rejected_as_not_json(data):
    with pytest.raises(Rejected) as e:
        parse(PUBLISH_CHANNEL, data)
    assert e.value.reason == "not_json"


@given(st.integers(1, 4 * MAX_PAYLOAD_BYTES))
def test_a_payload_over_the_limit_is_refused_before_it_is_parsed(extra):
    data = b"[" * (MAX_PAYLOAD_BYTES + extra)  # parsed, it would recurse or build a deep list
    tracemalloc.start()
    try:
        with pytest.raises(Rejected) as e:
            parse(PUBLISH_CHANNEL, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == "too_large" and peak < 16 * 1024


@given(htmls | st.text(max_size=200))
def test_any_html_renders_to_text(html):
    text = html_to_text(html)  # raises nothing (a failure here is the defect)
    assert isinstance(text, str) and text == text.strip()


@given(htmls)
@example("<ul><li>" * 3000)
def test_rendered_text_is_bounded_by_the_input(html):
    assert len(html_to_text(html)) <= 4 * len(html) + 64




# A third of the profile's examples: each renders under a profiler, twice.
@settings(max_examples=max(10, settings().max_examples // 3))
@given(st.lists(html_pieces, min_size=1, max_size=6).map("".join).filter(bool), st.just("") | html_pieces)
@example("x<i>", "")  # tag soup: one long line of many pieces
@example('x<a href="u">y</a>', "")  # many links on one line
@example('<a href="u">x', "</a>")  # links opened inside links, closed at the end
@example("<a", "")  # a tag never closed
@example("<!--", "")  # a comment never closed
@example("</", "")
def test_rendering_work_is_linear_in_the_input(unit, tail):
    # n units then n tails, against four times as many: four times the
    # input may cost at most six times the work, give or take a few units
    # per character (a quadratic renderer costs about sixteen times).
    n = max(1, 1000 // len(unit + tail))
    small, big = unit * n + tail * n, unit * (4 * n) + tail * (4 * n)
    work_small, work_big = render_work(small), render_work(big)
    assert work_big <= 6 * work_small + 4 * len(big), (work_small, work_big, len(small))
