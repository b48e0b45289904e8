"""A session's MongoDB document fits MongoDB's 16 MiB limit however full the limits let it be
(domain/rules.py), so no acknowledged write can be refused by MongoDB for its size and parked.

`bson_bytes` is checked against the driver's own encoder; the fullest document the limits
admit is built as the warm store writes it and encoded."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import bson
import msgspec
import pytest

from sessionmgr.domain import rules
from sessionmgr.domain.errors import PayloadTooLarge, QuotaExceeded
from sessionmgr.domain.model import ArchiveRef, Participant, SessionRecord, SessionState
from sessionmgr.services import quotas
from sessionmgr.services.sessions import Limits
from sessionmgr.settings import ConfigError, load_settings
from sessionmgr.storage.warm import _to_doc
from tests.unit.factories import SessionRecordFactory, json_object, json_value, principal

KIB, MIB = 1024, 1024 * 1024
WHEN = datetime(2026, 12, 2, 1, 2, 3, 456000, tzinfo=UTC)
WIDE = "\U0001f600"  # four bytes of UTF-8: the widest character a name can hold


def test_bson_bytes_is_the_drivers_size() -> None:
    random.seed(16)
    edges = [2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, -(2**63), 0.5, "", None]
    for _ in range(500):
        value = {**json_object(), "edges": edges, "nested": [json_value() for _ in range(20)]}
        assert rules.bson_bytes(value) == len(bson.encode(value)), value


def worst_participant(i: int) -> tuple[str, Participant]:
    name = f"{i:06d}" + WIDE * 58  # 64 characters, as `mad_name` allows at most
    lapsed = Participant(
        joined_at=WHEN, lease_expires_at=WHEN, active=True, token=2**62, lapsed_at=WHEN
    )
    return name, lapsed


def fullest_document(max_field_bytes: int, participants: int) -> dict[str, Any]:
    """The largest session document these limits admit, as the warm store writes it: every
    field at its longest, each free-form field at `max_field_bytes` as BSON, an archive
    reference, and `participants` of the widest names, each in the ACL."""
    members = dict(worst_participant(i) for i in range(participants))
    record = SessionRecord(
        id="f" * 32,
        version=2**62,
        state=SessionState.ARCHIVED,
        owner_id=WIDE * 256,
        acl=[f"mad:{name}" for name in members],
        created_at=WHEN,
        last_active=WHEN,
        participants=members,
        work_in_progress=fullest_field(max_field_bytes),
        context_summary=fullest_field(max_field_bytes),
        timeline_seq=2**62,
        lease_grants=2**62,
        write_id="w" * 32,
    )
    doc = _to_doc(record)
    archive = ArchiveRef(key="k" * 1024, sha256="s" * 64, size=2**62, archived_at=WHEN)
    doc |= {
        "full_context": fullest_field(max_field_bytes),
        "context_version": 2**62,
        "archive": msgspec.to_builtins(archive, builtin_types=(datetime,)),
        "purge_pending": True,
        "cold_key": "k" * 1024,
    }
    return doc


def zeros_bson(count: int) -> int:
    """The BSON size of the elements of `[0] * count`: type, index, NUL and an int32 each."""
    total = 0
    for digits in range(1, len(str(count)) + 1):
        first = 0 if digits == 1 else 10 ** (digits - 1)
        total += max(0, min(count, 10**digits) - first) * (6 + digits)
    return total


def fullest_field(max_field_bytes: int) -> dict[str, Any]:
    """A field at its BSON limit, admitted: mostly an array of zeros (2 bytes each as JSON,
    about 12 as BSON), filled up to the byte with a string."""
    limit = rules.BSON_PER_FIELD_BYTE * max_field_bytes
    count = 0
    while zeros_bson(count + 1000) < 0.9 * limit:
        count += 1000
    while zeros_bson(count + 1) < 0.9 * limit:
        count += 1
    value: dict[str, Any] = {"x": [0] * count, "y": ""}
    value["y"] = "z" * (limit - rules.bson_bytes(value))
    assert rules.bson_bytes(value) == limit
    rules.check_value(value, "field", max_field_bytes)  # admitted, just
    return value


@pytest.mark.parametrize("max_field_bytes", [256 * KIB, 1 * MIB, 2 * MIB, 5 * MIB // 2])
def test_the_fullest_document_the_limits_admit_fits_mongodbs_limit(max_field_bytes: int) -> None:
    fit = rules.participants_that_fit(max_field_bytes)
    assert fit > 0
    doc = fullest_document(max_field_bytes, fit)
    size = len(bson.encode(doc))
    assert size <= rules.MONGODB_DOCUMENT_BYTES
    # ... and the bound is not loose: a participant's bound is a few bytes over the widest
    # one, so tens of thousands of them leave some room.
    assert size > 0.9 * rules.MONGODB_DOCUMENT_BYTES


def test_a_participant_and_the_overhead_stay_within_their_bounds() -> None:
    empty = len(bson.encode(fullest_document(256, 0)))
    one = len(bson.encode(fullest_document(256, 1)))
    assert one - empty <= rules.PARTICIPANT_BYTES
    bare = empty - rules.FREE_FORM_FIELDS * (rules.BSON_PER_FIELD_BYTE * 256 + 32)
    assert bare <= rules.DOCUMENT_OVERHEAD_BYTES


def test_a_value_small_as_json_and_large_as_bson_is_refused() -> None:
    value = {"x": [0] * 10_000}  # 20 KB as JSON, 10 000 x (type, index, NUL, int32) as BSON
    assert len(msgspec.json.encode(value)) < 32 * KIB < 2 * 32 * KIB < rules.bson_bytes(value)
    with pytest.raises(PayloadTooLarge, match="as MongoDB stores it"):
        rules.check_value(value, "work_in_progress", 32 * KIB)
    at_limit = -(-rules.bson_bytes(value) // rules.BSON_PER_FIELD_BYTE)
    rules.check_value(value, "work_in_progress", at_limit)  # at the limit: admitted


def test_ordinary_values_at_the_json_limit_are_within_the_bson_one() -> None:
    """Strings, objects of small members, nested objects: BSON's few bytes more than JSON per
    element are well inside the allowance, so the JSON limit is the one a client meets."""
    limit = 64 * KIB
    for value in (
        {"s": "x" * (limit - 8)},
        {f"k{i}": i for i in range(limit // 13)},
        {f"k{i}": {"a": True} for i in range(limit // 20)},
    ):
        assert len(msgspec.json.encode(value)) <= limit
        rules.check_value(value, "work_in_progress", limit)


def test_settings_that_would_let_a_document_pass_the_limit_are_refused() -> None:
    fit = rules.participants_that_fit(2 * MIB)
    with pytest.raises(ConfigError, match=f"at most {fit} participants fit"):
        load_settings({}, max_field_bytes=2 * MIB, max_participants=fit + 1)
    assert load_settings({}, max_field_bytes=2 * MIB, max_participants=fit).max_participants == fit
    with pytest.raises(ConfigError, match="MAX_FIELD_BYTES"):
        load_settings({"SESSIONMGR_MAX_FIELD_BYTES": str(3 * MIB)})
    with pytest.raises(ConfigError, match="MAX_PARTICIPANTS"):
        load_settings({"SESSIONMGR_MAX_PARTICIPANTS": "100000"})


def test_a_privileged_participants_quota_stops_where_the_document_would_not_fit() -> None:
    fit = rules.participants_that_fit(2 * MIB)
    limits = Limits(max_field_bytes=2 * MIB, max_participants=fit // 2)
    service = principal("svc", "service")
    members = dict(worst_participant(i) for i in range(fit))
    full = SessionRecordFactory.build(participants=members)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.check_participants(limits, service, full)
    assert refused.value.quota == fit, "not fit // 2 x the privileged factor"
    one_less = msgspec.structs.replace(full, participants=dict(list(members.items())[1:]))
    quotas.check_participants(limits, service, one_less)
