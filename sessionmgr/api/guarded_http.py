"""uvicorn's httptools protocol with the limits it lacks: a bounded request head, header and
body read timeouts, and a per-replica connection cap (docs/security.md).

uvicorn (0.54) has no limit on a request head under httptools (httptools buffers a header
value until it ends: an unfinished 8 MB header stays in memory), no timeout before the first
byte or within a head or body, and its `limit_concurrency` answers a plain-text 503. This
subclass keeps uvicorn's parsing and request cycle and adds, per connection:

- the head (request line and headers) is fed to the parser at most `max_head_bytes` + 1
  bytes at a time; a head that does not end within the budget is a 431 problem, so the
  parser never holds more than the limit (pipelined requests can add one read's worth);
  more than `max_headers` header lines is a 431 too;
- a connection must send a whole head within `header_timeout_s` of opening, and a head that
  started must end within it; a silent connection is closed, a partial head answered 408;
- a body must arrive within `body_timeout_s`, at `body_min_rate_bps` on average once its
  first BODY_RATE_GRACE_S have passed; else 408 and the connection is closed;
- with more than `max_connections` open, a request gets a 503 problem with `Retry-After`
  and its connection is closed.

Idle keep-alive connections are closed by uvicorn's own `timeout_keep_alive` (5 s).
A request whose head arrives whole in one read (every ordinary one) arms no timer.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import msgspec
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from sessionmgr.settings import Settings, load_settings
from sessionmgr.storage.feed_hub import drain_all

BODY_RATE_GRACE_S = 5.0  # a body's first seconds are not held to the minimum rate
LINGER_S = 1.0  # after a refusal, how long the client's remaining bytes are read and dropped
BODY_CHECK_EVERY_S = 1.0  # at most; a shorter body timeout is checked more often
_PROBLEMS = "/problems#"


class HttpLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_head_bytes: int = 16_384
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate_bps: int = 1024
    max_connections: int = 256

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        return cls(**{f: getattr(settings, f) for f in cls.__struct_fields__})


@functools.cache
def _from_environment() -> HttpLimits:
    # A `serve --workers N` worker process imports this class afresh: it reads the same
    # environment `serve` validated.
    return HttpLimits.of(load_settings())


def body_too_slow(limits: HttpLimits, elapsed_s: float, received: int) -> bool:
    """Whether a body that started `elapsed_s` ago and brought `received` bytes must end."""
    if elapsed_s >= limits.body_timeout_s:
        return True
    return elapsed_s >= BODY_RATE_GRACE_S and received < limits.body_min_rate_bps * elapsed_s


def problem_body(status: int, slug: str, detail: str) -> bytes:
    title = STATUS_LINE[status][13:-2].decode()
    problem = {"type": _PROBLEMS + slug, "title": title, "status": status, "detail": detail}
    return json.dumps(problem).encode()


def problem_bytes(status: int, slug: str, detail: str) -> bytes:
    """A whole HTTP/1.1 answer with a problem+json body, for a connection about to close."""
    body = problem_body(status, slug, detail)
    head = (
        b"content-type: application/problem+json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n"
    )
    return STATUS_LINE[status] + head + body


_BUSY = problem_body(503, "too-many-connections", "this replica has too many open connections")


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The answer over the connection cap; `connection: close` makes uvicorn close after it."""
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(_BUSY)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _BUSY, "more_body": False})


