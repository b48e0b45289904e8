"""A Server-Sent Events reader for the tests: one stream in a thread, parsed as a browser would."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Event:
    id: str | None
    event: str
    data: dict[str, Any]


@dataclass
class Stream:
    """A subscription read in a background thread: `events` as they arrive, `comments` too."""

    base_url: str
    path: str
    headers: dict[str, str]
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    status: int | None = None
    ended: bool = False  # the server closed the stream
    content_type: str = ""
    _ready: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _response: httpx.Response | None = None
    error: BaseException | None = None

    def start(self, timeout_s: float = 15.0) -> Stream:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(timeout_s), "the stream did not open"
        return self

    def _run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.base_url, timeout=30.0) as http,
                http.stream("GET", self.path, headers=self.headers) as response,
            ):
                self._response = response
                self.status = response.status_code
                self.content_type = response.headers.get("content-type", "")
                self._ready.set()
                if response.status_code != 200:
                    return
                self._parse(response)
            self.ended = not self._stop.is_set()
        except BaseException as exc:  # reported by the test that reads the stream
            if not self._stop.is_set():  # not the close() below cutting the connection
                self.error = exc
            self._ready.set()

    def _parse(self, response: httpx.Response) -> None:
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if self._stop.is_set():
                return
            if line == "":
                if "data" in fields:
                    self.events.append(
                        Event(
                            fields.get("id"),
                            fields.get("event", "message"),
                            json.loads(fields["data"]),
                        )
                    )
                fields = {}
            elif line.startswith(":"):
                self.comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "retry":
                    self.retry = int(value)
                elif name == "data" and "data" in fields:
                    fields["data"] += "\n" + value
                else:
                    fields[name] = value

    def wait_for(self, count: int, timeout_s: float = 15.0) -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count and time.monotonic() < deadline and not self.ended:
            if self.error is not None:
                raise self.error
            time.sleep(0.02)
        return list(self.events)

    def close(self) -> None:
        """Hang up, as a client whose connection drops would."""
        self._stop.set()
        if self._response is not None:
            with contextlib.suppress(Exception):
                self._response.close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Stream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
