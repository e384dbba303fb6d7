import pytest
from channels_collab.names import valid_document_name


@pytest.mark.parametrize(
    "name",
    [
        "comment-456", "comment-456-body", "discussion-12-description", "discussion-new-7",
        "pollTemplate-3-details", "discussionTemplate-9", "group-1-description", "user-5-short_bio",
        "stance-1-reason", "outcome-2-statement", "poll-new-3-details", "comment-" + "1" * 192,
        # Unsaved records: type, "new", user id, the front end's collabKeyParams, field.
        "comment-new-5-42-Discussion-42-body", "stance-new-5-17-reason", "outcome-new-5-17-statement",
        "comment-1-2-3-4", "comment" + "-1" * 96,
    ],
)
def test_accepted(name):
    assert valid_document_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "", "comment", "comment-", "comment--1", "Comment-1", "polltemplate-1", "unknown-1",
        "comment-1-", "comment-1--2", "comment-1 ", " comment-1", "comment-1\n", "comment-1\0s", "comment-1/x",
        "comment-1;drop", "comment-\u0661", "comment-é", "comment-" + "1" * 193, "comment" + "-1" * 97,
        "comment-new-5-42-Discussion-42-body\n", None, 42,
    ],
)
def test_refused(name):
    assert not valid_document_name(name)
