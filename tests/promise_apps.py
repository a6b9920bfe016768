"""Apps for ``tests/test_production_promises.py``, each served by a real server.

Built in the test process (the server runs in a thread there): :func:`commit_point_app`, the
ways a WSGI app can fail after ``start_response`` and before its first chunk, and the controls
that succeed. (The Litestar app is in ``tests/promise_litestar.py``, so that the servers that
load this module do not pay for importing Litestar.)

Loaded by a server in a process of its own, configured through the environment:

- ``gunicorn 'tests.promise_apps:sendfile_app()'``: files returned through
  ``environ["wsgi.file_wrapper"]`` with and without the middleware (``DATABASE_URL``,
  ``SENDFILE_PATH``).
- ``gunicorn 'tests.promise_apps:two_db_flask_app()'`` and
  ``uvicorn --factory tests.promise_apps:two_db_starlette_app``: two stacked middlewares over
  two PostgreSQL databases (``DB_A_URL`` outer, ``DB_B_URL`` inner, ``TWOPHASE``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, jsonify, request, send_file, stream_with_context
from sqlalchemy import ForeignKey, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import sessionmw
from tests.models import User

# --- 2. gunicorn: a file returned through wsgi.file_wrapper ----------------------------------


def sendfile_app() -> Callable[..., Any]:
    """``/bare/file`` without the middleware, ``/plain/file`` (reads first) and ``/flask/file``
    (Flask's ``send_file``, writes first, ``commit="on_success"``) behind it; ``/_state``."""
    engine = create_engine(os.environ["DATABASE_URL"])
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))
    path = os.environ["SENDFILE_PATH"]

    def serve_file(environ: dict[str, Any], start_response: Any) -> Any:
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(os.path.getsize(path))),
        ]
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](open(path, "rb"))  # the server closes it

    def read_then_serve_file(environ: dict[str, Any], start_response: Any) -> Any:
        Session.execute(select(func.count()).select_from(User))
        return serve_file(environ, start_response)

    flask = Flask(__name__)

    @flask.get("/flask/file")
    def flask_file() -> Any:
        Session.add(User(name=request.args["name"]))
        Session.flush()
        return send_file(path, mimetype="application/octet-stream")

    flask.wsgi_app = sessionmw.WSGISessionMiddleware(  # type: ignore[method-assign]
        flask.wsgi_app, Session, commit="on_success"
    )

    def state(environ: dict[str, Any], start_response: Any) -> Any:
        body = (
            f'{{"registry": {len(Session.registry.registry)}, '
            f'"checkedout": {engine.pool.checkedout()}}}'
        ).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    def not_found(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    routes: dict[str, Callable[..., Any]] = {
        "/bare/file": serve_file,
        "/plain/file": sessionmw.WSGISessionMiddleware(read_then_serve_file, Session),
        "/flask/file": flask,
        "/_state": state,
    }

    def dispatch(environ: dict[str, Any], start_response: Any) -> Any:
        return routes.get(environ["PATH_INFO"], not_found)(environ, start_response)

    return dispatch


# --- 3. Two PostgreSQL databases, two stacked middlewares ------------------------------------

#: A parent id that never exists: the row's deferred foreign key fails at COMMIT / PREPARE.
MISSING_PARENT = 10**9
APPLICATION_NAME = "sessionmw-promise"


class PromiseBase(DeclarativeBase):
    pass


class Parent(PromiseBase):
    __tablename__ = "parents"

    id: Mapped[int] = mapped_column(primary_key=True)


class Row(PromiseBase):
    __tablename__ = "rows"

    id: Mapped[int] = mapped_column(primary_key=True)
    tag: Mapped[str] = mapped_column(String(80))
    # Checked at COMMIT (or PREPARE TRANSACTION), not at INSERT.
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("parents.id", deferrable=True, initially="DEFERRED")
    )


def _two_databases() -> tuple[dict[str, Any], dict[str, Any]]:
    twophase = os.environ.get("TWOPHASE", "1") == "1"
    engines, sessions = {}, {}
    for name in ("a", "b"):
        engine = create_engine(
            os.environ[f"DB_{name.upper()}_URL"],
            pool_size=10,
            max_overflow=10,
            pool_timeout=10,
            connect_args={"application_name": APPLICATION_NAME},
        )
        engines[name] = engine
        sessions[name] = sessionmw.request_scoped(sessionmaker(bind=engine, twophase=twophase))
    return engines, sessions


def write_rows(db_a: Any, db_b: Any, tag: str, fail: str) -> None:
    """One row in each database; the one named by ``fail`` will not survive its commit."""
    for name, db in (("a", db_a), ("b", db_b)):
        db.add(Row(tag=tag, parent_id=MISSING_PARENT if fail == name else None))
        db.flush()  # the INSERT happens here; only the deferred check waits for COMMIT


