"""Entity tags and preconditions: what matches, what does not, what is not a header at all."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from sessionmgr.api.conditional import etag, if_match, none_match
from sessionmgr.api.problems import validation_errors
from sessionmgr.domain.errors import InvalidInput, PreconditionFailed
from sessionmgr.domain.model import Participant, Session, SessionState
from sessionmgr.domain.preconditions import Precondition

AT = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


def session(**changes: object) -> Session:
    base = Session(
        id="0f8fad5bd9cb469fa16570867728950e",
        version=7,
        state=SessionState.ACTIVE,
        owner_id="alice",
        created_at=AT,
        last_active=AT,
    )
    return msgspec.structs.replace(base, **changes)


@pytest.mark.parametrize(
    ("header", "version", "matches"),
    [
        ("*", 7, True),
        ('"7"', 7, True),
        ('"6"', 7, False),
        ('"6", "7"', 7, True),
        ('"6","8"', 7, False),
        ('"7-3fa2c1d09b7e"', 7, True),  # any tag of the version: lease state does not matter
        ('"7-3fa2c1d09b7e-full"', 7, True),
        ('W/"7"', 7, False),  # strong comparison
        ('"abc"', 7, False),
        ('""', 7, False),
        ("7", 7, True),  # a bare number, as older clients sent it
    ],
)
def test_if_match(header: str, version: int, matches: bool):
    precondition = if_match(header)
    assert precondition is not None
    assert precondition.matches(version) is matches


@pytest.mark.parametrize("header", ["bogus", '"7', '7"', "", " , ", "W/7", '"a" "b"'])
def test_if_match_that_is_no_list_of_tags_is_invalid_input(header: str):
    with pytest.raises(InvalidInput) as caught:
        if_match(header)
    assert caught.value.field == "If-Match"


def test_no_header_is_no_precondition():
    assert if_match(None) is None
    assert none_match(None, '"7"') is False


def test_a_failed_precondition_carries_the_current_version():
    with pytest.raises(PreconditionFailed) as caught:
        Precondition(versions=frozenset({6})).check("s1", 7)
    assert caught.value.current_version == 7


@pytest.mark.parametrize(
    ("versions", "behind"),
    [({6}, True), ({5, 6}, True), ({6, 8}, False), ({8}, False), (set(), True)],
)
def test_a_failed_precondition_says_whether_every_version_it_names_is_passed(
    versions: set[int], behind: bool
):
    """`behind`: no later write can make it match (a version ahead might; weak tags only,
    an empty set, never match), so a replica may refuse it without waiting its turn."""
    with pytest.raises(PreconditionFailed) as caught:
        Precondition(versions=frozenset(versions)).check("s1", 7)
    assert caught.value.behind is behind


def test_the_etag_is_the_version_alone_for_an_active_session_without_participants():
    assert etag(session()) == '"7"'
    assert etag(session(), full=True) == '"7-full"'


def test_the_etag_changes_with_what_changes_without_a_version():
    lease = Participant(joined_at=AT, lease_expires_at=AT, active=True)
    lapsed = Participant(joined_at=AT, lease_expires_at=AT, active=False)
    tags = {
        etag(session()),
        etag(session(state=SessionState.DORMANT)),
        etag(session(participants={"planner": lease})),
        etag(session(participants={"planner": lapsed})),
        etag(session(participants={"planner": msgspec.structs.replace(lease, joined_at=AT)})),
    }
    assert len(tags) == 4  # the last one is the same body as the third, so the same tag
    renewed = msgspec.structs.replace(lease, lease_expires_at=AT.replace(second=30))
    assert etag(session(participants={"planner": renewed})) not in tags


def test_if_none_match_compares_weakly_and_takes_lists_and_star():
    assert none_match('"7"', '"7"')
    assert none_match('W/"7"', '"7"')
    assert none_match('"1", "7"', '"7"')
    assert none_match("*", '"7"')
    assert not none_match('"7-full"', '"7"')


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("Expected `int`, got `str` - at `$.expected_version`", "/expected_version"),
        ("Expected `str`, got `int` - at `$.events[1].kind`", "/events/1/kind"),
        ("Object missing required field `events`", "/events"),
        ("Object contains unknown field `x/y` - at `$.patch`", "/patch/x~1y"),
        ("Expected `object`, got `array`", ""),
    ],
)
def test_msgspec_paths_become_json_pointers(text: str, field: str):
    (error,) = validation_errors(text)
    assert error.field == field
    assert " - at " not in error.message
