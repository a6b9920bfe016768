"""Apps for the replay tests on PostgreSQL (``tests/test_retries_pg.py``).

The same routes on three stacks, each with ``commit="on_success"`` and ``retries=``:

- ``starlette_sync_app``: Starlette, ``def`` endpoints, a sync ``scoped_session`` (psycopg 3);
- ``starlette_async_app``: Starlette, ``async def`` endpoints, an ``async_scoped_session``
  (asyncpg);
- ``flask_app``: Flask, the global ``scoped_session`` proxy (psycopg 3).

Served in a process of their own (``uvicorn --factory tests.retry_apps:starlette_sync_app``,
``gunicorn 'tests.retry_apps:flask_app()'``) with ``DATABASE_URL`` and ``SESSIONMW_RETRIES``
in the environment, or in the test's process with both passed as arguments.  With
``handle_db_errors=True`` the Starlette apps answer a database error of an endpoint with a
503 of their own (an exception handler), so the middleware sees a 5xx response instead
of an exception.

Routes:

``POST /oncall/{pair}/{doctor}?id=ID``
    Write skew at SERIALIZABLE: count the doctors of ``pair`` on duty, sleep, and if two
    are, take ``doctor`` off duty, record the action in ``actions`` (so an effect applied
    twice would show) and register an ``on_commit`` callback that logs ``(id, attempt)``
    into ``callbacks`` in a fresh ``request_scope``.  Answers what it saw and did, and the
    attempt's own id.
``POST /commit-fails?id=ID`` with ``{"note": ...}``
    Reads the body and inserts its note into ``events``, whose deferred constraint
    trigger may raise a serialization failure at COMMIT (see :func:`create_schema`).
``POST /statement-fails?id=ID``
    Calls ``fail_first_statements()``, which may raise a serialization failure, then
    inserts into ``events``.
``POST /manual-commit-then-fail?id=ID&at=handler|commit``
    Commits an ``events`` row by hand, then meets a serialization failure: raised by a
    statement in the handler, or by the middleware's COMMIT (a row in ``doomed``).
``GET /_attempts``
    How often each request id reached its handler, how often the handler itself met a
    database error, and the callbacks that ran.
``GET /_state``
    The registry and the pool: both drain to 0 once the requests are over.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import Counter
from typing import Any

import anyio.from_thread
from flask import Flask, jsonify, request
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sessionmw

APPLICATION_NAME = "sessionmw-retry"
#: How long each request of a pair waits between its read and its write, inside its
#: transaction, so that the two requests of a pair overlap.
OVERLAP_SECONDS = 0.05

#: SERIALIZABLE, and index scans only.  PostgreSQL's SSI locks what a scan read: a
#: sequential scan (which the planner picks for a table this small) locks the whole
#: relation, and every pair would then conflict with every other.  Through the primary
#: key it locks the pair's own rows, as on a production-sized table.
_OPTIONS = "-c enable_seqscan=off -c enable_bitmapscan=off"
ENGINE_OPTIONS: dict[str, Any] = {
    "isolation_level": "SERIALIZABLE",
    "pool_size": 10,
    "max_overflow": 20,
    "pool_timeout": 10,
}

SCHEMA = """
create table oncall (
    pair int not null, doctor text not null, on_duty bool not null,
    primary key (pair, doctor)
);
create table actions (request_id text not null, attempt text not null,
                      pair int not null, doctor text not null);
create table callbacks (request_id text not null, attempt text not null);
create table events (request_id text not null, attempt text not null, note text not null);
create table doomed (request_id text not null);
create sequence commit_attempts;
create sequence statement_attempts;
create function fail_first_statements() returns int language plpgsql as $$
begin
    if nextval('statement_attempts') <= {statement_failures} then
        raise exception 'injected serialization failure in a statement'
            using errcode = 'serialization_failure';
    end if;
    return 1;
end $$;
create function fail_first_commits() returns trigger language plpgsql as $$
begin
    if nextval('commit_attempts') <= {failures} then
        raise exception 'injected serialization failure at COMMIT'
            using errcode = 'serialization_failure';
    end if;
    return null;
end $$;
create constraint trigger events_at_commit after insert on events
    deferrable initially deferred for each row execute function fail_first_commits();
create function always_fail() returns trigger language plpgsql as $$
begin
    raise exception 'injected serialization failure at COMMIT'
        using errcode = 'serialization_failure';
end $$;
create constraint trigger doomed_at_commit after insert on doomed
    deferrable initially deferred for each row execute function always_fail();
