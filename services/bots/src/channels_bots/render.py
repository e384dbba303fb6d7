"""HTML -> readable plain text, for the `body` of a Matrix message whose
`formatted_body` is the HTML. Clients without HTML support, notifications and
search all show `body`, so it must read well on its own: paragraphs and list
items on their own lines, links with their targets, no tags, entities decoded.
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


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []  # finished lines; "" marks a paragraph break
        self.line: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0
        self.lists: list[list] = []  # per open list: [kind, next number]
        self.quote_depth = 0
        self.links: list[tuple[str | None, int]] = []  # href, position in line when opened

    # -- line building ---------------------------------------------------------

    def _prefix(self) -> str:
        return "> " * self.quote_depth

    def _break(self, paragraph: bool = False) -> None:
        # Only the right side: list items carry their nesting as indentation.
        text = "".join(self.line).rstrip()
        self.line = []
        if text.strip():
            self.lines.append(self._prefix() + text)
        if paragraph and self.lines and self.lines[-1] != "":
            self.lines.append("")

    def _write(self, text: str) -> None:
        if not self.line and self.lists and not text.strip():
            return
        self.line.append(text)

    # -- parser callbacks ------------------------------------------------------

    def parse_marked_section(self, i: int, report: int = 1) -> int:
        # `<![` not followed by a keyword the standard library knows raised
        # AssertionError out of feed(); HTML reads it as a bogus comment.
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            return self.parse_bogus_comment(i, report)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip_depth += 1
            return
        if self.skip_depth:
            return
        attributes = dict(attrs)
        if tag in _BLOCK:
            self._break(paragraph=tag in _PARAGRAPH and not (tag in ("ul", "ol") and self.lists))
        if tag == "br":
            self._break()
        elif tag == "hr":
            self.lines.append(self._prefix() + "---")
            self._break(paragraph=True)
        elif tag == "pre":
            self.pre_depth += 1
        elif tag == "blockquote":
            self.quote_depth += 1
        elif tag in ("ul", "ol"):
            self.lists.append([tag, 1])
        elif tag == "li":
            indent = "  " * max(0, len(self.lists) - 1)
            if self.lists and self.lists[-1][0] == "ol":
                marker = f"{self.lists[-1][1]}. "
                self.lists[-1][1] += 1
            else:
                marker = "- "
            self.line.append(indent + marker)
        elif tag == "a":
            self.links.append((attributes.get("href"), len("".join(self.line))))
        elif tag == "img":
            alt = (attributes.get("alt") or "").strip()
            if alt:
                self._write(alt)
        elif tag in ("td", "th") and self.line:
            self._write(" | ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if self.skip_depth:
            return
        if tag == "a" and self.links:
            href, start = self.links.pop()
            text = "".join(self.line)[start:].strip()
            if href and not href.lower().startswith(("javascript:", "data:")):
                target = href[len("mailto:"):] if href.lower().startswith("mailto:") else href
                if target != text:
                    self._write(f" ({target})" if text else target)
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
        if self.skip_depth:
            return
        if self.pre_depth:
            # Preformatted text keeps its own line breaks.
            first, *rest = data.split("\n")
            self.line.append(first)
            for part in rest:
                self.lines.append(self._prefix() + "".join(self.line).rstrip())
                self.line = [part]
            return
        text = _SPACES.sub(" ", data)
        if not self.line or "".join(self.line).endswith((" ", "- ", ". ")):
            text = text.lstrip()
        if text:
            self._write(text)

    def text(self) -> str:
        self._break()
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        out = "\n".join(self.lines)
        return re.sub(r"\n{3,}", "\n\n", out).strip()


def html_to_text(html: str) -> str:
    """A plain-text rendering of `html`; never raises on malformed markup."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    return parser.text()
