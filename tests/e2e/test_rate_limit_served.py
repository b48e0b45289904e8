"""429 answers say when to retry and what the limit is (Retry-After, IETF RateLimit and
RateLimit-Policy), and callers with role `service` can have a higher limit of their own:
black-box against a `sessionmgr serve` with small limits."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from tests.e2e.served import Served, check_problem, headers, serve
from tests.support.redis_server import RedisServer

BURST = 3


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if redis_server.process is None:
        redis_server.start()
    env = {
        "SESSIONMGR_REDIS_URL": redis_server.url,
        "SESSIONMGR_RATE_LIMIT_PER_S": "0.5",
        "SESSIONMGR_RATE_LIMIT_BURST": str(BURST),
        "SESSIONMGR_RATE_LIMIT_SERVICE_PER_S": "1000",
        "SESSIONMGR_RATE_LIMIT_SERVICE_BURST": "1000",
    }
    with serve(env, tmp_path_factory.mktemp("limits") / "serve.log") as server:
        yield server


def test_a_429_carries_retry_after_and_the_ietf_ratelimit_fields(served: Served):
    caller = headers(f"chatty-{secrets.token_hex(4)}")
    with served.client() as http:
        answers = [http.get("/v1/sessions", headers=caller) for _ in range(BURST + 1)]
    assert [a.status_code for a in answers] == [200] * BURST + [429]
    limited = answers[-1]
    assert check_problem(limited)["type"] == "/problems#rate-limited"
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 2
    assert limited.headers["ratelimit"] == f'"default";r=0;t={retry_after}'
    assert limited.headers["ratelimit-policy"] == f'"default";q={BURST};w=6'
    assert re.fullmatch(r"[0-9a-f]{32}", limited.headers["x-request-id"])


def test_a_service_has_its_own_higher_limit(served: Served):
    service = headers(f"backend-{secrets.token_hex(4)}", roles=("service",))
    with served.client() as http:
        answers = [http.get("/v1/sessions", headers=service) for _ in range(BURST * 4)]
    assert {a.status_code for a in answers} == {200}
