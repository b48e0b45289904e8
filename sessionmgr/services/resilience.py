"""Circuit breakers and retries for the backends (DESIGN §6), in one replaceable module.

`Breaker` runs aiobreaker 1.2 and handles its known quirks:

- time: aiobreaker stamps `opened_at` with the deprecated `datetime.utcnow()` and compares it
  with local `datetime.now()`. Here the open period is timed on a monotonic clock of our own;
  aiobreaker's `open()` is overridden so it never reads a clock, and an open breaker never
  hands a call to aiobreaker (whose open state reads `utcnow()`). No local time, no
  DeprecationWarning, whatever `TZ` says.
- half-open: aiobreaker lets every concurrent call through as a trial. Here exactly one trial
  runs; the others fail fast until its verdict.
- failures: only `BackendUnavailable` of the breaker's own backend counts; a 404, 409 or 422
  means the backend answered. One failure that several requests share (a batch's lost round
  trip) counts once.

`Guarded` puts a store behind its backend's breaker and retries, with stamina, what the store
marked `retryable`: transient errors of reads and of writes a retry cannot apply twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import msgspec
import stamina
from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerListener
from aiobreaker.state import CircuitBreakerState

from sessionmgr.domain.errors import (
    BackendUnavailable,
    CircuitOpen,
    ReadOnlyMode,
    shared_failure,
)
from sessionmgr.metrics import BreakerState, Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
BACKENDS = ("redis", "mongodb", "s3")
_STATES = {
    CircuitBreakerState.CLOSED: BreakerState.CLOSED,
    CircuitBreakerState.HALF_OPEN: BreakerState.HALF_OPEN,
    CircuitBreakerState.OPEN: BreakerState.OPEN,
}


class _ClocklessBreaker(CircuitBreaker):  # type: ignore[misc]
    """aiobreaker without its clock: `Breaker` decides when the open period is over."""

    def open(self) -> None:
        self._state_storage.opened_at = None  # aiobreaker's open state skips its check on None
        self.state = self._state_storage.state = CircuitBreakerState.OPEN

    @property
    def opens_at(self) -> None:
        return None


class _Transitions(CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        self._breaker._changed(_STATES[new.state])


class Breaker:
    """One backend's circuit breaker: opens after `fail_max` consecutive unavailability
    errors, fails fast for `reset_s`, then lets one trial call decide."""

    def __init__(
        self,
        backend: str,
        *,
        fail_max: int = 5,
        reset_s: float = 5.0,
        on_change: Callable[[str, BreakerState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.reset_s = reset_s
        self._on_change = on_change
        self._clock = clock
        self._opened_at = 0.0
        self._trial_running = False
        self._counted: collections.deque[BaseException] = collections.deque(maxlen=32)
        self._cb = _ClocklessBreaker(
            fail_max=fail_max,
            timeout_duration=timedelta(seconds=reset_s),
            exclude=[self._not_ours],
            listeners=[_Transitions(self)],
            name=backend,
        )

    @property
    def state(self) -> BreakerState:
        return _STATES[self._cb.current_state]

    @property
    def trial_due(self) -> bool:
        """Open, and its period is over: the next call will be the trial."""
        return self.state is BreakerState.OPEN and self._clock() >= self._opened_at + self.reset_s

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` unless the breaker is open; raises `CircuitOpen` when it fails fast."""
        if self._cb.current_state is CircuitBreakerState.CLOSED:
            return await self._closed(fn)
        state = self.state
        if state is BreakerState.OPEN:
            left = self._opened_at + self.reset_s - self._clock()
            if left > 0:
                raise self._fail_fast(left)
            self._cb.half_open()
        if self._trial_running:
            raise self._fail_fast(self.reset_s)
        self._trial_running = True
        try:
            return await self._through(fn)
        finally:
            # A cancelled trial has no verdict: the breaker stays half-open for the next call.
            self._trial_running = False

    async def _closed(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Closed: `fn` runs here, and aiobreaker hears only what moves its count. With no
        failure counted (nearly every call), an answer or an error that is not this backend's
        outage would only reset a count that is 0. This backend's outage is counted, once per
        failure: the copies of one failure that several requests share (one lost round trip
        that carried them all, `errors.shared_failure`) count as one, and do not reset it."""
        cb = self._cb
        try:
            result = await fn()
        except Exception as exc:
            ours = not self._not_ours(exc)
            if ours and self._counted_already(exc):
                raise
            if not (ours or cb.fail_counter) or cb.current_state is not CircuitBreakerState.CLOSED:
                raise  # nothing to count or reset, or opened meanwhile
            return await self._through(functools.partial(_raise, exc))
        if cb.fail_counter and cb.current_state is CircuitBreakerState.CLOSED:
            return await self._through(functools.partial(_value, result))  # resets the count
        return result

    def _counted_already(self, exc: BaseException) -> bool:
        """Whether `exc` is a copy of a shared failure this breaker counted (noting it if not)."""
        failure = shared_failure(exc)
        if failure is None:
            return False
        if any(seen is failure for seen in self._counted):
            return True
        self._counted.append(failure)
        return False

    async def _through(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self._cb.call_async(fn)  # type: ignore[no-any-return]
        except CircuitBreakerError as exc:
            # aiobreaker wraps the failure that tripped it; the caller wants that failure.
            cause = exc.__cause__
            if isinstance(cause, BaseException):
                raise cause from cause.__cause__
            raise self._fail_fast(self.reset_s) from None

    def _fail_fast(self, left_s: float) -> CircuitOpen:
        retry_after = max(1, math.ceil(left_s))
        return (
            ReadOnlyMode(retry_after)
            if self.backend == "redis"
            else CircuitOpen(self.backend, retry_after)
        )

    def _not_ours(self, exc: BaseException) -> bool:
        return not (
            isinstance(exc, BackendUnavailable) and exc.backend == self.backend and exc.outage
        )

    def _changed(self, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        if self._on_change is not None:
            self._on_change(self.backend, state)


async def _raise(failure: Exception) -> Any:
    raise failure


async def _value(result: T) -> T:
    return result


class Breakers:
    """A breaker per backend, each exporting its state (and Redis' the read-only flag)."""

    def __init__(self, metrics: Metrics, *, fail_max: int = 5, reset_s: float = 5.0) -> None:
        self._metrics = metrics
        for name in BACKENDS:
            metrics.breaker_state.labels(name).set(BreakerState.CLOSED)
        metrics.read_only.set(0)
        self._by_backend = {
            name: Breaker(name, fail_max=fail_max, reset_s=reset_s, on_change=self._export)
            for name in BACKENDS
        }

    def __getitem__(self, backend: str) -> Breaker:
        return self._by_backend[backend]

    @property
    def read_only(self) -> bool:
        return self["redis"].state is not BreakerState.CLOSED

    def _export(self, backend: str, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            log.warning("%s circuit breaker opened: failing fast for a while", backend)
        elif state is BreakerState.CLOSED:
            log.info("%s circuit breaker closed: %s answers again", backend, backend)
        self._metrics.breaker_state.labels(backend).set(state)
        if backend == "redis":
            self._metrics.read_only.set(0 if state is BreakerState.CLOSED else 1)


class RetryPolicy(msgspec.Struct, frozen=True):
    """Bounded retries for the request path: a few attempts, jittered, within `timeout_s`."""

    attempts: int = 3
    timeout_s: float = 1.5
    wait_initial_s: float = 0.05
    wait_max_s: float = 0.4
    wait_jitter_s: float = 0.1


class Guarded:
    """A store whose coroutine methods run through `breaker`, retried under `policy`.

    Only errors the store marked `retryable` are retried, never one raised by an open breaker,
    and never a 409: whatever is not `BackendUnavailable` passes through at once.
    `no_retry` names methods tried once (a health probe must say what it saw).
    """

    def __init__(
        self,
        target: object,
        breaker: Breaker,
        policy: RetryPolicy,
        metrics: Metrics,
        *,
        no_retry: frozenset[str] = frozenset({"ping"}),
    ) -> None:
        self._target = target
        self._breaker = breaker
        self._policy = policy
        self._metrics = metrics
        self._no_retry = no_retry

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        target = self._target

        @functools.wraps(attr)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            # Looked up per call, so the target's own attribute is the one that runs.
            return await self.call(name, functools.partial(getattr(target, name), *args, **kwargs))

        self.__dict__[name] = guarded  # found directly from now on
        return guarded

    async def call(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        if operation in self._no_retry:
            return await self._breaker.call(fn)
        # The first attempt runs bare: stamina's machinery costs a request's worth of CPU on
        # every call, and nearly every call succeeds. Only a transient error enters it.
        started = time.monotonic()
        try:
            return await self._breaker.call(fn)
        except BackendUnavailable as exc:
            left_s = self._policy.timeout_s - (time.monotonic() - started)
            if not self._transient(exc) or self._policy.attempts < 2 or left_s <= 0:
                raise
            first: BaseException | None = exc
        return await self._retry(operation, fn, first, left_s)

    async def _retry(
        self,
        operation: str,
        fn: Callable[[], Awaitable[T]],
        first: BaseException | None,
        left_s: float,
    ) -> T:
        """The rest of the attempts, as if stamina had run the first one: its failure is
        replayed as attempt 1, so the waits, hooks and the overall timeout are stamina's."""
        p = self._policy
        async for attempt in stamina.retry_context(
            on=self._transient,
            attempts=p.attempts,
            timeout=left_s,
            wait_initial=p.wait_initial_s,
            wait_max=p.wait_max_s,
            wait_jitter=p.wait_jitter_s,
        ):
            with attempt:
                if first is not None:
                    failed, first = first, None
                    raise failed
                self._metrics.retries.labels(self._breaker.backend, operation).inc()
                return await self._breaker.call(fn)
        raise AssertionError("stamina ends with an answer or the last error")  # pragma: no cover

    def _transient(self, exc: Exception) -> bool:
        """Retry this backend's own transient errors; another backend's were retried by its
        own guard (a MongoDB error inside a Redis transaction is not Redis' to retry)."""
        return (
            isinstance(exc, BackendUnavailable)
            and exc.retryable
            and exc.backend == self._breaker.backend
        )


@contextlib.asynccontextmanager
async def probing(stores: dict[str, Any], breakers: Breakers) -> AsyncIterator[None]:
    """While the app runs, ping each backend whose breaker is due for a trial, so that
    read-only mode ends (and its metric says so) even when no request comes by."""

    async def probe() -> None:
        while True:
            await asyncio.sleep(min(b.reset_s for b in map(breakers.__getitem__, stores)) / 2)
            for name, store in stores.items():
                if breakers[name].trial_due:
                    with contextlib.suppress(BackendUnavailable):
                        await store.ping()

    task = asyncio.create_task(probe(), name="backend-probe")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
