"""bench/peer.py: the peer scenario skips, saying why, when no PostgreSQL answers (no timing)."""

from __future__ import annotations

import socket

import pytest

from bench import peer, shape

pytest.importorskip("sqlalchemy", reason="the peer's dependencies are in the bench group only")
pytest.importorskip("asyncpg", reason="the peer's dependencies are in the bench group only")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


async def test_an_unreachable_postgresql_is_a_skip_that_says_so() -> None:
    url = f"postgresql+asyncpg://postgres:secret@127.0.0.1:{closed_port()}/test"

    why = await peer.reachable(url)

    assert why is not None
    assert why.startswith("no PostgreSQL reachable at postgresql+asyncpg://postgres:***@")
    assert "secret" not in why


def test_both_sides_store_the_same_session_shape() -> None:
    assert len(shape.compact(shape.CONTEXT_SUMMARY)) == shape.CONTEXT_BYTES == 200
    assert '"context_summary":' + shape.compact(shape.CONTEXT_SUMMARY) in shape.CREATE_BODY
    assert shape.compact(shape.EVENT) in shape.APPEND_BODY
