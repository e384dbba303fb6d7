"""HTML -> the plain-text `body` of a Matrix message."""


import pytest
from channels_bots.render import MAX_HTML_CHARS, MAX_INDENT_DEPTH, MAX_TEXT_CHARS, TRUNCATED, html_to_text

from services.bots.tests.render_work import render_work


@pytest.mark.parametrize(
    "html, text",
    [
        ("<p>Hello <b>world</b></p><p>Second &amp; more</p>", "Hello world\n\nSecond & more"),
        ("plain &lt;tag&gt; &#x263A;", "plain <tag> \u263a"),
        ("line<br>break<br/>end", "line\nbreak\nend"),
        ("<h1>Title</h1><ul><li>one</li><li>two</li></ul><p>after</p>", "Title\n\n- one\n- two\n\nafter"),
        ("<ol><li>a<ul><li>b</li></ul></li><li>c</li></ol>", "1. a\n  - b\n2. c"),
        ('<a href="https://x.org/d/1">Budget</a> started', "Budget (https://x.org/d/1) started"),
        ('<a href="https://x.org">https://x.org</a>', "https://x.org"),
        ('<a href="mailto:jo@x.org">jo@x.org</a>', "jo@x.org"),
        ('<a href="javascript:alert(1)">click</a>', "click"),
        ("<script>alert(1)</script><style>p {}</style>visible", "visible"),
        ("<blockquote><p>quoted</p></blockquote>tail", "> quoted\n\ntail"),
        ("<pre>code\n  indented\nend</pre>", "code\n  indented\nend"),
        ("<p>  lots   of\n\n  space  </p>", "lots of space"),
        ("<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>", "a | b\n1 | 2"),
        ('<img src="x.png" alt="chart"> below', "chart below"),
        ("<p>before</p><hr><p>after</p>", "before\n\n---\n\nafter"),
        ("", ""),
    ],
)
def test_renders_readable_text(html, text):
    assert html_to_text(html) == text


@pytest.mark.parametrize("html", ["<p>unclosed <b>bold", "</p></li></ul>stray", "<<<>>>", "<a href=", "<!-- x", "<p>unclosed <b>bold<![<![x"])
def test_malformed_markup_never_raises_and_keeps_the_words(html):
    out = html_to_text(html)
    assert "<p>" not in out and "<b>" not in out
    if "bold" in html:
        assert out == "unclosed bold"
    if "stray" in html:
        assert out == "stray"


def test_nested_lists_indent_to_a_bounded_depth():
    # 3000 nested lists once rendered to 9 M characters (each item indented by its depth).
    out = html_to_text("<ul><li>x" * 3000)
    assert len(out) <= MAX_TEXT_CHARS + len(TRUNCATED)
    lines = out.split("\n")
    assert max(len(line) - len(line.lstrip(" ")) for line in lines) <= 2 * MAX_INDENT_DEPTH
    assert lines[0] == "- x" and lines[1] == "  - x"


def test_nested_quotes_are_prefixed_to_a_bounded_depth():
    out = html_to_text("<blockquote>x" * 3000)
    assert len(out) <= MAX_TEXT_CHARS + len(TRUNCATED)
    assert max(len(line) for line in out.split("\n") if line != TRUNCATED.strip()) <= 2 * MAX_INDENT_DEPTH + 1


def test_an_over_long_text_is_cut_with_a_marker():
    out = html_to_text("<p>" + "word " * 20_000 + "</p><p>last</p>")
    assert out.endswith(TRUNCATED) and len(out) <= MAX_TEXT_CHARS + len(TRUNCATED)
    assert out.startswith("word word") and "last" not in out
    # So is one whose HTML is longer than is read.
    out = html_to_text("<p>" + "<b>x</b>" * (MAX_HTML_CHARS // 8) + "</p><p>last</p>")
    assert out.endswith(TRUNCATED) and "last" not in out and out.startswith("xxx")
    # Text within the bound is whole, without a marker.
    assert html_to_text("<p>" + "word " * 1000 + "</p>") == ("word " * 1000).strip()


@pytest.mark.parametrize(
    "unit, tail",
    [
        ("x<i>", ""),  # tag soup: one line of many pieces
        ('x<a href="u">y</a>', ""),  # many links on one line
        ('<a href="u">x', "</a>"),  # links opened inside links, closed at the end
        ("<a", ""),  # a tag never closed (the stdlib parser's end-of-input recovery is quadratic)
        ("<!--", ""),  # a comment never closed
        ("</", ""),
    ],
)
def test_rendering_is_linear_in_the_input(unit, tail):
    # The properties' check at the sizes of real messages: four times the
    # input (up to 24,000 characters, a long message) may cost at most
    # six times the work, counted (render_work), never timed.
    n = 24_000 // len(unit + tail) // 4
    small = unit * n + tail * n
    big = unit * (4 * n) + tail * (4 * n)
    assert not html_to_text(big).endswith(TRUNCATED)  # under the cap: the whole input is rendered
    work_small, work_big = render_work(small), render_work(big)
    assert work_big <= 6 * work_small + 4 * len(big), (work_small, work_big)
