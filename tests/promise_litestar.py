"""A Litestar app for ``tests/test_production_promises.py``: a sync ``Stream`` whose generator
uses the session on every chunk, in Litestar's worker threads. Served by uvicorn in a thread.

Its own module, so that the servers loading ``tests/promise_apps.py`` do not import Litestar.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

from litestar import Litestar, Request, get
from litestar.middleware import DefineMiddleware
from litestar.response import Stream
from sqlalchemy import text

import sessionmw

STREAM_CHUNKS = 3
#: How long a generator waits for its request to end before it goes on regardless.
END_WAIT = 10.0


class StreamProbe:
    """Lets the test order things without sleeping: each generator says when it is about to
    make its next chunk (``waiting``); the app says when each request has ended (``ended``),
    after the middleware removed its session. Every step is recorded in ``steps`` as
    ``(name, chunk number, exception or None)``."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int, BaseException | None]] = []
        self._events: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    def event(self, what: str, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault((what, name), threading.Event())


def litestar_stream_app(Session: Any, probe: StreamProbe) -> Any:
    """``GET /stream?name=...``: chunk 0 at once; each later chunk only once the request has
    ended (the client hung up), and then it queries through the session and yields."""

    @get("/stream")
    async def stream(request: Request[Any, Any, Any]) -> Stream:
        name = request.query_params["name"]

        def chunks() -> Iterator[bytes]:
            for n in range(STREAM_CHUNKS):
                if n:
                    probe.event("waiting", name).set()
                    probe.event("ended", name).wait(END_WAIT)
                try:
                    Session.execute(text("select 1"))
                except BaseException as exc:
                    probe.steps.append((name, n, exc))
                    raise
                probe.steps.append((name, n, None))
                yield f"chunk {n}\n".encode()

        return Stream(chunks())

    litestar = Litestar(
        route_handlers=[stream],
        middleware=[DefineMiddleware(sessionmw.ASGISessionMiddleware, session=Session)],
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await litestar(scope, receive, send)
        finally:
            if scope["type"] == "http":
                name = parse_qs(scope["query_string"].decode())["name"][0]
                probe.event("ended", name).set()

    return app
