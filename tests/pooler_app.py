"""The app the PgBouncer test serves: one table, reads, writes that commit, writes that fail.

``uvicorn --factory tests.pooler_app:sync_app`` serves plain ``def`` endpoints on a sync
``Session`` (psycopg 3, Starlette's thread pool); ``tests.pooler_app:async_app`` serves
``async def`` endpoints on an ``AsyncSession`` (asyncpg).  ``DATABASE_URL`` names the
database behind PgBouncer, with the driver in it.  The engine carries the settings that
transaction pooling needs (``POOLER_CONNECT_ARGS``) unless ``DRIVER_SETTINGS=default``,
which keeps the drivers' own, to measure what they do through a transaction pooler.

Every write adds a row whose key names the request, then ends the way ``?outcome=`` says:
``ok`` (201), ``reject`` (409), ``crash`` (an exception, 500) or ``commit_fail`` (a second
row with the same key: the deferred unique constraint fails at COMMIT, 500).
"""

from __future__ import annotations

import os
from typing import Any
from uuid import uuid4

from sqlalchemy import String, UniqueConstraint, create_engine, func, make_url, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import Pool, QueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sessionmw


class Base(DeclarativeBase):
    pass


class Entry(Base):
    __tablename__ = "pooler_entries"
    __table_args__ = (UniqueConstraint("key", deferrable=True, initially="DEFERRED"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(80))


#: What each driver needs behind a transaction pooler, where consecutive transactions of one
#: client connection run on different server connections: no prepared statement may outlive
#: its transaction, and none may be looked up by a name another client used.
POOLER_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    "psycopg": {"prepare_threshold": None},
    "asyncpg": {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid4()}__",
    },
}

ENGINE_OPTIONS: dict[str, Any] = {
    "pool_size": 10,
    "max_overflow": 20,
    "pool_timeout": 10,
    "pool_pre_ping": True,
}


def engine_options(url: str) -> dict[str, Any]:
    if os.environ.get("DRIVER_SETTINGS") == "default":
        return ENGINE_OPTIONS
    connect_args = POOLER_CONNECT_ARGS[make_url(url).get_driver_name()]
    return {**ENGINE_OPTIONS, "connect_args": connect_args}


def checked_out(pool: Pool) -> int:
    """Connections out of the engine's pool (a QueuePool, the default for both engines)."""
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


def new_entries(request: Request) -> list[Entry]:
    key = request.path_params["key"]
    if request.query_params.get("outcome") == "commit_fail":
        return [Entry(key=key), Entry(key=key)]
    return [Entry(key=key)]


def outcome(request: Request) -> Response:
    """The response a write ends with, after its rows were flushed."""
    wanted = request.query_params.get("outcome", "ok")
    if wanted == "reject":
        return JSONResponse({"error": "rejected after writing"}, status_code=409)
    if wanted == "crash":
        raise RuntimeError("crashed after writing")
    return JSONResponse({"key": request.path_params["key"]}, status_code=201)


def sync_app() -> Starlette:
    url = os.environ["DATABASE_URL"]
    engine = create_engine(url, **engine_options(url))
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))

    def read(request: Request) -> Response:
        count = request.state.db.scalar(select(func.count()).select_from(Entry))
        return JSONResponse({"entries": count})

    def write(request: Request) -> Response:
        request.state.db.add_all(new_entries(request))
        request.state.db.flush()
        return outcome(request)

    def state(request: Request) -> Response:
        return JSONResponse(
            {"registry": len(Session.registry.registry), "checkedout": checked_out(engine.pool)}
        )

    return build(Session, read, write, state)


def async_app() -> Starlette:
    url = os.environ["DATABASE_URL"]
    engine = create_async_engine(url, **engine_options(url))
    Session = sessionmw.request_scoped(async_sessionmaker(engine))

    async def read(request: Request) -> Response:
        count = await request.state.db.scalar(select(func.count()).select_from(Entry))
        return JSONResponse({"entries": count})

    async def write(request: Request) -> Response:
        request.state.db.add_all(new_entries(request))
        await request.state.db.flush()
        return outcome(request)

    async def state(request: Request) -> Response:
        return JSONResponse(
            {
                "registry": len(Session.registry.registry),
                "checkedout": checked_out(engine.sync_engine.pool),
            }
        )

    return build(Session, read, write, state)


def build(session: Any, read: Any, write: Any, state: Any) -> Starlette:
    return Starlette(
        routes=[
            Route("/entries", read, methods=["GET"]),
            Route("/entries/{key}", write, methods=["POST"]),
            Route("/_state", state, methods=["GET"]),
        ],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=session, commit="on_success")
        ],
    )
