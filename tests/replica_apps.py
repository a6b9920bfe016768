"""Apps that tell, from the database itself, where each of their statements ran.

``pg_is_in_recovery()`` is true on a streaming replica and false on the primary, so a
route that selects it after its other statements reports where the request's reads went.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from sqlalchemy import select, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import sessionmw
from tests.models import User

ON_REPLICA = text("select pg_is_in_recovery()")


def _where(db: Any) -> bool:
    return bool(db.execute(ON_REPLICA).scalar())


def sync_starlette(Session: Any, **options: Any) -> Any:
    """Sync endpoints (run in the thread pool) over a ``scoped_session``."""

    def where(request: Request) -> JSONResponse:
        return JSONResponse({"replica": _where(Session)})

    def write_then_where(request: Request) -> JSONResponse:
        Session.add(User(name=request.query_params["name"]))
        Session.flush()
        return JSONResponse({"replica": _where(Session)})

    def lock_then_where(request: Request) -> JSONResponse:
        Session.execute(select(User).with_for_update()).all()
        return JSONResponse({"replica": _where(Session)})

    def pinned(request: Request) -> JSONResponse:
        before = _where(Session)
        sessionmw.use_primary()
        return JSONResponse({"before": before, "replica": _where(Session)})

    def users(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if request.method == "POST":
            Session.add(User(name=name))
            return JSONResponse({"created": name}, status_code=201)
        found = Session.scalar(select(User).where(User.name == name)) is not None
        return JSONResponse({"found": found, "replica": _where(Session)})

    return _starlette(Session, options, where, write_then_where, lock_then_where, pinned, users)


def async_starlette(Session: Any, **options: Any) -> Any:
    """Async endpoints over an ``async_scoped_session``."""

    async def awhere() -> bool:
        return bool((await Session.execute(ON_REPLICA)).scalar())

    async def where(request: Request) -> JSONResponse:
        return JSONResponse({"replica": await awhere()})

    async def write_then_where(request: Request) -> JSONResponse:
        Session.add(User(name=request.query_params["name"]))
        await Session.flush()
        return JSONResponse({"replica": await awhere()})

    async def lock_then_where(request: Request) -> JSONResponse:
        (await Session.execute(select(User).with_for_update())).all()
        return JSONResponse({"replica": await awhere()})

    async def pinned(request: Request) -> JSONResponse:
        before = await awhere()
        sessionmw.use_primary()
        return JSONResponse({"before": before, "replica": await awhere()})

    async def users(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if request.method == "POST":
            Session.add(User(name=name))
            return JSONResponse({"created": name}, status_code=201)
        found = (await Session.scalar(select(User).where(User.name == name))) is not None
        return JSONResponse({"found": found, "replica": await awhere()})

    return _starlette(Session, options, where, write_then_where, lock_then_where, pinned, users)


def _starlette(Session: Any, options: dict[str, Any], *endpoints: Any) -> Any:
    where, write_then_where, lock_then_where, pinned, users = endpoints
    app = Starlette(
        routes=[
            Route("/where", where, methods=["GET", "POST"]),
            Route("/write-then-where", write_then_where),
            Route("/lock-then-where", lock_then_where),
            Route("/pinned", pinned),
            Route("/users/{name}", users, methods=["GET", "POST"]),
        ]
    )
    return sessionmw.ASGISessionMiddleware(app, Session, commit="on_success", **options)


def flask(Session: Any, **options: Any) -> Any:
    """The same routes in Flask, under the WSGI middleware."""
    from flask import request

    app = Flask(__name__)

    @app.route("/where", methods=["GET", "POST"])
    def where() -> Any:
        return jsonify(replica=_where(Session))

    @app.route("/write-then-where")
    def write_then_where() -> Any:
        Session.add(User(name=request.args["name"]))
        Session.flush()
        return jsonify(replica=_where(Session))

    @app.route("/lock-then-where")
    def lock_then_where() -> Any:
        Session.execute(select(User).with_for_update()).all()
        return jsonify(replica=_where(Session))

    @app.route("/pinned")
    def pinned() -> Any:
        before = _where(Session)
        sessionmw.use_primary()
        return jsonify(before=before, replica=_where(Session))

    @app.route("/users/<name>", methods=["GET", "POST"])
    def users(name: str) -> Any:
        if request.method == "POST":
            Session.add(User(name=name))
            return jsonify(created=name), 201
        found = Session.scalar(select(User).where(User.name == name)) is not None
        return jsonify(found=found, replica=_where(Session))

    return sessionmw.WSGISessionMiddleware(app, Session, commit="on_success", **options)
