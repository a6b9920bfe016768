"""The example apps as the load and fault tests serve them: the examples' own routes, plus a
few that fail in the ways production does, and ``/_state`` to read the registry and pool.

Served by gunicorn and uvicorn in their own processes:
``gunicorn 'tests.load_apps:flask_app()'`` and ``uvicorn --factory tests.load_apps:starlette_app``,
with ``DATABASE_URL`` naming a PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from flask import Flask, jsonify, request
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from examples import flask_app as flask_example
from examples import starlette_app as starlette_example
from tests.models import Base as TestBase
from tests.models import Note, User

ENGINE_OPTIONS: dict[str, Any] = {
    "pool_size": 10,
    "max_overflow": 20,
    "pool_timeout": 10,
    "pool_pre_ping": True,
    "connect_args": {"application_name": "sessionmw-load"},
}


def _url() -> str:
    return os.environ["DATABASE_URL"]


def flask_app(**engine_options: Any) -> Flask:
    app = flask_example.create_app(_url(), **{**ENGINE_OPTIONS, **engine_options})
    engine = app.config["ENGINE"]
    TestBase.metadata.create_all(engine)
    Session = flask_example.Session

    @app.post("/commit-fails/<name>")
    def commit_fails(name: str) -> Any:
        """The deferred foreign key fails at COMMIT, after the view returned 201."""
        Session.add(User(name=name))
        Session.add(Note(user_id=10**9, body="dangling"))
        return jsonify(name=name), 201

    @app.get("/slow")
    def slow() -> Any:
        seconds = float(request.args.get("seconds", 1))
        Session.execute(text("select pg_sleep(:s)"), {"s": seconds})
        return jsonify(slept=True)

    @app.get("/_state")
    def state() -> Any:
        return jsonify(registry=len(Session.registry.registry), checkedout=engine.pool.checkedout())

    return app


def starlette_app(**engine_options: Any) -> Starlette:
    app = starlette_example.create_app(_url(), **{**ENGINE_OPTIONS, **engine_options})
    TestBase.metadata.create_all(app.state.engine)
    Session, AsyncSession = starlette_example.Session, starlette_example.AsyncSession

    async def commit_fails(request: Request) -> Response:
        request.state.adb.add(User(name=request.path_params["name"]))
        request.state.adb.add(Note(user_id=10**9, body="dangling"))
        return JSONResponse({}, status_code=201)

    def commit_fails_sync(request: Request) -> Response:
        request.state.db.add(User(name=request.path_params["name"]))
        request.state.db.add(Note(user_id=10**9, body="dangling"))
        return JSONResponse({}, status_code=201)

    async def slow(request: Request) -> Response:
        seconds = float(request.query_params.get("seconds", 1))
        await request.state.adb.execute(text("select pg_sleep(:s)"), {"s": seconds})
        return JSONResponse({"slept": True})

    async def state(request: Request) -> Response:
        await asyncio.sleep(0)
        return JSONResponse(
            {
                "registry": len(Session.registry.registry) + len(AsyncSession.registry.registry),
                "checkedout": app.state.engine.pool.checkedout()
                + app.state.async_engine.sync_engine.pool.checkedout(),
            }
        )

    app.add_route("/commit-fails/{name}", commit_fails, methods=["POST"])
    app.add_route("/commit-fails-sync/{name}", commit_fails_sync, methods=["POST"])
    app.add_route("/slow", slow, methods=["GET"])
    app.add_route("/_state", state, methods=["GET"])
    return app
