"""Apps whose Session loses its connection before the request ends
(``tests/test_close_failure.py``).

The same routes on three stacks, under the default ``commit="manual"``:

- ``starlette_sync_app``: Starlette, ``def`` endpoints, a sync ``scoped_session`` (psycopg 3);
- ``starlette_async_app``: Starlette, ``async def`` endpoints, an ``async_scoped_session``
  (asyncpg);
- ``flask_app``: Flask, the global ``scoped_session`` proxy (psycopg 3).

Served in a process of their own (``uvicorn --factory
tests.close_failure_apps:starlette_sync_app``, ``gunicorn
'tests.close_failure_apps:flask_app()'``) with ``DATABASE_URL`` in the environment.

Routes:

``GET /lose``
    Reads its backend's pid, has PostgreSQL terminate that backend and waits until it is
    gone, then answers: the close after the response finds the connection dead.
``GET /port``
    No database; answers, as ``/lose`` does, the client's port: two answers with one
    port came over one kept-alive connection.
``GET /_state``
    The registry and the pool: both drain to 0 once the requests are over.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
from flask import Flask, request
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import sessionmw

PID = text("select pg_backend_pid()")


def terminate(admin: Engine, pid: int) -> None:
    """Kill the backend ``pid`` and wait until it is gone: its connection is now dead."""
    with admin.connect() as connection:
        connection.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
        deadline = time.monotonic() + 10
        while connection.scalar(
            text("select count(*) from pg_stat_activity where pid = :pid"), {"pid": pid}
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"backend {pid} outlived its termination")
            time.sleep(0.01)


def _admin(url: str) -> Engine:
    return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def _port(request: Request) -> JSONResponse:
    return JSONResponse({"port": request.client.port if request.client else 0})


def starlette_sync_app() -> Starlette:
    url = os.environ["DATABASE_URL"]
    admin, engine = _admin(url), create_engine(url)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))

    def lose(request: Request) -> JSONResponse:
        terminate(admin, request.state.db.execute(PID).scalar_one())
        return _port(request)

    def state(request: Request) -> JSONResponse:
        return JSONResponse(
            {"registry": len(Session.registry.registry), "checkedout": engine.pool.checkedout()}  # type: ignore[attr-defined]
        )

    routes = [Route("/lose", lose), Route("/port", _port), Route("/_state", state)]
    return Starlette(
        routes=routes, middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=Session)]
    )


def starlette_async_app() -> Starlette:
    url = os.environ["DATABASE_URL"]
    admin = _admin(url)
    engine = create_async_engine(url.replace("+psycopg", "+asyncpg"))
    Session = sessionmw.request_scoped(async_sessionmaker(engine))

    async def lose(request: Request) -> JSONResponse:
        pid = (await request.state.db.execute(PID)).scalar_one()
        await anyio.to_thread.run_sync(terminate, admin, pid)
        return _port(request)

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(
            {"registry": len(Session.registry.registry), "checkedout": engine.pool.checkedout()}  # type: ignore[attr-defined]
        )

    async def port(request: Request) -> JSONResponse:
        return _port(request)

    routes = [Route("/lose", lose), Route("/port", port), Route("/_state", state)]
    return Starlette(
        routes=routes, middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=Session)]
    )


def flask_app() -> Flask:
    url = os.environ["DATABASE_URL"]
    admin, engine = _admin(url), create_engine(url)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))
    app = Flask(__name__)

    @app.get("/lose")
    def lose() -> dict[str, Any]:
        terminate(admin, Session.execute(PID).scalar_one())
        return {"port": int(request.environ["REMOTE_PORT"])}

    @app.get("/port")
    def port() -> dict[str, Any]:
        return {"port": int(request.environ["REMOTE_PORT"])}

    @app.get("/_state")
    def state() -> dict[str, Any]:
        return {"registry": len(Session.registry.registry), "checkedout": engine.pool.checkedout()}  # type: ignore[attr-defined]

    app.wsgi_app = sessionmw.WSGISessionMiddleware(app.wsgi_app, Session)  # type: ignore[method-assign]
    return app
