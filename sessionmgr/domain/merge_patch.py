"""JSON Merge Patch (RFC 7396) on a session's mutable fields.

The document names top-level fields like a plain patch does, but each value is merged into
the stored object instead of replacing it: a nested key set to `null` is removed, an object
is merged key by key, anything else replaces what was there. `full_context` is not merged
(it lives in MongoDB only, outside the hot transaction): a plain patch replaces it.
"""

from __future__ import annotations

from typing import Any

from sessionmgr.domain.errors import InvalidInput

MERGEABLE_FIELDS = frozenset({"work_in_progress", "context_summary"})


def check_document(document: Any) -> dict[str, dict[str, Any]]:
    """The document if it is an object of mergeable fields, each holding an object."""
    if not isinstance(document, dict):
        raise InvalidInput("a merge patch must be a JSON object", "body")
    if not document:
        raise InvalidInput("the merge patch is empty", "body")
    for name, value in document.items():
        if name == "full_context":
            raise InvalidInput(
                "full_context cannot be merged; replace it with a plain patch "
                "(Content-Type: application/json)",
                name,
            )
        if name not in MERGEABLE_FIELDS:
            raise InvalidInput(
                f"'{name}' cannot be patched; mergeable fields are {sorted(MERGEABLE_FIELDS)}",
                name,
            )
        if not isinstance(value, dict):
            raise InvalidInput(
                f"'{name}' must be a JSON object of changes (a field cannot be removed; "
                "send {} to leave it as it is)",
                name,
            )
    return document


def merge(target: Any, patch: Any) -> Any:
    """RFC 7396 MergePatch(target, patch)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result
