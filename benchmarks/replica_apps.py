"""The app of the replica benchmark (``replicas.py``), one uvicorn process per variant.

``uvicorn --factory replica_apps:app``. The database URLs and the pool come from the
environment, since uvicorn imports the app by name: ``BENCH_SYNC_URL`` is the primary,
``BENCH_REPLICA_URL`` the replica (empty: the primary alone) and ``BENCH_POOL`` the pool of
every engine.

Starlette with **sync ``def`` endpoints** (run in its thread pool) and the session from
``request.state.db``, under ``ASGISessionMiddleware``, the way a production app reads:

- ``/page``: one page of ``PAGE`` rows by a range of the primary key, starting anywhere in
  the table, returned as JSON;
- ``/where``: ``primary`` or ``replica``, asked of the database (``pg_is_in_recovery()``),
  so that the benchmark can check the routing before it measures.
"""

from __future__ import annotations

import os
import random
from typing import Any

from common import Item
from net_apps import _pool, sync_engine
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import sessionmw

#: Rows in the table, and rows per page.
ROWS = 10_000
PAGE = 20

ON_REPLICA = text("select pg_is_in_recovery()")


def app() -> Any:
    """The factory uvicorn calls: reads through the replica when ``BENCH_REPLICA_URL`` is set."""
    replica_url = os.environ.get("BENCH_REPLICA_URL", "")
    replicas = [create_engine(replica_url, **_pool())] if replica_url else []
    scoped = sessionmw.request_scoped(sessionmaker(sync_engine()), replicas=replicas)

    def page(request: Request) -> JSONResponse:
        first = random.randint(1, ROWS - PAGE + 1)
        rows = request.state.db.execute(
            select(Item.id, Item.name)
            .where(Item.id >= first, Item.id < first + PAGE)
            .order_by(Item.id)
        ).all()
        return JSONResponse([[id_, name] for id_, name in rows])

    def where(request: Request) -> PlainTextResponse:
        on_replica = request.state.db.execute(ON_REPLICA).scalar()
        return PlainTextResponse("replica" if on_replica else "primary")

    routes = [Route("/page", page), Route("/where", where)]
    return sessionmw.ASGISessionMiddleware(Starlette(routes=routes), scoped)
