"""A psycopg 3 Session's end of request awaited on the loop (``sessionmw.loop_io``).

The commit or close of a sync Session runs on the event-loop thread, its round trips
awaited, never blocking: psycopg's blocking ``Connection.wait`` is recorded and must
never run on the loop.  Cancelled meanwhile, the work still finishes; a failed commit
still answers 500; a thread that takes the connection from the pool right after it was
given back waits as usual; other drivers keep the hop to a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
from sessionmw.loop_io import awaitable_on_loop, run_on_loop
from tests.conftest import assert_clean, user_names
from tests.models import Base, User

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_engine(pg_url: str) -> Any:
    engine = create_engine(pg_url, pool_size=5, max_overflow=10)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def commit_threads(engine: Engine) -> list[int]:
    threads: list[int] = []
    event.listen(engine, "commit", lambda conn: threads.append(threading.get_ident()))
    return threads


def on_commit_of_users(engine: Engine, body: str) -> None:
    """A deferred trigger: ``body`` runs in plpgsql at the COMMIT of a write to users."""
    with engine.begin() as conn:
        conn.execute(
            text(f"create function at_commit() returns trigger as $$ begin {body}; "
                 "return null; end $$ language plpgsql")
        )  # fmt: skip
        conn.execute(
            text("create constraint trigger at_commit after insert on users deferrable "
                 "initially deferred for each row execute function at_commit()")
        )  # fmt: skip


def writer(Session: Any) -> Starlette:
    def write(request: Request) -> Response:  # sync: runs in a worker thread
        Session.add(User(name=request.path_params["name"]))
        Session.flush()
        return PlainTextResponse("written", status_code=201)

    return Starlette(
        routes=[Route("/write/{name}", write, methods=["POST"])],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")
        ],
    )


async def post(app: Starlette, path: str) -> int:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return (await client.post(path)).status_code


async def test_the_commit_awaits_its_round_trips_on_the_loop(
    pg_engine: Engine, blocking_waits: list[int]
) -> None:
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    committed_in = commit_threads(pg_engine)
    loop_thread = threading.get_ident()
    assert await post(writer(Session), "/write/ann") == 201
    assert committed_in == [loop_thread]  # no hop to a worker thread
    assert loop_thread not in blocking_waits  # and the loop never blocked on a socket
    assert blocking_waits  # the endpoint's own statements did block, in its thread
    assert user_names(pg_engine) == {"ann"}
    assert_clean(Session, pg_engine)


async def test_a_failed_commit_on_the_loop_answers_500(
    pg_engine: Engine, blocking_waits: list[int]
) -> None:
    on_commit_of_users(pg_engine, "raise exception 'refused at commit'")
    blocking_waits.clear()  # the set-up's own
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    assert await post(writer(Session), "/write/bob") == 500
    assert threading.get_ident() not in blocking_waits
    assert user_names(pg_engine) == set()
    assert_clean(Session, pg_engine)


async def test_a_request_cancelled_during_its_commit_still_commits(
    pg_engine: Engine, blocking_waits: list[int]
) -> None:
    """The COMMIT takes 300 ms (a deferred trigger sleeps); the request is cancelled
    meanwhile.  The commit finishes, then the cancellation goes on."""
    on_commit_of_users(pg_engine, "perform pg_sleep(0.3)")
    blocking_waits.clear()  # the set-up's own
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    committing = asyncio.Event()
    event.listen(pg_engine, "commit", lambda conn: committing.set())
    messages: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/write/cy", "raw_path": b"/write/cy", "query_string": b"",
        "root_path": "", "headers": [], "client": ("127.0.0.1", 1), "server": ("t", 80),
    }  # fmt: skip
    request = asyncio.ensure_future(writer(Session)(scope, receive, send))
    await committing.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert threading.get_ident() not in blocking_waits
    assert user_names(pg_engine) == {"cy"}  # committed, though cancelled meanwhile
    assert [m["type"] for m in messages] == []  # the response never started
    assert_clean(Session, pg_engine)


async def test_a_thread_that_takes_the_connection_meanwhile_waits_as_usual(
    pg_engine: Engine, blocking_waits: list[int]
) -> None:
    """While a call awaits a connection on the loop, any other thread that uses it (one
    that took it from the pool the moment it was given back) blocks on it as usual."""
    session = sessionmaker(bind=pg_engine)()
    session.execute(text("select 1"))
    dbapi = session.connection().connection.dbapi_connection
    blocking_waits.clear()  # the set-up's own
    answers: list[Any] = []

    def from_a_thread() -> None:
        worker = threading.Thread(
            target=lambda: answers.append(dbapi.execute("select 41 + 1").fetchone())
        )
        worker.start()
        worker.join()

    assert awaitable_on_loop([session])
    await run_on_loop([session], from_a_thread)
    assert answers == [(42,)]
    assert blocking_waits  # the thread's own blocking wait
    assert threading.get_ident() not in blocking_waits
    await run_on_loop([session], session.close)
    assert pg_engine.pool.checkedout() == 0


def test_other_drivers_keep_the_worker_thread(tmp_path: Path) -> None:
    """SQLite (a file): its commit is not awaitable on the loop, so it hops."""
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))
    committed_in = commit_threads(engine)
    loop_threads: list[int] = []

    async def run() -> int:
        loop_threads.append(threading.get_ident())
        return await post(writer(Session), "/write/dee")

    assert asyncio.run(run()) == 201
    assert committed_in
    assert committed_in[0] != loop_threads[0]
    assert user_names(engine) == {"dee"}
    assert_clean(Session, engine)
    engine.dispose()
