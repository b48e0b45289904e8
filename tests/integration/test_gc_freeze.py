"""At start-up the app moves its long-lived heap out of the garbage collector's reach
(`gc.freeze()`), so a full collection under load walks only what requests allocated."""

from __future__ import annotations

import gc
import logging
import re

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.app import create_app
from sessionmgr.container import build_container
from sessionmgr.settings import Settings


@pytest.mark.parametrize("freeze", [True, False])
async def test_startup_freezes_the_heap_only_when_asked(
    settings: Settings, freeze: bool, caplog: pytest.LogCaptureFixture
) -> None:
    gc.unfreeze()
    app = create_app(build_container(msgspec.structs.replace(settings, gc_freeze=freeze)))
    caplog.set_level(logging.INFO, logger="sessionmgr.api.bridge")

    async with AsyncTestClient(app=app) as client:
        frozen = gc.get_freeze_count()
        assert (await client.get("/health/live")).status_code == 200

    if freeze:
        assert frozen > 10_000  # the app, its modules and schemas at the least
        logged = re.search(r"start-up heap frozen: (\d+) objects", caplog.text)
        assert logged is not None and int(logged.group(1)) > 10_000
    else:
        assert frozen == 0
        assert "frozen" not in caplog.text