"""

COUNT = "select count(*) from oncall where pair = :p and on_duty"
SLEEP = "select pg_sleep(:s)"
TAKE_OFF = "update oncall set on_duty = false where pair = :p and doctor = :d"
ACTION = "insert into actions (request_id, attempt, pair, doctor) values (:r, :a, :p, :d)"
CALLBACK = "insert into callbacks (request_id, attempt) values (:r, :a)"
EVENT = "insert into events (request_id, attempt, note) values (:r, :a, :n)"
DOOMED = "insert into doomed (request_id) values (:r)"
FAIL_STATEMENT = "select fail_first_statements()"
RAISE_TRANSIENT = (
    "do $$ begin raise exception 'injected serialization failure' "
    "using errcode = 'serialization_failure'; end $$"
)


def create_schema(
    engine: Engine, pairs: int, commit_failures: int = 0, statement_failures: int = 0
) -> None:
    """The tables, ``pairs`` pairs of doctors on duty, ``events``' trigger, which makes
    the first ``commit_failures`` commits that inserted into ``events`` fail, and
    ``fail_first_statements()``, which fails its first ``statement_failures`` calls
    (sequences count them: they are not rolled back with the transaction that used them)."""
    schema = SCHEMA.replace("{failures}", str(int(commit_failures)))
    schema = schema.replace("{statement_failures}", str(int(statement_failures)))
    with engine.begin() as conn:
        conn.exec_driver_sql(schema)
        if pairs:
            conn.execute(
                text("insert into oncall values (:p, :d, true)"),
                [{"p": p, "d": d} for p in range(pairs) for d in ("a", "b")],
            )
        conn.exec_driver_sql("analyze")


class Record:
    """What a server saw, in its own memory: served at ``/_attempts``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.invocations: Counter[str] = Counter()
        self.failed_in_handler = 0
        self.callbacks: list[list[str]] = []

    def invoked(self, request_id: str) -> str:
        """Count an attempt at ``request_id``; return the attempt's own id."""
        with self.lock:
            self.invocations[request_id] += 1
        return uuid.uuid4().hex

    def handler_failed(self) -> None:
        with self.lock:
            self.failed_in_handler += 1

    def called_back(self, request_id: str, attempt: str) -> None:
        """A callback's row is committed (so a client that saw it here finds it)."""
        with self.lock:
            self.callbacks.append([request_id, attempt])

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "invocations": dict(self.invocations),
                "failed_in_handler": self.failed_in_handler,
                "callbacks": list(self.callbacks),
            }


async def _database_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": type(exc).__name__}, status_code=503)


def _settings(url: str | None, retries: int | None) -> tuple[str, int]:
    if url is None:
        # In a server process of its own: the replay WARNINGs go to stderr, with levels.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        url = os.environ["DATABASE_URL"]
    if retries is None:
        retries = int(os.environ.get("SESSIONMW_RETRIES", "0"))
    return url, retries


def _sync_engine(url: str) -> Engine:
    return create_engine(
        url,
        **ENGINE_OPTIONS,
        connect_args={"application_name": APPLICATION_NAME, "options": _OPTIONS},
    )


# -- Starlette, def endpoints, sync scoped_session ------------------------------------