def _state(engines: dict[str, Any], sessions: dict[str, Any]) -> dict[str, int]:
    return {
        "registry": sum(len(s.registry.registry) for s in sessions.values()),
        "checkedout": sum(e.pool.checkedout() for e in engines.values()),
    }


def two_db_flask_app() -> Flask:
    """``POST /write/<tag>?fail=a|b``; ``db_a``'s middleware is the outer one."""
    engines, sessions = _two_databases()
    app = Flask(__name__)

    @app.post("/write/<tag>")
    def write(tag: str) -> Any:
        write_rows(request.environ["db_a"], request.environ["db_b"], tag, request.args["fail"])
        return jsonify(tag=tag), 201

    @app.get("/_state")
    def state() -> Any:
        return jsonify(_state(engines, sessions))

    inner = sessionmw.WSGISessionMiddleware(
        app.wsgi_app, sessions["b"], commit="on_success", environ_key="db_b"
    )
    app.wsgi_app = sessionmw.WSGISessionMiddleware(  # type: ignore[method-assign]
        inner, sessions["a"], commit="on_success", environ_key="db_a"
    )
    return app


def two_db_starlette_app() -> Starlette:
    """``POST /write/{tag}?fail=a|b`` (a sync endpoint); ``db_a``'s middleware is the outer one."""
    engines, sessions = _two_databases()

    def write(request: Request) -> JSONResponse:
        tag = request.path_params["tag"]
        write_rows(request.state.db_a, request.state.db_b, tag, request.query_params["fail"])
        return JSONResponse({"tag": tag}, status_code=201)

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(_state(engines, sessions))

    return Starlette(
        routes=[
            Route("/write/{tag}", write, methods=["POST"]),
            Route("/_state", state, methods=["GET"]),
        ],
        middleware=[
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=sessions["a"],
                commit="on_success",
                state_key="db_a",
            ),
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=sessions["b"],
                commit="on_success",
                state_key="db_b",
            ),
        ],
    )


# --- 4. Where a WSGI request commits ----------------------------------------------------------

#: Each writes the user named by the last path segment, then fails before the first chunk.
FAILING_VARIANTS = (
    "raise_after_start_response",
    "flask_stream_raises_first",
    "exc_info_500_after_200",
    "flask_stream_with_context_raises_first",
)
#: Each writes the user and succeeds: the row must be kept.
SUCCEEDING_VARIANTS = ("plain_200", "flask_200", "flask_stream_200")


def commit_point_app(variant: str, Session: Any) -> Any:
    """``GET /write/<name>`` as ``variant``, behind the middleware with ``commit="on_success"``."""
    if variant.startswith("flask_"):
        app = _flask_commit_point_app(variant, Session)
        app.wsgi_app = sessionmw.WSGISessionMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, Session, commit="on_success"
        )
        return app
    return sessionmw.WSGISessionMiddleware(
        _plain_commit_point_app(variant, Session), Session, commit="on_success"
    )


def _write(Session: Any, name: str) -> None:
    Session.add(User(name=name))
    Session.flush()


def _plain_commit_point_app(variant: str, Session: Any) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        _write(Session, environ["PATH_INFO"].rsplit("/", 1)[-1])
        start_response("200 OK", [("Content-Type", "text/plain")])
        if variant == "plain_200":
            return [b"saved"]
        if variant == "raise_after_start_response":
            raise RuntimeError("rendering failed after start_response")
        assert variant == "exc_info_500_after_200", variant
        try:
            raise RuntimeError("rendering failed after start_response")
        except RuntimeError:
            # PEP 3333's error path: replace the status while no byte is sent yet.
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
            return [b"rendering failed"]

    return app


def _flask_commit_point_app(variant: str, Session: Any) -> Flask:
    app = Flask(__name__)

    @app.get("/write/<name>")
    def write(name: str) -> Any:
        _write(Session, name)
        if variant == "flask_200":
            return "saved"
        if variant == "flask_stream_200":

            def chunks() -> Iterator[str]:
                yield "saved "
                yield "and streamed"

            return Response(chunks())
        if variant == "flask_stream_raises_first":

            def failing() -> Iterator[str]:
                raise RuntimeError("the stream failed before its first chunk")
                yield "never"  # pragma: no cover

            return Response(failing())
        assert variant == "flask_stream_with_context_raises_first", variant

        @stream_with_context
        def failing_in_context() -> Iterator[str]:
            _write(Session, f"{name}-from-stream")  # inside the request context, not yet sent
            raise RuntimeError("the stream failed before its first chunk")
            yield "never"  # pragma: no cover

        return Response(failing_in_context())

    return app
