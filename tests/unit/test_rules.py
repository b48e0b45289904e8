"""domain/rules.py: who may touch a session, and which patches and values are refused."""

from __future__ import annotations

from typing import Any

import pytest

from sessionmgr.domain import rules
from sessionmgr.domain.errors import AccessDenied, InvalidInput, PayloadTooLarge
from tests.unit.factories import principal

OWNER, MEMBER = "alice", "mad:planner"
ACL = [MEMBER]
LIMIT = 1024


@pytest.mark.parametrize(
    ("who", "allowed"),
    [
        (principal(OWNER), True),
        (principal(MEMBER), True),
        (principal("root", "admin"), True),
        (principal("mallory"), False),
        (principal("svc", "service"), False),  # service may create for others, not read all
        (principal("ALICE"), False),  # subjects are compared exactly
    ],
    ids=["owner", "acl-member", "admin", "stranger", "service-role", "case-variant"],
)
def test_access_is_owner_acl_or_admin(who: Any, allowed: bool) -> None:
    assert rules.can_read(who, OWNER, ACL) is allowed
    if allowed:
        rules.require_access(who, OWNER, ACL)
    else:
        with pytest.raises(AccessDenied):
            rules.require_access(who, OWNER, ACL)


@pytest.mark.parametrize(
    ("who", "allowed"),
    [
        (principal(OWNER), True),
        (principal("root", "admin"), True),
        (principal(MEMBER), False),
        (principal("mallory"), False),
    ],
    ids=["owner", "admin", "acl-member", "stranger"],
)
def test_owner_only_actions(who: Any, allowed: bool) -> None:
    if allowed:
        rules.require_owner(who, OWNER)
    else:
        with pytest.raises(AccessDenied, match="owner or an admin"):
            rules.require_owner(who, OWNER)


# -- check_patch ----------------------------------------------------------------------------


def test_a_patch_of_mutable_fields_passes_unchanged() -> None:
    patch = {"work_in_progress": {"step": 3}, "context_summary": {}, "full_context": {"a": [1]}}
    assert rules.check_patch(patch, LIMIT) == patch


@pytest.mark.parametrize(
    "name",
    [
        "id",
        "version",
        "state",
        "owner_id",
        "acl",
        "created_at",
        "last_active",
        "participants",
        "recent_timeline",
        "timeline_seq",
        "archive",
        "bogus",
    ],
)
def test_immutable_or_unknown_key_is_refused_by_name(name: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        rules.check_patch({"work_in_progress": {}, name: {}}, LIMIT)
    assert caught.value.field == f"patch.{name}"
    assert name in str(caught.value)


def test_empty_patch_is_refused() -> None:
    with pytest.raises(InvalidInput) as caught:
        rules.check_patch({}, LIMIT)
    assert caught.value.field == "patch"


@pytest.mark.parametrize("value", [[1, 2], "text", 3, None, True])
def test_a_mutable_field_must_hold_an_object(value: Any) -> None:
    with pytest.raises(InvalidInput, match="JSON object") as caught:
        rules.check_patch({"context_summary": value}, LIMIT)
    assert caught.value.field == "patch.context_summary"


def test_patch_values_are_checked_like_any_value() -> None:
    with pytest.raises(InvalidInput) as caught:
        rules.check_patch({"work_in_progress": {"a": {"$where": 1}}}, LIMIT)
    assert caught.value.field == "patch.work_in_progress.a"
    with pytest.raises(PayloadTooLarge):
        rules.check_patch({"full_context": {"blob": "x" * LIMIT}}, LIMIT)


# -- check_value ----------------------------------------------------------------------------


def nested(depth: int, *, leaf: Any = 1, in_list: bool = False) -> Any:
    """A value `depth` containers deep below the top-level object."""
    value = leaf
    for _ in range(depth):
        value = [value] if in_list else {"n": value}
    return value


@pytest.mark.parametrize("in_list", [False, True], ids=["objects", "arrays"])
def test_nesting_up_to_32_levels_is_accepted_and_33_refused(in_list: bool) -> None:
    rules.check_value({"top": nested(31, in_list=in_list)}, "wip", 1 << 20)
    with pytest.raises(InvalidInput, match="deeper than 32") as caught:
        rules.check_value({"top": nested(32, in_list=in_list)}, "wip", 1 << 20)
    assert caught.value.field is not None
    assert caught.value.field.startswith("wip.top")


@pytest.mark.parametrize(
    "key",
    ["$set", "a.b", "nul\x00byte", "", "k" * 257],
    ids=["dollar", "dot", "nul", "empty", "too-long"],
)
def test_keys_mongodb_cannot_store_are_refused(key: str) -> None:
    with pytest.raises(InvalidInput, match="keys must be") as caught:
        rules.check_value({"ok": {key: 1}}, "ctx", LIMIT)
    assert caught.value.field == "ctx.ok"


def test_keys_are_checked_inside_arrays_too() -> None:
    with pytest.raises(InvalidInput, match="keys must be"):
        rules.check_value({"items": [{"fine": 1}, {"$bad": 2}]}, "ctx", LIMIT)


@pytest.mark.parametrize("key", ["a$", "x" * 256, "ünï", "with space"])
def test_ordinary_keys_pass(key: str) -> None:
    rules.check_value({key: 1}, "ctx", LIMIT)


@pytest.mark.parametrize("number", [2**63 - 1, -(2**63), 0, True, 1.5e300])
def test_numbers_inside_the_int64_range_pass(number: Any) -> None:
    rules.check_value({"n": [number]}, "ctx", LIMIT)


@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 10**30])
def test_integers_outside_int64_are_refused(number: int) -> None:
    with pytest.raises(InvalidInput, match="64-bit") as caught:
        rules.check_value({"n": {"deep": [number]}}, "ctx", LIMIT)
    assert caught.value.field == "ctx.n.deep[0]"


def test_size_is_measured_encoded_and_the_limit_is_inclusive() -> None:
    # {"b":"..."} is 8 bytes of syntax around the string.
    rules.check_value({"b": "x" * (LIMIT - 8)}, "wip", LIMIT)
    with pytest.raises(PayloadTooLarge, match=r"wip is 1025 bytes encoded; the limit is 1024"):
        rules.check_value({"b": "x" * (LIMIT - 7)}, "wip", LIMIT)


def test_size_counts_escaped_characters() -> None:
    # Each NUL in a string value encodes as the 6-byte escape \u0000.
    with pytest.raises(PayloadTooLarge):
        rules.check_value({"b": "\x00" * (LIMIT // 6)}, "wip", LIMIT)
