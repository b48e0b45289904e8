"""/health answers from a short cache: one backend check per replica per `HEALTH_CACHE_S`."""

from __future__ import annotations

import asyncio

from sessionmgr.api.health import BackendState, CachedReadiness, Readiness

UP = Readiness(status="ok", backends={"redis": BackendState(status="up")})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_calls_within_the_ttl_share_one_check() -> None:
    checks = 0

    async def check() -> tuple[int, Readiness]:
        nonlocal checks
        checks += 1
        await asyncio.sleep(0.01)
        return 200, UP

    clock = Clock()
    cached = CachedReadiness(check, 1.0, monotonic=clock)
    answers = await asyncio.gather(*(cached.get() for _ in range(50)))  # a burst of probes
    assert checks == 1
    assert all(a == (200, UP) for a in answers)
    clock.now += 0.9
    await cached.get()
    assert checks == 1
    clock.now += 0.2  # past the ttl: checked anew
    await cached.get()
    assert checks == 2


async def test_a_zero_ttl_checks_every_time() -> None:
    checks = 0

    async def check() -> tuple[int, Readiness]:
        nonlocal checks
        checks += 1
        return 200, UP

    cached = CachedReadiness(check, 0.0, monotonic=Clock())
    for _ in range(3):
        await cached.get()
    assert checks == 3


async def test_a_change_the_process_saw_is_checked_at_once() -> None:
    checks = 0
    breaker = "closed"

    async def check() -> tuple[int, Readiness]:
        nonlocal checks
        checks += 1
        return 200, UP

    cached = CachedReadiness(check, 60.0, lambda: breaker, monotonic=Clock())
    await cached.get()
    await cached.get()
    assert checks == 1
    breaker = "open"  # an outage seen by a request: /health must not say ok for a minute
    await cached.get()
    assert checks == 2
