"""The apps of ``ending.py``: Starlette, ``def`` endpoints, one SELECT, served by uvicorn.

They differ only in *where* the request's transaction ends: in the endpoint's own thread
(hand-written, or sessionmw with the transaction ended in the endpoint), or after the
endpoint returned (sessionmw's policies: a hop off the event loop).  Every app also serves
``/stats``: how long each connection was checked out (pool events) since the last call, for
the driver to read around each load run.

uvicorn: ``uvicorn --factory ending_apps:app`` with ``BENCH_VARIANT``, ``BENCH_SYNC_URL``
and ``BENCH_POOL`` in the environment.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from common import Item
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

_held = {"seconds": 0.0, "checkouts": 0}
_lock = threading.Lock()


def engine() -> Engine:
    """The engine, with the time each connection stays checked out recorded."""
    created = create_engine(os.environ["BENCH_SYNC_URL"], **json.loads(os.environ["BENCH_POOL"]))

    @event.listens_for(created, "checkout")
    def checked_out(dbapi: Any, record: Any, proxy: Any) -> None:
        record.info["checked_out"] = time.perf_counter()

    @event.listens_for(created, "checkin")
    def checked_in(dbapi: Any, record: Any) -> None:
        began = record.info.pop("checked_out", None)
        if began is not None:
            with _lock:
                _held["seconds"] += time.perf_counter() - began
                _held["checkouts"] += 1

    return created


async def none(request: Request) -> Response:
    return PlainTextResponse("ok")


async def stats(request: Request) -> Response:
    """Connection hold time since the last call."""
    with _lock:
        report = dict(_held)
        _held.update(seconds=0.0, checkouts=0)
    return JSONResponse(report)


def starlette(one: Callable[[Request], Response], middleware: Any = None) -> Starlette:
    app = Starlette(routes=[Route("/one", one), Route("/none", none), Route("/stats", stats)])
    if middleware is not None:
        middleware(app)
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


def _sessionmw(commit: str, end_in_endpoint: bool) -> Starlette:
    import sessionmw

    db = sessionmw.request_scoped(sessionmaker(engine()))

    def one(request: Request) -> Response:
        item = db.get(Item, 1)
        assert item is not None
        response = PlainTextResponse(item.name)
        if end_in_endpoint and commit == "manual":
            db.close()  # the read transaction ends here, in this thread
        elif end_in_endpoint:
            db.commit()
        return response

    def add(app: Starlette) -> None:
        app.add_middleware(sessionmw.ASGISessionMiddleware, session=db, commit=commit)

    return starlette(one, add)


def sessionmw_manual() -> Starlette:
    return _sessionmw("manual", end_in_endpoint=False)


def sessionmw_on_success() -> Starlette:
    return _sessionmw("on_success", end_in_endpoint=False)


def sessionmw_manual_closed_in_endpoint() -> Starlette:
    return _sessionmw("manual", end_in_endpoint=True)


def sessionmw_on_success_committed_in_endpoint() -> Starlette:
    return _sessionmw("on_success", end_in_endpoint=True)


def app() -> Starlette:
    builder: Callable[[], Starlette] = globals()[os.environ["BENCH_VARIANT"]]
    return builder()
