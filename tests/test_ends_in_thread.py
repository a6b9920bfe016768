"""``@ends_in_thread``: a ``def`` endpoint's request settles and closes in its own thread.

On PostgreSQL (on SQLite the middleware closes inline anyway): every round trip runs in
the endpoint's thread, the middleware has no hop left to take, the policy decides as it
would at the response's start, and what the endpoint cannot settle (a streamed body,
background tasks, plain data) is still the middleware's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import sessionmw
import sessionmw.unit
from sessionmw.policy import Commit
from tests.conftest import assert_clean, user_names
from tests.models import Base, Note, User
from tests.test_event_loop import record_round_trips

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url, pool_size=5, max_overflow=10)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def serve(Session: Any, commit: Commit, *routes: Route) -> httpx.AsyncClient:
    app = Starlette(
        routes=list(routes),
        middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit=commit)],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.mark.parametrize(
    ("commit", "status", "kept"),
    [("on_success", 201, True), ("on_success", 409, False), ("manual", 201, False)],
)
async def test_the_policy_decides_in_the_endpoint_thread(
    pg_engine: Engine, worker_hops: list[Any], commit: Commit, status: int, kept: bool
) -> None:
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    seen = record_round_trips(pg_engine)
    endpoint_threads: set[int] = set()
    committed: list[str] = []

    @sessionmw.ends_in_thread
    def write(request: Request) -> Response:
        name = request.path_params["name"]
        endpoint_threads.add(threading.get_ident())
        Session.add(User(name=name))
        Session.flush()

        async def after_commit() -> None:  # awaited on the loop: no hop of its own
            committed.append(name)

        sessionmw.on_commit(Session, after_commit)
        return PlainTextResponse("w", status_code=status)

    async with serve(Session, commit, Route("/{name}", write, methods=["POST"])) as client:
        replies = await asyncio.gather(*[client.post(f"/u{n}") for n in range(5)])
    assert [r.status_code for r in replies] == [status] * 5
    assert worker_hops == []  # nothing was left for the middleware to end off the loop
    assert seen
    assert {thread for _, thread in seen} <= endpoint_threads
    names = {f"u{n}" for n in range(5)}
    assert user_names(pg_engine) == (names if kept else set())
    assert set(committed) == (names if kept else set())  # callbacks ran, after the commit
    assert_clean(Session, pg_engine)


async def test_a_commit_that_fails_in_the_endpoint_answers_500(
    pg_engine: Engine, worker_hops: list[Any]
) -> None:
    """The deferred foreign key fails at COMMIT, in the endpoint's thread: the client
    gets a 500, never the 201 the endpoint returned, and nothing is saved."""
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))

    @sessionmw.ends_in_thread
    def orphan(request: Request) -> Response:
        Session.add(Note(user_id=404, body="no such user"))
        Session.flush()
        return PlainTextResponse("saved", status_code=201)

    async with serve(Session, "on_success", Route("/", orphan, methods=["POST"])) as client:
        reply = await client.post("/")
    assert reply.status_code == 500
    with pg_engine.connect() as conn:
        assert conn.scalar(text("select count(*) from user_notes")) == 0
    assert worker_hops == []
    assert_clean(Session, pg_engine)


class MovedError(Exception):
    """Answered by an exception handler with a redirect: a success, for the policy."""


@pytest.mark.parametrize("decorated", [True, False])
async def test_an_endpoint_that_raises_is_decided_as_without_the_decorator(
    pg_engine: Engine, decorated: bool
) -> None:
    """What an exception means is known only once the app's exception handlers have
    answered: a 303 from a handler commits under "on_success", an unhandled error rolls
    back. The decorator leaves both to the middleware, so the rows are the same with it
    and without it."""
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    seen = record_round_trips(pg_engine)
    loop_thread = threading.get_ident()

    def write_then_raise(request: Request) -> Response:
        name = request.path_params["name"]
        Session.add(User(name=name))
        Session.flush()
        raise MovedError() if name == "moved" else LookupError("after the write")

    endpoint = sessionmw.ends_in_thread(write_then_raise) if decorated else write_then_raise

    async def moved(request: Request, exc: Exception) -> Response:
        return Response(status_code=303, headers={"location": "/elsewhere"})

    app = Starlette(
        routes=[Route("/{name}", endpoint, methods=["POST"])],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")
        ],
        exception_handlers={MovedError: moved},
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/moved")).status_code == 303
        assert (await client.post("/failed")).status_code == 500
    assert seen
    assert loop_thread not in {thread for _, thread in seen}  # before this test's own reads
    assert user_names(pg_engine) == {"moved"}
    assert_clean(Session, pg_engine)


async def test_what_runs_after_the_endpoint_still_has_its_session(
    pg_engine: Engine, worker_hops: list[Any]
) -> None:
    """A streamed body and a background task use the Session after the endpoint returned:
    the decorator leaves those requests to the middleware, which ends them after."""
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))
    used_later: list[bool] = []

    def still_open() -> None:
        used_later.append(Session().in_transaction())
        Session.execute(text("select 1"))

    @sessionmw.ends_in_thread
    def streamed(request: Request) -> Response:
        Session.execute(text("select 1"))

        def body() -> Iterator[bytes]:
            still_open()
            yield b"streamed"

        return StreamingResponse(body())

    @sessionmw.ends_in_thread
    def background(request: Request) -> Response:
        Session.execute(text("select 1"))
        return PlainTextResponse("later", background=BackgroundTask(still_open))

    routes = (Route("/streamed", streamed), Route("/background", background))
    async with serve(Session, "manual", *routes) as client:
        assert (await client.get("/streamed")).text == "streamed"
        assert (await client.get("/background")).text == "later"
    assert used_later == [True, True]  # the endpoint's transaction was still open
    assert len(worker_hops) == 2  # the middleware ended both, off the loop
    assert_clean(Session, pg_engine)


def test_outside_a_request_it_only_calls_the_endpoint() -> None:
    @sessionmw.ends_in_thread
    def endpoint(value: int) -> Response:
        return PlainTextResponse(str(value))

    assert endpoint(7).body == b"7"


def test_an_async_endpoint_is_refused_with_the_fix() -> None:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("")

    with pytest.raises(TypeError, match="Remove the decorator"):
        sessionmw.ends_in_thread(endpoint)


async def test_a_fastapi_endpoint_keeps_its_signature_and_ends_in_its_thread(
    tmp_path: Any, worker_hops: list[Any]
) -> None:
    """FastAPI reads the wrapped signature (path parameter, dependency) and runs the
    wrapper in its thread pool; a returned ``JSONResponse`` commits there, with no hop
    (on SQLite the middleware's commit would be one)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'fastapi.db'}")
    Base.metadata.create_all(engine)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))

    def get_db() -> OrmSession:
        return Session()

    app = FastAPI()
    app.add_middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")

    @app.post("/users/{name}")
    @sessionmw.ends_in_thread
    def add(name: str, db: OrmSession = Depends(get_db)) -> JSONResponse:  # noqa: B008
        db.add(User(name=name))
        return JSONResponse({"name": name}, status_code=201)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        reply = await client.post("/users/ada")
    assert (reply.status_code, reply.json()) == (201, {"name": "ada"})
    assert worker_hops == []
    assert user_names(engine) == {"ada"}
    assert_clean(Session, engine)
    engine.dispose()


async def test_a_reset_that_fails_leaves_the_response_and_the_session_to_the_middleware(
    pg_engine: Engine, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection is lost before the endpoint returns: the reset in its thread fails,
    is logged, and the middleware removes the Session; the endpoint's answer stands."""
    from tests.close_failure_apps import PID, _admin, terminate

    admin = _admin(pg_url)
    Session = sessionmw.request_scoped(sessionmaker(bind=pg_engine))

    @sessionmw.ends_in_thread
    def lose(request: Request) -> Response:
        Session.add(User(name="lost"))
        Session.flush()
        terminate(admin, Session.execute(PID).scalar_one())
        return PlainTextResponse("read")

    async with serve(Session, "manual", Route("/", lose)) as client:
        response = await client.get("/")
    assert (response.status_code, response.text) == (200, "read")
    assert "resetting the session of GET / failed" in caplog.text
    assert user_names(pg_engine) == set()
    assert_clean(Session, pg_engine)
    admin.dispose()
