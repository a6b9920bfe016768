"""Websocket outcomes, protocol mix-ups, and the collection safety net."""

from __future__ import annotations

import contextlib
import gc
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from flask import Flask
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import SingletonThreadPool
from starlette.applications import Starlette

import sessionmw
from tests.conftest import Tracker, assert_clean, user_names
from tests.models import Base, User
from tests.wsgi_helpers import Server

pytestmark = pytest.mark.anyio


# -- websockets under "on_success" ------------------------------------------------


def websocket_app(Session: Any, close_code: int | None, raise_after: bool = False) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        Session.add(User(name=f"ws {close_code} {raise_after}"))
        Session.flush()
        if raise_after:
            raise RuntimeError("the socket's handler failed")
        if close_code is not None:
            await send({"type": "websocket.close", "code": close_code})

    return sessionmw.ASGISessionMiddleware(app, Session, commit="on_success")


async def run_websocket(app: Any) -> None:
    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    comm = ApplicationCommunicator(app, scope)
    await comm.send_input({"type": "websocket.connect"})
    assert (await comm.receive_output(5))["type"] == "websocket.accept"
    with contextlib.suppress(RuntimeError):  # the handler's own, re-raised by the communicator
        await comm.wait(5)


@pytest.mark.parametrize(
    ("close_code", "kept"),
    [(None, True), (1000, True), (1001, True), (1011, False), (4000, False), (1008, False)],
)
async def test_websocket_commits_only_after_a_normal_end(
    Session: Any, engine: Engine, close_code: int | None, kept: bool
) -> None:
    await run_websocket(websocket_app(Session, close_code))
    assert bool(user_names(engine)) is kept
    assert_clean(Session, engine)


async def test_websocket_whose_handler_raised_after_accept_rolls_back(
    Session: Any, engine: Engine
) -> None:
    await run_websocket(websocket_app(Session, None, raise_after=True))
    assert user_names(engine) == set()
    assert_clean(Session, engine)


# -- the wrong middleware for the protocol ---------------------------------------------


def test_wsgi_middleware_refuses_an_asgi_app(Session: Any) -> None:
    with pytest.raises(TypeError, match="ASGISessionMiddleware"):
        sessionmw.WSGISessionMiddleware(Starlette(), Session)  # type: ignore[arg-type]

    async def bare(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(TypeError, match="looks like an ASGI application"):
        sessionmw.WSGISessionMiddleware(bare, Session)  # type: ignore[arg-type]


def test_asgi_middleware_refuses_a_wsgi_app(Session: Any) -> None:
    with pytest.raises(TypeError, match="WSGISessionMiddleware"):
        sessionmw.ASGISessionMiddleware(Flask(__name__), Session)  # type: ignore[arg-type]

    def bare(environ: Any, start_response: Any) -> list[bytes]:
        return []

    with pytest.raises(TypeError, match="looks like a WSGI application"):
        sessionmw.ASGISessionMiddleware(bare, Session)  # type: ignore[arg-type]


def test_each_middleware_still_takes_its_own_kind(Session: Any) -> None:
    flask_app = Flask(__name__)
    sessionmw.WSGISessionMiddleware(flask_app.wsgi_app, Session)
    sessionmw.ASGISessionMiddleware(Starlette(), Session)


# -- the collection safety net --------------------------------------------------------


@pytest.fixture
def memory_engine() -> Iterator[Engine]:
    """A SQLite memory database: one connection per thread (SingletonThreadPool)."""
    engine = create_engine("sqlite://", poolclass=SingletonThreadPool)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_response_collected_in_another_thread_leaves_no_transaction_behind(
    memory_engine: Engine, tracker: Tracker
) -> None:
    """The collector may run in any thread.  With SingletonThreadPool, a rollback there
    fails, and the leftover transaction on the owning thread's connection used to be
    committed by that thread's next request; the net now drops the connection unused."""
    Session = sessionmw.request_scoped(
        sessionmaker(bind=memory_engine, class_=tracker.session_class())
    )

    def writes_and_streams(environ: Any, start_response: Any) -> Iterator[bytes]:
        Session.add(User(name="abandoned, never committed"))
        Session.flush()
        start_response("200 OK", [])
        yield b"x"

    def commits(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="committed"))
        Session.commit()
        start_response("200 OK", [])
        return [b"ok"]

    responses: list[Any] = []
    body = Server().call(sessionmw.WSGISessionMiddleware(writes_and_streams, Session))
    next(iter(body))  # started, never closed
    responses.append(body)
    del body

    def collect() -> None:
        responses.clear()
        gc.collect()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collector = threading.Thread(target=collect)
        collector.start()
        collector.join(10)
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert len(Session.registry.registry) == 1  # left for the owning thread to close
    assert all(scope.ended for scope in Session.registry.registry)

    Server().get(sessionmw.WSGISessionMiddleware(commits, Session))
    with memory_engine.connect() as conn:
        assert set(conn.scalars(select(User.name))) == {"committed"}
    assert Session.registry.registry == {}


def test_response_collected_in_its_own_thread_closes_normally(
    tmp_path: Path, tracker: Tracker
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'net.db'}")
    Base.metadata.create_all(engine)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine, class_=tracker.session_class()))

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        Session.add(User(name="never committed"))
        Session.flush()
        start_response("200 OK", [])
        yield b"x"

    body = Server().call(sessionmw.WSGISessionMiddleware(app, Session))
    next(iter(body))
    del body
    with pytest.warns(ResourceWarning, match="never closed"):
        gc.collect()
    assert tracker.closed_once()
    assert_clean(Session, engine)
    assert user_names(engine) == set()
    engine.dispose()
