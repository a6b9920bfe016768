"""The apps of ``ending.py``: Starlette, ``def`` endpoints, one SELECT, served by uvicorn.

They differ only in *where* the request's transaction ends: in the endpoint's own thread
(hand-written, or sessionmw with ``@ends_in_thread``), or after the endpoint returned
(sessionmw's middleware alone: a hop off the event loop).  Every app also serves
``/stats``: how long each connection was checked out (pool events) since the last call, for
the driver to read around each load run, and where that time went: in the endpoint's
thread, waiting for the event loop to take the endpoint's result and start the response,
and after the response started (the middleware's hop and round trip).

uvicorn: ``uvicorn --factory ending_apps:app`` with ``BENCH_VARIANT``, ``BENCH_SYNC_URL``
and ``BENCH_POOL`` in the environment.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from common import Item
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

_held = {"seconds": 0.0, "checkouts": 0}
_SEGMENTS = ("in_endpoint", "loop_turn", "after_start")
_spent = dict.fromkeys((*_SEGMENTS, "requests"), 0.0)
_lock = threading.Lock()
#: The moments of one ``/one`` request: checkout, endpoint returned, response start, checkin.
_moments: ContextVar[dict[str, float] | None] = ContextVar("moments", default=None)


def engine() -> Engine:
    """The engine, with the time each connection stays checked out recorded."""
    created = create_engine(os.environ["BENCH_SYNC_URL"], **json.loads(os.environ["BENCH_POOL"]))

    @event.listens_for(created, "checkout")
    def checked_out(dbapi: Any, record: Any, proxy: Any) -> None:
        record.info["checked_out"] = now = time.perf_counter()
        moments = _moments.get()  # the request's context reaches every thread it uses
        if moments is not None:
            moments["checkout"] = now

    @event.listens_for(created, "checkin")
    def checked_in(dbapi: Any, record: Any) -> None:
        now = time.perf_counter()
        began = record.info.pop("checked_out", None)
        if began is not None:
            with _lock:
                _held["seconds"] += now - began
                _held["checkouts"] += 1
        moments = _moments.get()
        if moments is not None:
            moments["checkin"] = now

    return created


async def none(request: Request) -> Response:
    return PlainTextResponse("ok")


async def stats(request: Request) -> Response:
    """Connection hold time since the last call, and its mean split in ms."""
    with _lock:
        report: dict[str, float] = dict(_held)
        _held.update(seconds=0.0, checkouts=0)
        requests = max(_spent["requests"], 1)
        report.update({name: 1000 * _spent[name] / requests for name in _SEGMENTS})
        _spent.update(dict.fromkeys(_spent, 0.0))
    return JSONResponse(report)


def timed(one: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """The endpoint, noting when it returned (in its own thread)."""

    def endpoint(request: Request) -> Response:
        response = one(request)
        moments = _moments.get()
        if moments is not None:
            moments["returned"] = time.perf_counter()
        return response

    return endpoint


class Moments:
    """Outermost: gives each ``/one`` request its moments, notes the response's start,
    and adds up where the connection's hold went once the request is over."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("path") != "/one":
            await self.app(scope, receive, send)
            return
        moments: dict[str, float] = {}
        _moments.set(moments)

        async def noting(message: Any) -> None:
            if message["type"] == "http.response.start":
                moments["start"] = time.perf_counter()
            await send(message)

        await self.app(scope, receive, noting)
        if len(moments) == 4:
            checkout, returned, start, checkin = (
                moments[k] for k in ("checkout", "returned", "start", "checkin")
            )
            with _lock:
                _spent["in_endpoint"] += min(checkin, returned) - checkout
                _spent["loop_turn"] += max(0.0, min(checkin, start) - returned)
                _spent["after_start"] += max(0.0, checkin - start)
                _spent["requests"] += 1


def starlette(one: Callable[[Request], Response], middleware: Any = None) -> Starlette:
    routes = [Route("/one", timed(one)), Route("/none", none), Route("/stats", stats)]
    app = Starlette(routes=routes)
    if middleware is not None:
        middleware(app)
    app.add_middleware(Moments)
    return app


def hand() -> Starlette:
    """A Session opened and closed inside the endpoint's thread."""
    local = sessionmaker(engine())

    def one(request: Request) -> Response:
        with local() as session:
            item = session.get(Item, 1)
            assert item is not None
            return PlainTextResponse(item.name)

    return starlette(one)


def _sessionmw(commit: str, ends_in_thread: bool) -> Starlette:
    import sessionmw

    db = sessionmw.request_scoped(sessionmaker(engine()))

    def one(request: Request) -> Response:
        item = db.get(Item, 1)
        assert item is not None
        return PlainTextResponse(item.name)

    def add(app: Starlette) -> None:
        app.add_middleware(sessionmw.ASGISessionMiddleware, session=db, commit=commit)

    return starlette(sessionmw.ends_in_thread(one) if ends_in_thread else one, add)


def sessionmw_manual() -> Starlette:
    return _sessionmw("manual", ends_in_thread=False)


def sessionmw_on_success() -> Starlette:
    return _sessionmw("on_success", ends_in_thread=False)


def sessionmw_manual_ends_in_thread() -> Starlette:
    return _sessionmw("manual", ends_in_thread=True)


def sessionmw_on_success_ends_in_thread() -> Starlette:
    return _sessionmw("on_success", ends_in_thread=True)


def app() -> Starlette:
    builder: Callable[[], Starlette] = globals()[os.environ["BENCH_VARIANT"]]
    return builder()
