"""The work of rendering HTML as a count, not a time: what the bots tests
use to hold html_to_text to linear cost (a profiler hook and tracemalloc;
the same input gives the same count on one Python build)."""

from __future__ import annotations

import _markupbase
import html.parser
import re
import sys
import tracemalloc

from channels_bots.render import html_to_text


class _Scanned:
    """A regular expression of the stdlib HTML parser's, counting the
    characters its matches and searches go over (a failed search: the rest
    of the string)."""

    def __init__(self, pattern: re.Pattern, count: list[int]):
        self._pattern, self._count = pattern, count

    def match(self, string, pos=0, *args):
        m = self._pattern.match(string, pos, *args)
        self._count[0] += m.end() - pos if m else 1
        return m

    def search(self, string, pos=0, *args):
        m = self._pattern.search(string, pos, *args)
        self._count[0] += (m.end() if m else len(string)) - pos
        return m

    def __getattr__(self, name):
        return getattr(self._pattern, name)


# Smaller allocations are not counted: each profiled call allocates a few
# hundred bytes of the profiler's own (its frame), which would drown what
# is measured; a line joined again and again is a string past this soon.
BIG_ALLOCATION = 1024


def render_work(html_text: str) -> int:
    """The work of one html_to_text, as a count that does not depend on the
    machine: characters the stdlib parser's regular expressions went over
    (its end-of-input recovery re-scanned the rest of the input once per
    "<"), plus the bytes each call into C that allocated over
    BIG_ALLOCATION allocated while it ran (a line joined again for every
    piece of text added to it: "".join). Both are deterministic for a
    given input."""
    scanned = [0]
    patched = []
    for module in (html.parser, _markupbase):
        for name, value in list(vars(module).items()):
            if isinstance(value, re.Pattern):
                patched.append((module, name, value))
                setattr(module, name, _Scanned(value, scanned))
            elif isinstance(getattr(value, "__self__", None), re.Pattern) and value.__name__ in ("match", "search"):
                patched.append((module, name, value))
                setattr(module, name, getattr(_Scanned(value.__self__, scanned), value.__name__))
    allocated = [0]
    marks: list[int] = []

    def profile(frame, event, arg):
        if event == "c_call":
            marks.append(tracemalloc.get_traced_memory()[0])
            tracemalloc.reset_peak()
        elif event in ("c_return", "c_exception") and marks:
            grown = tracemalloc.get_traced_memory()[1] - marks.pop()
            # A regular expression's own working memory (about 1 KiB a call)
            # is not counted: its work is the characters it scanned.
            if grown > BIG_ALLOCATION and not isinstance(getattr(arg, "__self__", None), re.Pattern):
                allocated[0] += grown

    tracemalloc.start()
    sys.setprofile(profile)
    try:
        html_to_text(html_text)
    finally:
        sys.setprofile(None)
        tracemalloc.stop()
        for module, name, value in patched:
            setattr(module, name, value)
    return scanned[0] + allocated[0]
