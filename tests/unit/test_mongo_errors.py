"""Which MongoDB errors are an outage (keep the entry, back off) and which are the entry's own."""

from __future__ import annotations

import pytest
from bson.errors import InvalidDocument
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConfigurationError,
    DocumentTooLarge,
    DuplicateKeyError,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
    WTimeoutError,
)

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.storage.mongo_errors import describe, is_entry_fault, is_outage
from sessionmgr.storage.warm import _guard

OUTAGES = [
    AutoReconnect("connection reset"),
    ServerSelectionTimeoutError("no servers"),
    NotPrimaryError("not primary"),
    WriteConcernError("waiting for replication timed out", 64),
    WTimeoutError("timed out", 64),
    OperationFailure("Authentication failed.", 18),
    OperationFailure("not authorized on sessionmgr to execute command", 13),
    OperationFailure("not primary", 10107),
    OperationFailure("interrupted due to repl state change", 11602),
    OperationFailure("interrupted at shutdown", 11600),
    OperationFailure("Insufficient free space", 14031),
    OperationFailure("you are over your space quota, using 513 MB of 512 MB", 8000),
    OperationFailure("a new error", 99999, {"errorLabels": ["RetryableWriteError"]}),
    OperationFailure("something: No space left on device", 1),
    BulkWriteError({"writeErrors": [], "writeConcernErrors": [{"code": 64}]}),
    BulkWriteError({"writeErrors": [{"code": 10107, "errmsg": "not primary"}]}),
    ConfigurationError("bad URI"),
]
ENTRY_FAULTS = [
    OperationFailure("Document failed validation", 121),
    OperationFailure("BadValue", 2),
    DuplicateKeyError("E11000 duplicate key", 11000),
    BulkWriteError({"writeErrors": [{"code": 121, "errmsg": "Document failed validation"}]}),
    InvalidDocument("cannot encode object"),
    DocumentTooLarge("BSON document too large"),
    ValueError("a value the driver rejects"),
]


@pytest.mark.parametrize("exc", OUTAGES, ids=describe)
def test_errors_any_write_would_get_are_an_outage(exc: Exception) -> None:
    assert is_outage(exc)
    assert not is_entry_fault(exc)


@pytest.mark.parametrize("exc", ENTRY_FAULTS, ids=describe)
def test_errors_about_the_document_are_the_entrys_own(exc: Exception) -> None:
    assert not is_outage(exc)
    assert is_entry_fault(exc)


async def _raise(exc: Exception) -> None:
    raise exc


@pytest.mark.parametrize("exc", OUTAGES, ids=describe)
async def test_the_warm_store_reports_an_outage_as_backend_unavailable(exc: Exception) -> None:
    with pytest.raises(BackendUnavailable) as raised:
        await _guard(_raise(exc))
    assert raised.value.backend == "mongodb"
    assert type(exc).__name__ in str(raised.value)


@pytest.mark.parametrize("exc", ENTRY_FAULTS[:4], ids=describe)
async def test_the_warm_store_lets_an_entry_fault_through(exc: Exception) -> None:
    with pytest.raises(type(exc)):
        await _guard(_raise(exc))


async def test_a_refused_credential_is_not_retried_at_once() -> None:
    """Only reachability and time-outs are retried in-process; the rest waits for the breaker."""
    flags = []
    for exc in (AutoReconnect("reset"), OperationFailure("Authentication failed.", 18)):
        with pytest.raises(BackendUnavailable) as raised:
            await _guard(_raise(exc))
        flags.append(raised.value.retryable)
    assert flags == [True, False]
