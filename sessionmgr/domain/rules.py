"""Rules every tier obeys: who may do what, and what a stored value may look like."""

from __future__ import annotations

from typing import Any

import msgspec

from sessionmgr.domain.errors import AccessDenied, InvalidInput, PayloadTooLarge
from sessionmgr.domain.model import MUTABLE_FIELDS, Principal

MAX_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_KEY_CHARS = 256


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
    """Refuse what MongoDB could not store or that would swell a session past its limits."""
    _check_node(value, where, 0)
    size = len(msgspec.json.encode(value))
    if size > max_bytes:
        raise PayloadTooLarge(f"{where} is {size} bytes encoded; the limit is {max_bytes}")


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
