"""Which document names the service accepts, as Rails parses them
(`type, id, rest = name.split('-')`): a known record type, then one to three
`-`-separated parts of ASCII letters, digits and `_` (`comment-456`,
`comment-456-body`, `discussion-new-7`), 200 characters at most. Anything
else is refused before Rails is asked."""

from __future__ import annotations

import re

RECORD_TYPES = (
    "comment",
    "discussion",
    "poll",
    "stance",
    "outcome",
    "pollTemplate",
    "discussionTemplate",
    "group",
    "user",
)
MAX_LENGTH = 200

_PATTERN = re.compile(rf"(?:{'|'.join(RECORD_TYPES)})(?:-[A-Za-z0-9_]+){{1,3}}")


def valid_document_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_LENGTH and _PATTERN.fullmatch(name) is not None
