"""The app as one replica builds it, for the bench scripts that call it in their own process
(`bench.heap`, `bench.where`, `bench.micro`): a Redis they started, the in-memory MongoDB,
one principal with no rate limit, and S3 only where a script brings one."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from litestar import Litestar

    from sessionmgr.devstack import InProcessS3

SECRET = "bench-inprocess-secret-0123456789abcdef"


def build_app(
    redis_url: str,
    *,
    s3: InProcessS3 | None = None,
    write_behind: bool = False,
    mongodb_uri: str = "mongomock://",
    **settings: Any,
) -> Litestar:
    from sessionmgr.app import create_app
    from sessionmgr.container import build_container
    from sessionmgr.devstack import dev_aws_credentials
    from sessionmgr.settings import load_settings

    dev_aws_credentials(os.environ)
    loaded = load_settings(
        {},
        redis_url=redis_url,
        mongodb_uri=mongodb_uri,
        jwt_secret=SECRET,
        rate_limit_per_s=0,
        s3_endpoint_url=s3.url if s3 else "http://127.0.0.1:9",  # without S3: never called
        s3_bucket=s3.bucket if s3 else "bench-inprocess",
        **settings,
    )
    app = create_app(build_container(loaded, write_behind=write_behind))
    logging.getLogger().setLevel(logging.WARNING)  # no line per request
    return app


def bearer(sub: str = "bench-user", roles: tuple[str, ...] = ()) -> str:
    from sessionmgr.api.auth import issue_token

    return f"Bearer {issue_token(SECRET, sub, roles=roles)}"
