"""Several databases in one request: settled together, in one place.

Two stacked middlewares, one per PostgreSQL database, share the request's token; the
outermost settles both at the response-start point.  With ``twophase=True`` factories
that is a two-phase commit: all or none, and no prepared transaction left behind, also
when the request is cancelled between PREPARE and COMMIT, or a connection is lost
there.  Without it, a later failure after an earlier commit is logged at ERROR naming
the database that kept its write.  Each middleware keeps its own commit policy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
from tests.conftest import assert_clean
from tests.models import Base, Note, User
from tests.wsgi_helpers import Server

pytestmark = pytest.mark.anyio


class Pair:
    """Two databases, each with its engine and request-scoped registry."""

    def __init__(self, url_a: str, url_b: str, twophase: bool) -> None:
        self.engines = {
            "a": create_engine(url_a, pool_size=5, max_overflow=10),
            "b": create_engine(url_b, pool_size=5, max_overflow=10),
        }
        self.sessions = {
            name: sessionmw.request_scoped(sessionmaker(bind=engine, twophase=twophase))
            for name, engine in self.engines.items()
        }
        for engine in self.engines.values():
            Base.metadata.create_all(engine)

    def write(self, name: str, failing: str | None) -> None:
        """One user in each database; in ``failing`` also a note whose deferred foreign
        key fails at PREPARE (two-phase) or COMMIT."""
        for key, Session in self.sessions.items():
            Session.add(User(name=name))
            if key == failing:
                Session.add(Note(user_id=10**6, body="dangling"))
            Session.flush()

    def rows(self) -> dict[str, set[str]]:
        found = {}
        for key, engine in self.engines.items():
            with engine.connect() as conn:
                found[key] = set(conn.scalars(select(User.name)))
        return found

    def prepared(self) -> int:
        with self.engines["a"].connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(text("pg_prepared_xacts"))))

    def assert_clean(self) -> None:
        assert self.prepared() == 0
        for key, engine in self.engines.items():
            assert_clean(self.sessions[key], engine)
            with engine.connect() as conn:
                idle = conn.scalar(
                    text(
                        "select count(*) from pg_stat_activity where datname = current_database()"
                        " and state = 'idle in transaction'"
                    )
                )
            assert idle == 0

    def dispose(self) -> None:
        for engine in self.engines.values():
            engine.dispose()


@pytest.fixture
def one_by_one_pair(pg_url: str, second_pg_url: str) -> Iterator[Pair]:
    made = Pair(pg_url, second_pg_url, twophase=False)
    yield made
    made.dispose()


@pytest.fixture
def twophase_pair(pg_url: str, second_pg_url: str) -> Iterator[Pair]:
    made = Pair(pg_url, second_pg_url, twophase=True)
    yield made
    made.dispose()


def asgi_app(pair: Pair) -> Starlette:
    async def endpoint(request: Request) -> Response:
        failing = request.query_params.get("fail")
        await asyncio.to_thread(pair.write, request.path_params["name"], failing)
        return PlainTextResponse("created", status_code=201)

    return Starlette(
        routes=[Route("/{name}", endpoint, methods=["POST"])],
        middleware=[
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=pair.sessions["a"],
                commit="on_success",
                state_key="db_a",
            ),
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=pair.sessions["b"],
                commit="on_success",
                state_key="db_b",
            ),
        ],
    )


def wsgi_app(pair: Pair) -> Any:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        query = environ.get("QUERY_STRING", "")
        failing = query.split("=", 1)[1] if query.startswith("fail=") else None
        pair.write(environ["PATH_INFO"].strip("/"), failing)
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"created"]

    inner = sessionmw.WSGISessionMiddleware(
        app, pair.sessions["b"], commit="on_success", environ_key="db_b"
    )
    return sessionmw.WSGISessionMiddleware(
        inner, pair.sessions["a"], commit="on_success", environ_key="db_a"
    )


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.mark.parametrize("failing", ["a", "b"])
async def test_asgi_twophase_failure_in_either_database_writes_nothing(
    twophase_pair: Pair, failing: str
) -> None:
    async with client(asgi_app(twophase_pair)) as c:
        statuses = [(await c.post(f"/u{n}?fail={failing}")).status_code for n in range(10)]
        assert (await c.post("/good")).status_code == 201
    assert statuses == [500] * 10
    assert twophase_pair.rows() == {"a": {"good"}, "b": {"good"}}  # no partial write
    twophase_pair.assert_clean()


@pytest.mark.parametrize("failing", ["a", "b"])
def test_wsgi_twophase_failure_in_either_database_writes_nothing(
    twophase_pair: Pair, failing: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = wsgi_app(twophase_pair)
    for n in range(10):
        # psycopg aborts a transaction whose PREPARE failed, so SQLAlchemy's rollback of
        # it may raise "does not exist" over the cause; the ERROR log carries the cause
        with caplog.at_level(logging.ERROR, "sessionmw"), pytest.raises(DBAPIError):
            Server().get(app, f"/u{n}", query_string=f"fail={failing}")
        assert "ForeignKeyViolation" in caplog.text
        caplog.clear()
    assert Server().get(app, "/good") == ("201 Created", b"created")
    assert twophase_pair.rows() == {"a": {"good"}, "b": {"good"}}
    twophase_pair.assert_clean()


async def test_without_twophase_the_kept_write_is_logged_at_error(
    one_by_one_pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """Innermost first: b commits, then a fails; b keeps its write and the log says so."""
    pair = one_by_one_pair
    with caplog.at_level(logging.ERROR, "sessionmw"):
        async with client(asgi_app(pair)) as c:
            assert (await c.post("/partial?fail=a")).status_code == 500
    assert pair.rows() == {"a": set(), "b": {"partial"}}
    message = caplog.records[0].getMessage()
    assert "db_a" in message
    assert "db_b" in message
    assert "twophase=True" in message
    pair.assert_clean()


async def test_request_cancelled_between_prepare_and_commit_finishes_both(
    twophase_pair: Pair,
) -> None:
    """The settle is shielded: a cancellation that lands after PREPARE waits for COMMIT."""
    prepared = threading.Event()
    proceed = threading.Event()

    @event.listens_for(twophase_pair.engines["a"], "prepare_twophase")  # b is prepared
    def hold(conn: Any, xid: Any) -> None:
        prepared.set()
        proceed.wait(10)

    app = asgi_app(twophase_pair)
    async with client(app) as c:
        request = asyncio.ensure_future(c.post("/cancelled"))
        await asyncio.to_thread(prepared.wait, 10)
        request.cancel()
        await asyncio.sleep(0.05)
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await request
    assert twophase_pair.rows() == {"a": {"cancelled"}, "b": {"cancelled"}}
    twophase_pair.assert_clean()


async def test_connection_lost_after_prepare_is_committed_on_a_fresh_one(
    twophase_pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """Both databases prepared, then a's connection dies before COMMIT PREPARED: the
    prepared transaction survives in the server and is committed on a new connection."""
    engine_a = twophase_pair.engines["a"]
    killer = create_engine(engine_a.url, isolation_level="AUTOCOMMIT")
    pids: list[int] = []

    @event.listens_for(engine_a, "prepare_twophase")
    def remember(conn: Any, xid: Any) -> None:
        pids.append(conn.exec_driver_sql("select pg_backend_pid()").scalar())

    @event.listens_for(twophase_pair.engines["b"], "commit_twophase")  # before a's
    def kill_a(conn: Any, xid: Any, is_prepared: bool) -> None:
        with killer.connect() as admin:
            admin.execute(text("select pg_terminate_backend(:pid)"), {"pid": pids[-1]})

    with caplog.at_level(logging.WARNING, "sessionmw"):
        async with client(asgi_app(twophase_pair)) as c:
            assert (await c.post("/recovered")).status_code == 201
    killer.dispose()
    assert twophase_pair.rows() == {"a": {"recovered"}, "b": {"recovered"}}
    assert "on a fresh connection" in caplog.text
    twophase_pair.assert_clean()


@pytest.mark.parametrize("protocol", ["asgi", "wsgi"])
async def test_each_stacked_middleware_keeps_its_own_policy(protocol: str, tmp_path: Any) -> None:
    """An outer ``"manual"`` middleware and an inner ``"on_success"`` one: the outer owns
    the request's unit of work, yet the inner database still commits at the response,
    and the outer's uncommitted write is rolled back (SQLite files)."""
    pair = Pair(f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}", False)
    outer, inner = pair.sessions["a"], pair.sessions["b"]

    def write(name: str) -> None:
        for Session in (outer, inner):
            Session.add(User(name=name))
            Session.flush()

    if protocol == "asgi":

        async def endpoint(request: Request) -> Response:
            write(request.path_params["name"])
            return PlainTextResponse("created", status_code=201)

        app: Any = sessionmw.ASGISessionMiddleware(
            sessionmw.ASGISessionMiddleware(
                Starlette(routes=[Route("/{name}", endpoint, methods=["POST"])]),
                session=inner,
                commit="on_success",
                state_key="db_b",
            ),
            session=outer,
            commit="manual",
            state_key="db_a",
        )
        async with client(app) as http:
            status = (await http.post("/ada")).status_code
    else:

        def wsgi(environ: Any, start_response: Any) -> list[bytes]:
            write(environ["PATH_INFO"].strip("/"))
            start_response("201 Created", [("Content-Type", "text/plain")])
            return [b"created"]

        app = sessionmw.WSGISessionMiddleware(
            sessionmw.WSGISessionMiddleware(wsgi, inner, commit="on_success", environ_key="b"),
            outer,
            commit="manual",
            environ_key="a",
        )
        status_line, _ = Server().get(app, "/ada", method="POST")
        status = int(status_line[:3])
    assert status == 201
    assert pair.rows() == {"a": set(), "b": {"ada"}}
    for key, engine in pair.engines.items():
        assert_clean(pair.sessions[key], engine)
    pair.dispose()
