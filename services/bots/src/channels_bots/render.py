"""HTML -> readable plain text, for the `body` of a Matrix message whose
`formatted_body` is the HTML. Clients without HTML support, notifications and
search all show `body`, so it must read well on its own: paragraphs and list
items on their own lines, links with their targets, no tags, entities decoded.

The HTML is what Loomio users wrote, so work and output are bounded: the
first MAX_HTML_CHARS are read, lists and quotes nested deeper than
MAX_INDENT_DEPTH are drawn at that depth, and the text stops at
MAX_TEXT_CHARS; cut text ends with TRUNCATED (see docs/bots.md).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK = {
    "address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "fieldset", "figcaption",
    "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main",
    "nav", "ol", "p", "pre", "section", "table", "tr", "ul",
}
# Paragraph-like blocks are set apart by a blank line; the rest by a line break.
_PARAGRAPH = {"p", "blockquote", "pre", "table", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "hr"}
_SKIP = {"script", "style", "head", "title", "template", "noscript"}
_SPACES = re.compile(r"[ \t\r\n\f\v]+")

# A Matrix event is at most 64 KiB, formatted_body included: a body longer
# than this could never be sent, so it is not built.
MAX_TEXT_CHARS = 32 * 1024
TRUNCATED = "\n[…]"
# Only this much HTML is read (a few tens of milliseconds of CPU at most,
# in the subscription's handler); an event could not carry more as HTML.
MAX_HTML_CHARS = 64 * 1024
# Deeper lists and quotes are indented no further: the indentation of one
# line is bounded, not the nesting depth times each line.
MAX_INDENT_DEPTH = 8


class _TextParser(HTMLParser):
    """Linear in the HTML: the line being built is a list of pieces, joined
    once when it ends; its length and last characters are kept as it grows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []  # finished lines; "" marks a paragraph break
        self.line: list[str] = []
        self.line_length = 0
        self.line_tail = ""  # the line's last two characters
        self.line_number = 0  # how many lines were ended: tells a link which line it began on
        self.skip_depth = 0
        self.pre_depth = 0
        self.lists: list[list] = []  # per open list: [kind, next number]
        self.quote_depth = 0
        # The open link: href, line number and index of its first piece. At
        # most one: an <a> inside a link closes it first, as browsers do.
        self.link: tuple[str | None, int, int] | None = None
        self.size = 0  # characters in self.lines, newlines included
        self.full = False  # MAX_TEXT_CHARS reached: the rest is not rendered
        self.cut = False  # the HTML was longer than MAX_HTML_CHARS

    # -- line building ---------------------------------------------------------

    def _prefix(self) -> str:
        return "> " * min(self.quote_depth, MAX_INDENT_DEPTH)

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        self.size += len(line) + 1
        if self.size > MAX_TEXT_CHARS:
            self.full = True

    def _add(self, piece: str) -> None:
        self.line.append(piece)
        self.line_length += len(piece)
        self.line_tail = (self.line_tail + piece[-2:])[-2:]
        if self.size + self.line_length > MAX_TEXT_CHARS:
            self.full = True

    def _end_line(self) -> str:
        text = "".join(self.line)
        self.line = []
        self.line_length = 0
        self.line_tail = ""
        self.line_number += 1
        return text

    def _break(self, paragraph: bool = False) -> None:
        # Only the right side: list items carry their nesting as indentation.
        text = self._end_line().rstrip()
        if text.strip():
            self._emit(self._prefix() + text)
        if paragraph and self.lines and self.lines[-1] != "":
            self._emit("")

    def _write(self, text: str) -> None:
        if not self.line and self.lists and not text.strip():
            return
        self._add(text)

    def _close_link(self) -> None:
        href, line_number, first = self.link
        self.link = None
        if line_number != self.line_number:
            first = 0  # the link began on a line already ended
        text = "".join(self.line[first:]).strip()
        if href and not href.lower().startswith(("javascript:", "data:")):
            target = href[len("mailto:"):] if href.lower().startswith("mailto:") else href
            if target != text:
                self._write(f" ({target})" if text else target)

    # -- parser callbacks ------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.full:
            return
        if tag in _SKIP:
            self.skip_depth += 1
            return
        if self.skip_depth:
            return
        if tag in _BLOCK:
            self._break(paragraph=tag in _PARAGRAPH and not (tag in ("ul", "ol") and self.lists))
        if tag == "br":
            self._break()
        elif tag == "hr":
            self._emit(self._prefix() + "---")
            self._break(paragraph=True)
        elif tag == "pre":
            self.pre_depth += 1
        elif tag == "blockquote":
            self.quote_depth += 1
        elif tag in ("ul", "ol"):
            self.lists.append([tag, 1])
        elif tag == "li":
            indent = "  " * min(max(0, len(self.lists) - 1), MAX_INDENT_DEPTH)
            if self.lists and self.lists[-1][0] == "ol":
                marker = f"{self.lists[-1][1]}. "
                self.lists[-1][1] += 1
            else:
                marker = "- "
            self._add(indent + marker)
        elif tag == "a":
            if self.link is not None:
                self._close_link()
            self.link = (dict(attrs).get("href"), self.line_number, len(self.line))
        elif tag == "img":
            alt = (dict(attrs).get("alt") or "").strip()
            if alt:
                self._write(alt)
        elif tag in ("td", "th") and self.line:
            self._write(" | ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.full:
            return
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if self.skip_depth:
            return
        if tag == "a" and self.link is not None:
            self._close_link()
        if tag in _BLOCK:
            nested_list = tag in ("ul", "ol") and len(self.lists) > 1
            self._break(paragraph=tag in _PARAGRAPH and not nested_list)
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        elif tag == "blockquote":
            self.quote_depth = max(0, self.quote_depth - 1)
        elif tag in ("ul", "ol") and self.lists:
            self.lists.pop()

    def handle_data(self, data: str) -> None:
        if self.skip_depth or self.full:
            return
        if self.pre_depth:
            # Preformatted text keeps its own line breaks.
            first, *rest = data.split("\n")
            self._add(first)
            for part in rest:
                self._emit(self._prefix() + self._end_line().rstrip())
                self._add(part)
            return
        text = _SPACES.sub(" ", data)
        if not self.line or self.line_tail.endswith((" ", "- ", ". ")):
            text = text.lstrip()
        if text:
            self._write(text)

    def text(self) -> str:
        self._break()
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        out = re.sub(r"\n{3,}", "\n\n", "\n".join(self.lines)).strip()
        if self.cut or len(out) > MAX_TEXT_CHARS:
            out = out[:MAX_TEXT_CHARS].rstrip() + TRUNCATED
        return out


def html_to_text(html: str) -> str:
    """A plain-text rendering of `html`; never raises on malformed markup."""
    parser = _TextParser()
    if len(html) > MAX_HTML_CHARS:
        html, parser.cut = html[:MAX_HTML_CHARS], True
    try:
        parser.feed(html)
    except AssertionError:
        # _markupbase's verdict on a declaration it cannot read ("<![x"):
        # the text so far stands, the rest is dropped.
        parser.reset()
    # What the parser holds back once it has the whole input is a tag,
    # comment or declaration that never ends. HTML drops such a thing; the
    # stdlib's own end-of-input recovery would re-scan the rest of the input
    # once per "<" in it (quadratic: 37 s for 240 KB of "<a").
    if len(parser.rawdata) > 1 and parser.rawdata.startswith("<"):
        parser.reset()
    parser.close()
    return parser.text()
