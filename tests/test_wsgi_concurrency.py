"""WSGI under concurrency: a real threaded server, and greenlets interleaved in one thread."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from greenlet import getcurrent, greenlet
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.orm import scoped_session, sessionmaker

import sessionmw
from examples.flask_app import Session as FlaskSession
from examples.flask_app import create_app
from examples.flask_app.models import Author, Book
from tests.conftest import assert_clean
from tests.servers import wait_until, werkzeug_server
from tests.wsgi_helpers import Server

REQUESTS = 500
THREADS = 16


@pytest.fixture
def flask_app(tmp_path: Any) -> Iterator[Any]:
    app = create_app(
        f"sqlite:///{tmp_path / 'load.db'}", pool_size=5, max_overflow=10, pool_timeout=30
    )
    yield app
    app.config["ENGINE"].dispose()


def test_500_mixed_requests_over_16_threads_leave_nothing_behind(flask_app: Any) -> None:
    engine: Engine = flask_app.config["ENGINE"]
    sessions_by_token: dict[Any, set[int]] = defaultdict(set)
    tokens_by_session: dict[int, set[Any]] = defaultdict(set)
    keep: list[Any] = []  # hold every Session and token so no id() is reused

    @event.listens_for(FlaskSession.session_factory, "after_begin")
    def _seen(session: Any, transaction: Any, connection: Any) -> None:
        token = sessionmw.current_request()
        keep.append((session, token))
        sessions_by_token[id(token)].add(id(session))
        tokens_by_session[id(session)].add(id(token))

    with sessionmw.request_scope(FlaskSession):
        author = Author(name="Dup")
        FlaskSession.add(author)
        FlaskSession.add_all([Book(title=f"seed {n}", author=author) for n in range(300)])
        FlaskSession.commit()
        author_id = author.id

    kinds = (
        ["read"] * 4 + ["write"] * 4 + ["conflict", "crash", "missing", "stream", "abandon", "bad"]
    )
    plan = [(n, random.Random(n).choice(kinds)) for n in range(REQUESTS)]

    def one(base: str, client: httpx.Client, n: int, kind: str) -> tuple[str, int, str]:
        name = f"writer {n}"
        if kind == "read":
            r = client.get(f"{base}/authors/{author_id}")
        elif kind == "write":
            r = client.post(f"{base}/authors", json={"name": name})
        elif kind == "conflict":
            r = client.post(f"{base}/authors", json={"name": "dup"})
        elif kind == "crash":
            r = client.post(f"{base}/authors/{author_id}/fail")
        elif kind == "missing":
            r = client.get(f"{base}/authors/{10**6 + n}")
        elif kind == "bad":
            r = client.post(f"{base}/authors", content=b"\xff not json")
        elif kind == "stream":
            r = client.get(f"{base}/books/stream")
            assert len(r.text.splitlines()) == 300
        else:  # abandon: read one chunk of the stream, then hang up
            with client.stream("GET", f"{base}/books/stream") as r:
                next(r.iter_bytes())
        return kind, r.status_code, name

    with werkzeug_server(flask_app) as base:
        clients = [httpx.Client(timeout=30) for _ in range(THREADS)]
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(lambda p: one(base, clients[p[0] % THREADS], *p), plan))
        for client in clients:
            client.close()
        wait_until(lambda: FlaskSession.registry.registry == {}, what="sessions removed")

    expected = {
        "read": 200,
        "write": 201,
        "conflict": 409,
        "crash": 500,
        "missing": 404,
        "stream": 200,
        "abandon": 200,
        "bad": 400,
    }
    got = Counter((kind, status) for kind, status, _ in results)
    assert got == Counter((kind, expected[kind]) for kind, _, _ in results)
    assert FlaskSession.registry.registry == {}
    assert engine.pool.checkedout() == 0
    with engine.connect() as conn:
        names = set(conn.scalars(select(Author.name)))
        never_saved = conn.scalar(select(func.count()).where(Book.title == "never saved"))
    written = {name for kind, status, name in results if kind == "write" and status == 201}
    assert names == written | {"Dup"}
    assert never_saved == 0
    # Every request that touched the database had one Session of its own.
    assert keep, "no request reached the database"
    assert all(len(s) == 1 for s in sessions_by_token.values())
    assert all(len(t) == 1 for t in tokens_by_session.values())
    touched = sum(1 for kind, _, _ in results if kind != "bad")
    assert len(sessions_by_token) == touched + 1  # and the scope that seeded the data


def interleave(mw: Any, record: dict[str, tuple[Any, Any]]) -> None:
    """Run two requests in two greenlets of this one thread, switching mid-request."""
    main = getcurrent()
    server = Server()
    a = greenlet(lambda: server.get(mw, "/a"))
    b = greenlet(lambda: server.get(mw, "/b"))
    a.switch()  # a opens its session, then yields to us
    b.switch()  # b opens its session, then yields
    a.switch()  # a finishes
    b.switch()  # b finishes
    assert a.dead
    assert b.dead
    del main


def greenlet_app(Session: Any, record: dict[str, tuple[Any, Any]]) -> Any:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        before = Session()
        before.execute(text("select 1"))
        getcurrent().parent.switch()  # another request runs here, in this same thread
        record[environ["PATH_INFO"]] = (before, Session())
        start_response("200 OK", [])
        return [b""]

    return app


def test_greenlets_interleaved_in_one_thread_keep_their_own_sessions(
    Session: Any, engine: Engine
) -> None:
    record: dict[str, tuple[Any, Any]] = {}
    interleave(sessionmw.WSGISessionMiddleware(greenlet_app(Session, record), Session), record)
    (a_before, a_after), (b_before, b_after) = record["/a"], record["/b"]
    assert a_before is a_after
    assert b_before is b_after
    assert a_before is not b_before
    assert_clean(Session, engine)


def test_thread_local_scoped_session_shares_one_session_between_greenlets(engine: Engine) -> None:
    """The failure the request scope fixes: scoped_session's default scope is the thread."""
    ThreadLocal = scoped_session(sessionmaker(bind=engine))
    record: dict[str, tuple[Any, Any]] = {}

    def app(environ: Any, start_response: Any) -> list[bytes]:
        try:
            return greenlet_app(ThreadLocal, record)(environ, start_response)  # type: ignore[no-any-return]
        finally:
            ThreadLocal.remove()

    interleave(app, record)
    assert record["/a"][0] is record["/b"][0]  # two requests, one Session
