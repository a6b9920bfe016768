"""No database round trip of a sync Session ever runs on the event-loop thread (§3 rule 7).

Across a network every commit, rollback and connection reset is a round trip, and on
the loop it stalls every other request for that long.  These tests record the thread
each of them runs on, from SQLAlchemy's own connection and pool events, on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
import sessionmw.unit
from tests.conftest import assert_clean, user_names
from tests.models import Base, User

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_engine(pg_url: str) -> Any:
    engine = create_engine(pg_url, pool_size=5, max_overflow=10)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def record_round_trips(engine: Engine) -> list[tuple[str, int]]:
    """(what, thread id) for every commit, rollback and reset-on-return of ``engine``."""
    seen: list[tuple[str, int]] = []

    def recorder(name: str) -> Any:
        def record(*args: Any) -> None:
            seen.append((name, threading.get_ident()))

        return record

    event.listen(engine, "commit", recorder("commit"))
    event.listen(engine, "rollback", recorder("rollback"))
    event.listen(engine.pool, "reset", recorder("reset"))
    return seen


def build(Session: Any, commit: Any) -> Starlette:
    def read(request: Request) -> Response:  # a sync endpoint, run in a worker thread
        Session.execute(text("select 1"))
        return PlainTextResponse("read")

    def write(request: Request) -> Response:
        Session.add(User(name=request.path_params["name"]))
        Session.flush()
        return PlainTextResponse("w", status_code=int(request.query_params.get("status", 201)))

    def manual_write(request: Request) -> Response:
        Session.add(User(name=request.path_params["name"]))
        Session.commit()
        return PlainTextResponse("committed", status_code=201)

    return Starlette(
        routes=[
            Route("/read", read),
            Route("/write/{name}", write, methods=["POST"]),
            Route("/manual/{name}", manual_write, methods=["POST"]),
        ],
        middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit=commit)],
    )


def one_route(endpoint: Any, Session: Any) -> Starlette:
    return Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=Session)],
    )


async def get_ok(app: Starlette) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).status_code == 200


@pytest.mark.parametrize("commit", ["manual", "on_success"])
async def test_no_round_trip_of_a_sync_session_runs_on_the_loop(
    pg_engine: Engine, commit: str
) -> None:
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    seen = record_round_trips(pg_engine)
    loop_thread = threading.get_ident()
    transport = httpx.ASGITransport(app=build(Session, commit), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        replies = await asyncio.gather(
            *[client.get("/read") for _ in range(10)],
            *[client.post(f"/write/w{n}") for n in range(5)],
            *[client.post(f"/write/x{n}?status=404") for n in range(5)],
            *[client.post(f"/manual/m{n}") for n in range(5)],
        )
    assert [r.status_code for r in replies] == [200] * 10 + [201] * 5 + [404] * 5 + [201] * 5
    kinds = {name for name, _ in seen}
    assert "reset" in kinds or "rollback" in kinds  # the reads' transactions were ended
    on_loop = [name for name, thread in seen if thread == loop_thread]
    assert on_loop == []
    expected = {f"m{n}" for n in range(5)}
    if commit == "on_success":
        expected |= {f"w{n}" for n in range(5)}
    assert user_names(pg_engine) == expected
    assert_clean(Session, pg_engine)


async def test_an_untouched_request_stays_on_the_loop(pg_engine: Engine) -> None:
    """No session, no hop: a request that never used the database costs no thread."""
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    threads: list[str] = []

    async def endpoint(request: Request) -> Response:
        threads.append(threading.current_thread().name)
        return PlainTextResponse("ok")

    await get_ok(one_route(endpoint, Session))
    assert Session.registry.registry == {}
    assert pg_engine.pool.checkedout() == 0


def test_local_sqlite_closes_inline(tmp_path: Any) -> None:
    """On SQLite a close costs less than the hop, so a Session bound to it is local; one
    bound elsewhere, or to nothing but per-mapper binds, is not."""
    from sessionmw.unit import _local_bind

    sqlite = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    remote = create_engine("postgresql+psycopg://u@127.0.0.1:1/x")
    assert _local_bind(sessionmaker(bind=sqlite)().bind)
    assert not _local_bind(sessionmaker(bind=remote)().bind)
    assert not _local_bind(sessionmaker(class_=OrmSession)().bind)


async def test_a_child_scope_closes_its_sync_session_off_the_loop(pg_engine: Engine) -> None:
    """``async with request_scope(Session)`` (a child scope per task of a gather) ends
    its sync Session's transaction in a worker thread too, not on the loop."""
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    seen = record_round_trips(pg_engine)
    loop_thread = threading.get_ident()

    async def child(name: str) -> None:
        async with sessionmw.request_scope(Session):
            await asyncio.to_thread(Session.execute, text("select 1"))

    async def endpoint(request: Request) -> Response:
        await asyncio.gather(child("a"), child("b"))
        return PlainTextResponse("ok")

    await get_ok(one_route(endpoint, Session))
    assert len([name for name, _ in seen if name in ("reset", "rollback")]) >= 2
    assert [name for name, thread in seen if thread == loop_thread] == []
    assert_clean(Session, pg_engine)


@pytest.mark.parametrize("commit", ["manual", "on_success"])
async def test_an_endpoint_that_ends_its_transaction_leaves_the_middleware_no_hop(
    pg_engine: Engine, worker_hops: list[Any], commit: str
) -> None:
    """A ``def`` endpoint that ends its own transaction (``close()`` under "manual",
    ``commit()`` under "on_success") leaves nothing that needs a round trip, so the
    middleware removes the Session inline, with no worker hop."""
    hops = worker_hops
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    seen = record_round_trips(pg_engine)
    loop_thread = threading.get_ident()

    def write(request: Request) -> Response:  # a sync endpoint, run in a worker thread
        Session.add(User(name=request.path_params["name"]))
        Session.flush()
        response = PlainTextResponse("w", status_code=201)
        if commit == "on_success":
            Session.commit()
        else:
            Session.execute(text("select 1"))
            Session.close()  # ends the transaction: the flushed row is rolled back
        return response

    app = Starlette(
        routes=[Route("/write/{name}", write, methods=["POST"])],
        middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit=commit)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        replies = await asyncio.gather(*[client.post(f"/write/u{n}") for n in range(5)])
    assert [r.status_code for r in replies] == [201] * 5
    assert hops == []  # the middleware had no round trip left to do
    assert seen  # the endpoints did end their transactions
    assert loop_thread not in {thread for _, thread in seen}
    expected = {f"u{n}" for n in range(5)} if commit == "on_success" else set()
    assert user_names(pg_engine) == expected
    assert_clean(Session, pg_engine)
