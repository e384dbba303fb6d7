"""Which document names the service accepts: a known record type, then any
number of `-`-separated parts of ASCII letters, digits and `_`, 200
characters at most. The front end names a saved record's editor
`type-id-field` and an unsaved one's `type-new-userId-...params-field`
(`comment-new-5-42-Discussion-42-body`); Rails reads only the first three
parts. Anything else is refused before Rails is asked."""

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

_PATTERN = re.compile(rf"(?:{'|'.join(RECORD_TYPES)})(?:-[A-Za-z0-9_]+)+")


def valid_document_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_LENGTH and _PATTERN.fullmatch(name) is not None
