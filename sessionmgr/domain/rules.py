"""Rules every tier obeys: who may do what, and what a stored value may look like."""

from __future__ import annotations

from typing import Any

import msgspec

from sessionmgr.domain.errors import AccessDenied, InvalidInput, PayloadTooLarge
from sessionmgr.domain.model import MUTABLE_FIELDS, Principal

MAX_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_KEY_CHARS = 256

# A session's MongoDB document must stay under MongoDB's document limit whatever its writes
# hold, or an acknowledged write could never be written behind. Beyond its three free-form
# fields (`work_in_progress`, `context_summary`, `full_context`) and its participants, it
# holds ids, times, counters and an archive reference: at most `DOCUMENT_OVERHEAD_BYTES`. A
# participant takes at most `PARTICIPANT_BYTES`: its entry (a name of up to 64 characters, two
# times, a flag, its token, the time it lapsed) and its ACL entry. A free-form field takes at
# most `max_field_bytes` as JSON and `BSON_PER_FIELD_BYTE` times that as BSON (ordinary values
# are about their JSON size; `[0,0,...]` is up to 7 times it, each element carrying its index
# as its key). tests/unit/test_document_size.py measures these bounds.
MONGODB_DOCUMENT_BYTES = 16 * 1024 * 1024
FREE_FORM_FIELDS = 3
DOCUMENT_OVERHEAD_BYTES = 16 * 1024
PARTICIPANT_BYTES = 640
BSON_PER_FIELD_BYTE = 2
_BSON_PER_JSON_BYTE = 8  # at most, as above: a value below 1/8 of its BSON limit as JSON fits


def can_read(principal: Principal, owner_id: str, acl: list[str]) -> bool:
    return principal.is_admin or principal.sub == owner_id or principal.sub in acl


def require_access(principal: Principal, owner_id: str, acl: list[str]) -> None:
    """Read and write access are the same: owner, ACL member or admin (DESIGN §5)."""
    if not can_read(principal, owner_id, acl):
        raise AccessDenied()


def require_owner(principal: Principal, owner_id: str) -> None:
    if not (principal.is_admin or principal.sub == owner_id):
        raise AccessDenied("only the owner or an admin may do this")


def check_patch(patch: dict[str, Any], max_field_bytes: int) -> dict[str, dict[str, Any]]:
    """Return the patch if every key is a mutable field holding a storable object."""
    if not patch:
        raise InvalidInput("the patch is empty", "patch")
    for name, value in patch.items():
        if name not in MUTABLE_FIELDS:
            raise InvalidInput(
                f"'{name}' cannot be patched; mutable fields are {sorted(MUTABLE_FIELDS)}",
                f"patch.{name}",
            )
        if not isinstance(value, dict):
            raise InvalidInput(f"'{name}' must be a JSON object", f"patch.{name}")
        check_value(value, f"patch.{name}", max_field_bytes)
    return patch


def check_value(value: Any, where: str, max_bytes: int) -> None:
    """Refuse what MongoDB could not store or that would swell a session past its limits:
    `max_bytes` bounds the value's size as JSON, and `BSON_PER_FIELD_BYTE` times that its size
    as MongoDB stores it (BSON)."""
    _check_node(value, where, 0)
    size = len(msgspec.json.encode(value))
    if size > max_bytes:
        raise PayloadTooLarge(f"{where} is {size} bytes encoded; the limit is {max_bytes}")
    bson_limit = BSON_PER_FIELD_BYTE * max_bytes
    if size * _BSON_PER_JSON_BYTE > bson_limit and (stored := bson_bytes(value)) > bson_limit:
        raise PayloadTooLarge(
            f"{where} is {size} bytes encoded but {stored} as MongoDB stores it (BSON, where "
            f"each array element carries its index); the limit there is {bson_limit}, "
            f"{BSON_PER_FIELD_BYTE} times the limit of {max_bytes}"
        )


def bson_bytes(value: Any) -> int:
    """The size of a JSON value as the value of a BSON element (a document: its whole size),
    as MongoDB stores it. Integers are int32 where they fit, as the driver encodes them."""
    if isinstance(value, dict):
        return 5 + sum(_bson_element(key, child) for key, child in value.items())
    if isinstance(value, list):
        return 5 + sum(_bson_element(str(index), child) for index, child in enumerate(value))
    if isinstance(value, str):
        return 5 + len(value.encode())
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 4 if -(2**31) <= value < 2**31 else 8
    if isinstance(value, float):
        return 8
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _bson_element(key: str, value: Any) -> int:
    return 2 + len(key.encode()) + bson_bytes(value)  # type byte, key, its NUL, value


def participants_that_fit(max_field_bytes: int) -> int:
    """How many participants a session may have for its MongoDB document to stay under the
    document limit with each free-form field at `max_field_bytes`."""
    # Each as BSON at its most, with its element's type byte and key.
    fields = FREE_FORM_FIELDS * (BSON_PER_FIELD_BYTE * max_field_bytes + 32)
    room = MONGODB_DOCUMENT_BYTES - DOCUMENT_OVERHEAD_BYTES - fields
    return max(0, room // PARTICIPANT_BYTES)


def _check_node(node: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidInput(f"{where} is nested deeper than {MAX_DEPTH} levels", where)
    if isinstance(node, dict):
        for key, child in node.items():
            _check_key(key, where)
            _check_node(child, f"{where}.{key}", depth + 1)
    elif isinstance(node, list):
        for index, child in enumerate(node):
            _check_node(child, f"{where}[{index}]", depth + 1)
    elif (
        isinstance(node, int) and not isinstance(node, bool) and not INT64_MIN <= node <= INT64_MAX
    ):
        raise InvalidInput(f"{where} is an integer outside the 64-bit range", where)


def _check_key(key: str, where: str) -> None:
    # MongoDB reserves '$' prefixes and treats '.' as a path separator in updates.
    if not key or key.startswith("$") or "." in key or "\x00" in key or len(key) > MAX_KEY_CHARS:
        raise InvalidInput(
            f"{where} has the key {key[:40]!r}: keys must be 1-{MAX_KEY_CHARS} characters "
            "without '.', NUL or a leading '$'",
            where,
        )


def _is_int(node: Any) -> bool:
    return isinstance(node, int) and not isinstance(node, bool)
