"""The wire-compatible server the shared-backend tests use (tests/support/wire_mongo.py): the
three bugs of nx-27017 that meet the warm store are worked around, seen from a plain PyMongo
client, so a failure here points at the server and not at sessionmgr."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import ASCENDING, IndexModel, MongoClient
from pymongo.database import Database

from tests.support.wire_mongo import WireMongoServer, _nest_dotted


@pytest.fixture
def db(wire_mongo: WireMongoServer) -> Iterator[Database[dict[str, Any]]]:
    with MongoClient(wire_mongo.uri, tz_aware=True) as client:
        name = f"w{secrets.token_hex(4)}"
        yield client[name]
        client.drop_database(name)


def test_a_compound_index_with_id_leaves_inserts_working(db: Database[dict[str, Any]]) -> None:
    db["s"].create_indexes([IndexModel([("owner_id", ASCENDING), ("_id", ASCENDING)], name="o")])
    db["s"].insert_one({"_id": "a", "owner_id": "alice"})
    db["s"].insert_one({"_id": "b", "owner_id": "alice"})
    assert [d["_id"] for d in db["s"].find({"owner_id": "alice"}).sort("_id", 1)] == ["a", "b"]


def test_list_indexes_reports_the_names_and_keys_given(db: Database[dict[str, Any]]) -> None:
    db["s"].create_indexes(
        [
            IndexModel([("owner_id", ASCENDING), ("_id", ASCENDING)], name="owner_id"),
            IndexModel([("state", ASCENDING), ("last_active", ASCENDING)], name="state_age"),
        ]
    )
    info = db["s"].index_information()
    assert dict(info["owner_id"]["key"]) == {"owner_id": 1, "_id": 1}
    assert dict(info["state_age"]["key"]) == {"state": 1, "last_active": 1}


def test_a_dotted_projection_comes_back_nested(db: Database[dict[str, Any]]) -> None:
    db["s"].insert_one({"_id": "a", "version": 3, "archive": {"sha256": "ab", "size": 1}})
    got = db["s"].find_one({"_id": "a"}, {"archive.sha256": 1, "version": 1})
    assert got == {"_id": "a", "version": 3, "archive": {"sha256": "ab"}}


def test_nest_dotted_builds_every_level() -> None:
    assert _nest_dotted({"a.b.c": 1, "a.d": 2, "e": 3}) == {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
