"""The breaker wrapper and retry policy: each aiobreaker quirk it handles, and what it retries."""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import Iterator

import pytest

from sessionmgr.domain.errors import (
    BackendUnavailable,
    CircuitOpen,
    ConcurrencyConflict,
    ReadOnlyMode,
    SessionNotFound,
)
from sessionmgr.metrics import BreakerState, Metrics
from sessionmgr.services.resilience import Breaker, Breakers, Guarded, RetryPolicy
from sessionmgr.storage.turn_batch import _own_copy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """A store whose next answers are scripted: an exception to raise or a value to return."""

    def __init__(self, name: str = "redis") -> None:
        self.name = name
        self.calls = 0
        self.fail_with: BaseException | None = None

    async def op(self) -> str:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        return "ok"

    def down(self, **kwargs: bool) -> None:
        self.fail_with = BackendUnavailable(self.name, "not reachable", **kwargs)

    def up(self) -> None:
        self.fail_with = None


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def gauge(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


def breaker_state(metrics: Metrics, backend: str) -> BreakerState:
    return BreakerState(int(gauge(metrics, "sessionmgr_circuit_breaker_state", backend=backend)))


async def trip(breaker: Breaker, backend: Backend, times: int) -> None:
    backend.down()
    for _ in range(times):
        with pytest.raises(BackendUnavailable):
            await breaker.call(backend.op)


async def test_opens_after_the_configured_failures_and_then_fails_fast(clock: Clock) -> None:
    breaker, backend = Breaker("mongodb", fail_max=3, reset_s=5, clock=clock), Backend("mongodb")

    await trip(breaker, backend, 2)
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(BackendUnavailable) as tripped:
        await breaker.call(backend.op)
    assert not isinstance(tripped.value, CircuitOpen), "the caller sees the real failure"
    assert breaker.state is BreakerState.OPEN

    clock.now += 2
    with pytest.raises(CircuitOpen) as fast:
        await breaker.call(backend.op)
    assert backend.calls == 3, "an open breaker does not ask the backend"
    assert fast.value.backend == "mongodb"
    assert fast.value.retry_after_s == 3
    assert not fast.value.retryable


async def test_redis_fails_fast_as_read_only(clock: Clock) -> None:
    breaker, backend = Breaker("redis", fail_max=1, reset_s=5, clock=clock), Backend()
    await trip(breaker, backend, 1)
    with pytest.raises(ReadOnlyMode):
        await breaker.call(backend.op)


@pytest.mark.parametrize(
    "answer",
    [
        SessionNotFound("x"),
        ConcurrencyConflict("x", 3),
        BackendUnavailable("mongodb", "another backend"),
        ValueError("a bug, not an outage"),
    ],
)
async def test_only_its_own_backends_unavailability_counts(clock: Clock, answer: Exception) -> None:
    breaker, backend = Breaker("redis", fail_max=2, reset_s=5, clock=clock), Backend()
    backend.fail_with = answer
    for _ in range(5):
        with pytest.raises(type(answer)):
            await breaker.call(backend.op)
    assert breaker.state is BreakerState.CLOSED


async def test_a_success_resets_the_count_of_consecutive_failures(clock: Clock) -> None:
    breaker, backend = Breaker("redis", fail_max=2, reset_s=5, clock=clock), Backend()
    for _ in range(3):
        await trip(breaker, backend, 1)
        backend.up()
        assert await breaker.call(backend.op) == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_the_caller_gets_the_very_error_and_only_outages_count(clock: Clock) -> None:
    """Closed with nothing counted, a call runs outside aiobreaker: the same outcomes."""
    breaker, backend = Breaker("redis", fail_max=2, reset_s=5, clock=clock), Backend()
    outage, other = BackendUnavailable("redis", "down"), SessionNotFound("x")
    for answer in (other, outage, other, outage):
        backend.fail_with = answer
        with pytest.raises(type(answer)) as raised:
            await breaker.call(backend.op)
        assert raised.value is answer
        # An answer that is not an outage resets the count, as aiobreaker's success does.
        assert breaker._cb.fail_counter == (1 if answer is outage else 0)
    assert breaker.state is BreakerState.CLOSED
    await trip(breaker, backend, 1)  # the second outage in a row
    assert breaker.state is BreakerState.OPEN


async def test_after_the_timeout_one_trial_call_closes_it(clock: Clock) -> None:
    breaker, backend = Breaker("redis", fail_max=1, reset_s=5, clock=clock), Backend()
    await trip(breaker, backend, 1)
    backend.up()
    clock.now += 5
    assert await breaker.call(backend.op) == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_a_failed_trial_opens_it_for_another_period(clock: Clock) -> None:
    breaker, backend = Breaker("redis", fail_max=1, reset_s=5, clock=clock), Backend()
    await trip(breaker, backend, 1)
    clock.now += 5
    with pytest.raises(BackendUnavailable) as trial:
        await breaker.call(backend.op)
    assert not isinstance(trial.value, CircuitOpen)
    assert breaker.state is BreakerState.OPEN
    clock.now += 4
    with pytest.raises(CircuitOpen):
        await breaker.call(backend.op)
    assert backend.calls == 2


async def test_half_open_lets_exactly_one_concurrent_call_through(clock: Clock) -> None:
    breaker, backend = Breaker("redis", fail_max=1, reset_s=5, clock=clock), Backend()
    await trip(breaker, backend, 1)
    backend.up()
    clock.now += 5
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return await backend.op()

    trial = asyncio.create_task(breaker.call(slow))
    await asyncio.sleep(0)
    assert breaker.state is BreakerState.HALF_OPEN
    for _ in range(10):
        with pytest.raises(CircuitOpen):
            await breaker.call(backend.op)
    release.set()
    assert await trial == "ok"
    assert backend.calls == 2, "the failed call and the one trial"
    assert breaker.state is BreakerState.CLOSED


async def test_a_cancelled_trial_leaves_room_for_the_next(clock: Clock) -> None:
    breaker, backend = Breaker("redis", fail_max=1, reset_s=5, clock=clock), Backend()
    await trip(breaker, backend, 1)
    backend.up()
    clock.now += 5
    trial = asyncio.create_task(breaker.call(asyncio.Event().wait))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert breaker.state is BreakerState.HALF_OPEN
    assert await breaker.call(backend.op) == "ok"
    assert breaker.state is BreakerState.CLOSED


@pytest.fixture
def far_from_utc() -> Iterator[None]:
    """Local time 14 hours ahead of UTC: aiobreaker alone would compare the two."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Etc/GMT-14"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


class NoClock:
    """Stands in for `datetime` inside aiobreaker: any clock read fails the test."""

    @staticmethod
    def utcnow() -> None:
        raise AssertionError("aiobreaker read datetime.utcnow()")

    @staticmethod
    def now() -> None:
        raise AssertionError("aiobreaker read the local time")


@pytest.mark.usefixtures("far_from_utc")
async def test_no_local_time_and_no_utcnow_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("aiobreaker.state.datetime", NoClock)
    monkeypatch.setattr("aiobreaker.circuitbreaker.datetime", NoClock)
    breaker, backend = Breaker("redis", fail_max=1, reset_s=0.2), Backend()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # datetime.utcnow() would raise DeprecationWarning
        await trip(breaker, backend, 1)
        with pytest.raises(CircuitOpen):
            await breaker.call(backend.op)
        await asyncio.sleep(0.25)
        backend.up()
        assert await breaker.call(backend.op) == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_every_state_is_exported_as_it_happens(clock: Clock, metrics: Metrics) -> None:
    breakers = Breakers(metrics, fail_max=1, reset_s=5)
    for name in ("redis", "mongodb", "s3"):
        assert breaker_state(metrics, name) is BreakerState.CLOSED
    assert gauge(metrics, "sessionmgr_read_only") == 0
    breaker, backend = breakers["redis"], Backend()
    breaker._clock = clock  # the breaker under test reads the fake clock
    seen: list[BreakerState] = []

    async def watched() -> str:
        seen.append(breaker_state(metrics, "redis"))
        return await backend.op()

    await trip(breaker, backend, 1)
    assert breaker_state(metrics, "redis") is BreakerState.OPEN
    assert gauge(metrics, "sessionmgr_read_only") == 1
    assert breakers.read_only
    backend.up()
    clock.now += 5
    await breaker.call(watched)
    assert seen == [BreakerState.HALF_OPEN]
    assert breaker_state(metrics, "redis") is BreakerState.CLOSED
    assert gauge(metrics, "sessionmgr_read_only") == 0
    assert breaker_state(metrics, "mongodb") is BreakerState.CLOSED


def guarded(backend: Backend, metrics: Metrics, fail_max: int = 100) -> Guarded:
    return Guarded(backend, Breaker(backend.name, fail_max=fail_max), RetryPolicy(), metrics)


def retries(metrics: Metrics, operation: str = "op") -> float:
    value = metrics.registry.get_sample_value(
        "sessionmgr_retries_total", {"backend": "redis", "operation": operation}
    )
    return value or 0.0


async def test_retryable_errors_are_tried_again_and_counted(metrics: Metrics) -> None:
    backend = Backend()
    backend.down()
    store = guarded(backend, metrics)
    with pytest.raises(BackendUnavailable):
        await store.op()
    assert backend.calls == 3  # the stamina testing fixture's attempts
    assert retries(metrics) == 2


async def test_a_retry_that_succeeds_answers(metrics: Metrics) -> None:
    backend = Backend()
    store = guarded(backend, metrics)
    original = backend.op

    async def flaky() -> str:
        if backend.calls == 0:
            backend.calls += 1
            raise BackendUnavailable("redis", "reset")
        return await original()

    backend.op = flaky  # type: ignore[method-assign]
    assert await store.op() == "ok"
    assert retries(metrics) == 1


@pytest.mark.parametrize(
    "answer",
    [
        BackendUnavailable("redis", "outcome unknown", retryable=False),
        BackendUnavailable("mongodb", "retried by its own guard"),
        ConcurrencyConflict("x", 2),
        SessionNotFound("x"),
    ],
)
async def test_what_is_never_retried(metrics: Metrics, answer: Exception) -> None:
    backend = Backend()
    backend.fail_with = answer
    with pytest.raises(type(answer)):
        await guarded(backend, metrics).op()
    assert backend.calls == 1
    assert retries(metrics) == 0


async def test_retries_stop_when_the_breaker_opens(metrics: Metrics) -> None:
    backend = Backend()
    backend.down()
    store = guarded(backend, metrics, fail_max=2)
    with pytest.raises(CircuitOpen):
        await store.op()  # two failures open the breaker; the third try fails fast
    assert backend.calls == 2
    with pytest.raises(CircuitOpen):
        await store.op()
    assert backend.calls == 2


async def test_a_health_probe_is_tried_once(metrics: Metrics) -> None:
    class Pinged(Backend):
        async def ping(self) -> str:
            return await self.op()

    pinged = Pinged()
    pinged.down()
    with pytest.raises(BackendUnavailable):
        await guarded(pinged, metrics).ping()
    assert pinged.calls == 1


def test_plain_attributes_pass_through(metrics: Metrics) -> None:
    backend = Backend("mongodb")
    assert guarded(backend, metrics).name == "mongodb"


def _copies_of_one_lost_round_trip(n: int) -> list[BackendUnavailable]:
    """What n requests sent in one batch get when its connection drops: each its own
    `BackendUnavailable`, caused by its own copy of the batch's error (turn_batch.py)."""
    lost = ConnectionError("connection reset")
    copies = []
    for _ in range(n):
        try:
            raise BackendUnavailable("redis", "connection reset") from _own_copy(lost)
        except BackendUnavailable as exc:
            copies.append(exc)
    return copies


async def test_one_failure_that_many_requests_share_counts_once(clock: Clock) -> None:
    breaker, backend = Breaker("redis", fail_max=2, reset_s=5, clock=clock), Backend()
    for copy in _copies_of_one_lost_round_trip(10):
        backend.fail_with = copy
        with pytest.raises(BackendUnavailable) as raised:
            await breaker.call(backend.op)
        assert raised.value is copy
    assert breaker.state is BreakerState.CLOSED, "ten requests, one lost round trip"
    await trip(breaker, backend, 1)  # another failure: the second in a row
    assert breaker.state is BreakerState.OPEN


async def test_the_late_copies_of_a_counted_failure_neither_count_nor_reset(
    clock: Clock,
) -> None:
    breaker, backend = Breaker("redis", fail_max=3, reset_s=5, clock=clock), Backend()
    first, *late = _copies_of_one_lost_round_trip(4)
    backend.fail_with = first
    with pytest.raises(BackendUnavailable):
        await breaker.call(backend.op)
    await trip(breaker, backend, 1)  # another failure: two counted
    for copy in late:  # the batch's other requests answered only now
        backend.fail_with = copy
        with pytest.raises(BackendUnavailable):
            await breaker.call(backend.op)
    assert breaker.state is BreakerState.CLOSED, "counted once"
    await trip(breaker, backend, 1)
    assert breaker.state is BreakerState.OPEN, "the third failure in a row: nothing was reset"