class _HeadTooLarge(Exception):
    """Raised inside a parser callback to stop the parse; answered as a 431."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """`uvicorn.run(..., http=GuardedHttpProtocol)`; limits from `configure` or the environment."""

    limits: HttpLimits | None = None

    @classmethod
    def configure(cls, settings: Settings) -> None:
        cls.limits = HttpLimits.of(settings)

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = type(self).limits or _from_environment()
        self._in_head = True
        self._head_left = self._limits.max_head_bytes
        self._refusal: tuple[int, str, str] | None = None
        self._lingering = False  # answered a refusal: what still arrives is dropped
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_bytes = 0
        self._body_check_s = min(BODY_CHECK_EVERY_S, self._limits.body_timeout_s / 4)

    # -- connection ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """SIGTERM: change feeds end now (their clients reconnect to another replica); a
        stream never finishes by itself, so waiting for it would only burn the grace period."""
        drain_all()
        super().shutdown()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # the first head must come in time, even its first byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if not self._in_head or len(data) <= self._head_left:  # every ordinary read
            if self._in_head:
                self._head_left -= len(data)
            super().data_received(data)
        else:
            self._feed_bounded(data)
        if self._lingering or self.transport.is_closing():
            return
        if self._in_head:
            if self._head_left < self._limits.max_head_bytes and self._head_timer is None:
                self._arm_head_timer()  # a head began in this read and goes on in the next
        elif self._body_timer is None:  # a body is still on its way (its clock starts now)
            self._body_started = self.loop.time()
            self._body_timer = self.loop.call_later(self._body_check_s, self._check_body)

    def _feed_bounded(self, data: bytes) -> None:
        """Feed a read that may hold more head than is left, never past the limit + 1."""
        while data and not self._finished():
            if self._in_head:
                take = self._head_left + 1
                part, data = data[:take], data[take:]
                self._head_left -= len(part)
            else:
                part, data = data, b""
            super().data_received(part)
            if self._in_head and self._head_left < 0 and not self._finished():
                self._refuse_head(f"the request head is over {self._limits.max_head_bytes} bytes")

    def handle_websocket_upgrade(self) -> None:
        self._cancel_head_timer()  # the connection is the websocket protocol's from here
        self._cancel_body_timer()
        self._in_head = False
        super().handle_websocket_upgrade()

    # -- parser callbacks ----------------------------------------------------------------

    def on_headers_complete(self) -> None:
        # Counted here, not per header: the head's size already bounds what the list holds.
        if len(self.headers) > self._limits.max_headers:
            detail = f"the request has over {self._limits.max_headers} header lines"
            self._refusal = (431, "head-too-large", detail)
            raise _HeadTooLarge(detail)  # stops the parse; uvicorn then calls send_400_response
        self._in_head, self._body_bytes = False, 0
        if self._head_timer is not None:
            self._cancel_head_timer()
        if len(self.connections) <= self._limits.max_connections:
            super().on_headers_complete()
            return
        self.logger.warning("over %d open connections: answering 503", self._limits.max_connections)
        app, self.app = self.app, _busy
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head, self._head_left = True, self._limits.max_head_bytes
        if self._body_timer is not None:
            self._cancel_body_timer()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error so; the one raised above is a 431 instead.
        if self._refusal is not None:
            self._refuse(*self._refusal)
            return
        super().send_400_response(msg)

    # -- refusals ------------------------------------------------------------------------

    def _refuse(self, status: int, slug: str, detail: str) -> None:
        """Answer `status` and close, unless an answer is already on the wire: then only close."""
        self._cancel_head_timer()
        self._cancel_body_timer()
        cycle = self.cycle
        if self._in_head:  # `cycle` is the previous request's: its answer must be complete
            may_answer = cycle is None or cycle.response_complete
        else:
            may_answer = cycle is not None and not cycle.response_started
        if cycle is not None:
            cycle.keep_alive = False
            if not self._in_head:  # the app waits for this body: it gets a disconnect now
                cycle.disconnected = True
                cycle.message_event.set()
        self.logger.info("closing a connection (%d): %s", status, detail)
        if not may_answer or not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closing with the client's bytes unread would reset the connection, and a reset can
        # discard the answer before the client reads it: send it, end our side, and drop
        # what still comes for a moment before closing.
        self.transport.write(problem_bytes(status, slug, detail))
        self.transport.write_eof()
        self._lingering = True
        self.loop.call_later(LINGER_S, self.transport.close)

    def _finished(self) -> bool:
        return self._lingering or self.transport.is_closing()

    def _refuse_head(self, detail: str) -> None:
        self._refuse(431, "head-too-large", detail)

    # -- timers --------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_expired)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._finished() or not self._in_head:
            return
        if self._head_left == self._limits.max_head_bytes:  # not a byte: nobody to answer
            self.transport.close()
            return
        detail = f"the request head did not arrive within {self._limits.header_timeout_s:g} s"
        self._refuse(408, "request-timeout", detail)

    def _check_body(self) -> None:
        self._body_timer = None
        if self._finished() or self._in_head:
            return
        if self.flow.read_paused:  # the app is not reading: not the client's fault
            self._body_started += self._body_check_s
        elapsed = self.loop.time() - self._body_started
        if body_too_slow(self._limits, elapsed, self._body_bytes):
            detail = (
                f"the request body did not arrive within {self._limits.body_timeout_s:g} s "
                f"at {self._limits.body_min_rate_bps} bytes/s or more"
            )
            self._refuse(408, "request-timeout", detail)
            return
        self._body_timer = self.loop.call_later(self._body_check_s, self._check_body)