def starlette_sync_app(
    url: str | None = None, retries: int | None = None, handle_db_errors: bool = False
) -> Starlette:
    url, retries = _settings(url, retries)
    engine = _sync_engine(url)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))
    record = Record()

    def log_callback(request_id: str, attempt: str) -> None:
        with sessionmw.request_scope(Session):
            Session.execute(text(CALLBACK), {"r": request_id, "a": attempt})
            Session.commit()
        record.called_back(request_id, attempt)

    def on_commit(request_id: str, attempt: str) -> None:
        sessionmw.on_commit(Session, lambda: log_callback(request_id, attempt))

    def oncall(request: Request) -> Response:
        pair, doctor = int(request.path_params["pair"]), request.path_params["doctor"]
        request_id = request.query_params["id"]
        attempt = record.invoked(request_id)
        db = request.state.db
        try:
            seen = db.execute(text(COUNT), {"p": pair}).scalar_one()
            db.execute(text(SLEEP), {"s": OVERLAP_SECONDS})
            took_off = seen >= 2
            if took_off:
                db.execute(text(TAKE_OFF), {"p": pair, "d": doctor})
                db.execute(text(ACTION), {"r": request_id, "a": attempt, "p": pair, "d": doctor})
                on_commit(request_id, attempt)
        except DBAPIError:
            record.handler_failed()
            raise
        return JSONResponse(
            {"id": request_id, "attempt": attempt, "seen": seen, "took_off": took_off}
        )

    def commit_fails(request: Request) -> Response:
        request_id = request.query_params["id"]
        attempt = record.invoked(request_id)
        note = anyio.from_thread.run(request.json)["note"]  # a def endpoint reads the body
        request.state.db.execute(text(EVENT), {"r": request_id, "a": attempt, "n": note})
        on_commit(request_id, attempt)
        return JSONResponse({"id": request_id, "attempt": attempt})

    def statement_fails(request: Request) -> Response:
        request_id = request.query_params["id"]
        attempt = record.invoked(request_id)
        db = request.state.db
        db.execute(text(FAIL_STATEMENT))
        db.execute(text(EVENT), {"r": request_id, "a": attempt, "n": "saved"})
        on_commit(request_id, attempt)
        return JSONResponse({"id": request_id, "attempt": attempt})

    def manual_commit_then_fail(request: Request) -> Response:
        request_id = request.query_params["id"]
        attempt = record.invoked(request_id)
        db = request.state.db
        db.execute(text(EVENT), {"r": request_id, "a": attempt, "n": "committed by hand"})
        on_commit(request_id, attempt)
        db.commit()
        if request.query_params["at"] == "handler":
            db.execute(text(RAISE_TRANSIENT))
        else:
            db.execute(text(DOOMED), {"r": request_id})
        return JSONResponse({"id": request_id, "attempt": attempt})

    def attempts(request: Request) -> Response:
        return JSONResponse(record.as_json())

    def state(request: Request) -> Response:
        return JSONResponse(
            {"registry": len(Session.registry.registry), "checkedout": engine.pool.checkedout()}
        )

    app = Starlette(
        routes=[
            Route("/oncall/{pair}/{doctor}", oncall, methods=["POST"]),
            Route("/commit-fails", commit_fails, methods=["POST"]),
            Route("/statement-fails", statement_fails, methods=["POST"]),
            Route("/manual-commit-then-fail", manual_commit_then_fail, methods=["POST"]),
            Route("/_attempts", attempts),
            Route("/_state", state),
        ],
        middleware=[
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=Session,
                commit="on_success",
                retries=retries,
            )
        ],
        exception_handlers={DBAPIError: _database_error} if handle_db_errors else {},
    )

    async def dispose() -> None:
        engine.dispose()

    app.state.dispose = dispose
    return app


# -- Starlette, async def endpoints, async_scoped_session ------------------------------


def starlette_async_app(
    url: str | None = None, retries: int | None = None, handle_db_errors: bool = False
) -> Starlette:
    url, retries = _settings(url, retries)
    engine = create_async_engine(
        url.replace("+psycopg://", "+asyncpg://", 1),
        **ENGINE_OPTIONS,
        connect_args={
            "server_settings": {
                "application_name": APPLICATION_NAME,
                "enable_seqscan": "off",
                "enable_bitmapscan": "off",
            }
        },
    )
    Session = sessionmw.request_scoped(async_sessionmaker(engine))
    record = Record()

    def on_commit(request_id: str, attempt: str) -> None:
        async def log_callback() -> None:
            async with sessionmw.request_scope(Session):
                await Session.execute(text(CALLBACK), {"r": request_id, "a": attempt})
                await Session.commit()
            record.called_back(request_id, attempt)

        sessionmw.on_commit(Session, log_callback)

    async def oncall(request: Request) -> Response:
        pair, doctor = int(request.path_params["pair"]), request.path_params["doctor"]
        request_id = request.query_params["id"]
        attempt = record.invoked(request_id)
        db = request.state.db
        try:
            seen = (await db.execute(text(COUNT), {"p": pair})).scalar_one()
            await db.execute(text(SLEEP), {"s": OVERLAP_SECONDS})
            took_off = seen >= 2
            if took_off:
                await db.execute(text(TAKE_OFF), {"p": pair, "d": doctor})
                await db.execute(
                    text(ACTION), {"r": request_id, "a": attempt, "p": pair, "d": doctor}
                )
                on_commit(request_id, attempt)
        except DBAPIError:
            record.handler_failed()
            raise
        return JSONResponse(
            {"id": request_id, "attempt": attempt, "seen": seen, "took_off": took_off}
        )

    async def commit_fails(request: Request) -> Response:
        request_id = request.query_params["id"]
        attempt = record.invoked(request_id)
        note = (await request.json())["note"]
        await request.state.db.execute(text(EVENT), {"r": request_id, "a": attempt, "n": note})
        on_commit(request_id, attempt)
        return JSONResponse({"id": request_id, "attempt": attempt})

    async def statement_fails(request: Request) -> Response:
        request_id = request.query_params["id"]
        attempt = record.invoked(request_id)
        db = request.state.db
        await db.execute(text(FAIL_STATEMENT))
        await db.execute(text(EVENT), {"r": request_id, "a": attempt, "n": "saved"})
        on_commit(request_id, attempt)
        return JSONResponse({"id": request_id, "attempt": attempt})

    async def manual_commit_then_fail(request: Request) -> Response:
        request_id = request.query_params["id"]
        attempt = record.invoked(request_id)
        db = request.state.db
        await db.execute(text(EVENT), {"r": request_id, "a": attempt, "n": "committed by hand"})
        on_commit(request_id, attempt)
        await db.commit()
        if request.query_params["at"] == "handler":
            await db.execute(text(RAISE_TRANSIENT))
        else:
            await db.execute(text(DOOMED), {"r": request_id})
        return JSONResponse({"id": request_id, "attempt": attempt})

    async def attempts(request: Request) -> Response:
        return JSONResponse(record.as_json())

    async def state(request: Request) -> Response:
        return JSONResponse(
            {
                "registry": len(Session.registry.registry),
                "checkedout": engine.sync_engine.pool.checkedout(),
            }
        )

    app = Starlette(
        routes=[
            Route("/oncall/{pair}/{doctor}", oncall, methods=["POST"]),
            Route("/commit-fails", commit_fails, methods=["POST"]),
            Route("/statement-fails", statement_fails, methods=["POST"]),
            Route("/manual-commit-then-fail", manual_commit_then_fail, methods=["POST"]),
            Route("/_attempts", attempts),
            Route("/_state", state),
        ],
        middleware=[
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=Session,
                commit="on_success",
                retries=retries,
            )
        ],
        exception_handlers={DBAPIError: _database_error} if handle_db_errors else {},
    )
    app.state.dispose = engine.dispose
    return app


