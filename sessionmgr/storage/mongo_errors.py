"""What a MongoDB error says: an outage (any write would fail now) or a fault of one write.

The write-behind keeps an entry pending through an outage however long it lasts, and parks
only an entry that MongoDB refuses for what it is. So the classes below err on the side of
"outage": an error whose code is not known to be about the document is never the entry's.
"""

from __future__ import annotations

from bson.errors import InvalidDocument
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from sessionmgr.domain.errors import describe as describe  # where it was first defined

DUPLICATE_KEY = 11000

# Codes any write gets while the deployment cannot take writes: network, elections,
# shutdown, credentials, write concern, locks and time limits, disk and quota.
OUTAGE_CODES = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        11,  # UserNotFound
        13,  # Unauthorized
        18,  # AuthenticationFailed
        24,  # LockTimeout
        46,  # LockBusy
        50,  # MaxTimeMSExpired
        64,  # WriteConcernFailed
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        100,  # UnsatisfiableWriteConcern
        112,  # WriteConflict
        117,  # ConflictingOperationInProgress
        133,  # FailedToSatisfyReadPreference
        134,  # ReadConcernMajorityNotAvailableYet
        189,  # PrimarySteppedDown
        202,  # NetworkInterfaceExceededTimeLimit
        262,  # ExceededTimeLimit
        8000,  # AtlasError (over the space quota, among others)
        9001,  # SocketException
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        12586,  # BackgroundOperationInProgressForDatabase
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
        14031,  # OutOfDiskSpace
        16500,  # Cosmos/Atlas "request rate too large"
    }
)
OUTAGE_LABELS = ("RetryableWriteError", "TransientTransactionError", "NoWritesPerformed")
OUTAGE_WORDS = (
    "no space left",
    "quota",
    "disk full",
    "not primary",
    "not master",
    "authenticat",
    "unauthorized",
)


def is_outage(exc: BaseException) -> bool:
    """True when every write would get this error now, whatever it carried."""
    if isinstance(exc, ConnectionFailure | WriteConcernError):
        return True
    if isinstance(exc, BulkWriteError):
        return _bulk_outage(exc)
    if isinstance(exc, OperationFailure):
        if exc.code in OUTAGE_CODES or any(exc.has_error_label(label) for label in OUTAGE_LABELS):
            return True
        return _sounds_like_outage(str(exc))
    # A driver error that is not about one document (configuration, encryption, a closed
    # client) stops every write alike.
    return isinstance(exc, PyMongoError)


def is_entry_fault(exc: BaseException) -> bool:
    """True when MongoDB refused this write for its own content (validation, a bad value, a
    document too large, one it cannot encode): retrying the same bytes fails again."""
    return isinstance(exc, InvalidDocument) or (
        isinstance(exc, OperationFailure | ValueError | TypeError) and not is_outage(exc)
    )


def _bulk_outage(exc: BulkWriteError) -> bool:
    details = exc.details or {}
    if details.get("writeConcernErrors"):
        return True
    errors = details.get("writeErrors") or []
    return any(
        e.get("code") in OUTAGE_CODES or _sounds_like_outage(str(e.get("errmsg", "")))
        for e in errors
    )


def _sounds_like_outage(message: str) -> bool:
    lowered = message.lower()
    return any(word in lowered for word in OUTAGE_WORDS)
