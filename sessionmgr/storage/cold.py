"""The cold tier: archived sessions as S3 objects, through aioboto3.

This is the only module that talks to S3. Objects are whole (one PUT, one GET); timeouts are
short and retries few, so an unreachable endpoint is a quick `BackendUnavailable("s3")`.
Credentials come from the standard AWS chain (`AWS_*` variables, profiles, roles).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.settings import Settings

T = TypeVar("T")
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
# 4xx answers that still mean "S3 is struggling, try again": everything else in 4xx is S3
# refusing this one request (AccessDenied, InvalidObjectState for an object moved to Glacier,
# a KMS key it may not use), which must not open the breaker for every other session.
_REFUSED = frozenset({"AccessDenied", "InvalidObjectState", "KMS.AccessDeniedException"})
_TRANSIENT_4XX = frozenset(
    {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling", "ThrottlingException"}
)
# Not `Content-Encoding: gzip`: an HTTP client could then unzip it on the way and the
# checksum, taken over the stored bytes, would no longer match.
CONTENT_TYPE = "application/gzip"


class S3ArchiveStore:
    """`ArchiveStore` on one aiobotocore S3 client and one bucket."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._s3 = client
        self._bucket = bucket

    @property
    def bucket(self) -> str:
        return self._bucket

    async def ping(self) -> None:
        try:
            await _guard(self._s3.head_bucket(Bucket=self._bucket))
        except _NotFound:
            raise BackendUnavailable("s3", f"bucket {self._bucket} does not exist") from None

    async def put(self, key: str, body: bytes) -> None:
        await _guard(
            self._s3.put_object(
                Bucket=self._bucket,
                Key=key,
                Body=body,
                ContentType=CONTENT_TYPE,
            )
        )

    async def get(self, key: str) -> bytes | None:
        """The object's bytes as stored (still gzipped), or None when there is no such key."""
        try:
            answer = await _guard(self._s3.get_object(Bucket=self._bucket, Key=key))
            async with answer["Body"] as stream:
                data: bytes = await _guard(stream.read())
        except _NotFound:
            return None
        return data

    async def size(self, key: str) -> int | None:
        try:
            head = await _guard(self._s3.head_object(Bucket=self._bucket, Key=key))
        except _NotFound:
            return None
        return int(head["ContentLength"])

    async def delete(self, key: str) -> None:
        """Idempotent: deleting a key that is not there succeeds."""
        await _guard(self._s3.delete_object(Bucket=self._bucket, Key=key))


class _NotFound(Exception):
    pass


class Refused(BackendUnavailable):
    """S3 answered but will not serve this one object: no outage, the breaker stays closed."""

    outage = False


async def _guard(awaitable: Awaitable[T]) -> T:
    """A missing key is `_NotFound`; any other S3 failure is `BackendUnavailable("s3")`."""
    try:
        return await awaitable
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise _NotFound(code) from exc
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        refused = code in _REFUSED or (400 <= status < 500 and status != 429)
        if refused and code not in _TRANSIENT_4XX:
            raise Refused("s3", f"{code or status} (refused)", 60, retryable=False) from exc
        raise BackendUnavailable("s3", code or "error") from exc
    except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as exc:
        # aiohttp's errors (a body cut short: ClientPayloadError) reach us unwrapped.
        raise BackendUnavailable("s3", type(exc).__name__) from exc


def s3_client_options(settings: Settings) -> dict[str, Any]:
    """Endpoint, region, TLS and bounded timeouts for an aioboto3 S3 client."""
    config = AioConfig(
        connect_timeout=settings.s3_timeout_s,
        read_timeout=settings.s3_timeout_s,
        retries={"max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    options: dict[str, Any] = {"region_name": settings.s3_region, "config": config}
    if settings.s3_endpoint_url:
        options["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_ca_bundle:
        options["verify"] = settings.s3_ca_bundle
    return options


async def open_archive_store(settings: Settings) -> AsyncGenerator[S3ArchiveStore, None]:
    """Container resource: one S3 client for the process, closed at shutdown."""
    session = aioboto3.Session()
    async with session.client("s3", **s3_client_options(settings)) as client:
        yield S3ArchiveStore(client, settings.s3_bucket)