# -- Flask under WSGI, the global scoped_session proxy ---------------------------------


def flask_app(url: str | None = None, retries: int | None = None) -> Flask:
    url, retries = _settings(url, retries)
    engine = _sync_engine(url)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))
    record = Record()
    app = Flask(__name__)

    def log_callback(request_id: str, attempt: str) -> None:
        with sessionmw.request_scope(Session):
            Session.execute(text(CALLBACK), {"r": request_id, "a": attempt})
            Session.commit()
        record.called_back(request_id, attempt)

    def on_commit(request_id: str, attempt: str) -> None:
        sessionmw.on_commit(Session, lambda: log_callback(request_id, attempt))

    @app.post("/oncall/<int:pair>/<doctor>")
    def oncall(pair: int, doctor: str) -> Any:
        request_id = request.args["id"]
        attempt = record.invoked(request_id)
        try:
            seen = Session.execute(text(COUNT), {"p": pair}).scalar_one()
            Session.execute(text(SLEEP), {"s": OVERLAP_SECONDS})
            took_off = seen >= 2
            if took_off:
                Session.execute(text(TAKE_OFF), {"p": pair, "d": doctor})
                Session.execute(
                    text(ACTION), {"r": request_id, "a": attempt, "p": pair, "d": doctor}
                )
                on_commit(request_id, attempt)
        except DBAPIError:
            record.handler_failed()
            raise
        return jsonify(id=request_id, attempt=attempt, seen=seen, took_off=took_off)

    @app.post("/commit-fails")
    def commit_fails() -> Any:
        request_id = request.args["id"]
        attempt = record.invoked(request_id)
        note = request.get_json()["note"]
        Session.execute(text(EVENT), {"r": request_id, "a": attempt, "n": note})
        on_commit(request_id, attempt)
        return jsonify(id=request_id, attempt=attempt)

    @app.post("/statement-fails")
    def statement_fails() -> Any:
        request_id = request.args["id"]
        attempt = record.invoked(request_id)
        Session.execute(text(FAIL_STATEMENT))
        Session.execute(text(EVENT), {"r": request_id, "a": attempt, "n": "saved"})
        on_commit(request_id, attempt)
        return jsonify(id=request_id, attempt=attempt)

    @app.post("/manual-commit-then-fail")
    def manual_commit_then_fail() -> Any:
        request_id = request.args["id"]
        attempt = record.invoked(request_id)
        Session.execute(text(EVENT), {"r": request_id, "a": attempt, "n": "committed by hand"})
        on_commit(request_id, attempt)
        Session.commit()
        if request.args["at"] == "handler":
            Session.execute(text(RAISE_TRANSIENT))
        else:
            Session.execute(text(DOOMED), {"r": request_id})
        return jsonify(id=request_id, attempt=attempt)

    @app.get("/_attempts")
    def attempts() -> Any:
        return jsonify(record.as_json())

    @app.get("/_state")
    def state() -> Any:
        return jsonify(registry=len(Session.registry.registry), checkedout=engine.pool.checkedout())

    app.wsgi_app = sessionmw.WSGISessionMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, Session, commit="on_success", retries=retries
    )
    app.config["ENGINE"] = engine
    return app
