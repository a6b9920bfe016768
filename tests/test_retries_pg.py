"""``retries=`` on a real PostgreSQL: write skew at SERIALIZABLE, failures at COMMIT, and
the requests that must not be replayed.

1. Write skew, served by real servers in processes of their own: uvicorn with a sync
   ``scoped_session`` (psycopg 3, ``def`` endpoint), uvicorn with an
   ``async_scoped_session`` (asyncpg, ``async def`` endpoint), gunicorn (gthread) with
   Flask.  ``PAIRS`` pairs of doctors, both on duty; the two requests of a pair each read
   how many of their pair are on duty and, if two, take their own doctor off duty.  Sent
   together, the two overlap, and PostgreSQL fails one of them with a serialization
   failure (in a statement or at COMMIT).  With ``retries=3`` the failed one is replayed,
   sees one doctor on duty and does nothing: both answer 2xx, exactly one doctor per pair
   goes off duty, each effect is applied once and each on_commit callback runs once, for
   the attempt that committed.  With ``retries=0``: one 2xx and one 5xx per pair that
   overlapped.  Either way the rows equal the 2xx answers, and the servers and the
   database hold nothing afterwards.
2. A serialization failure raised at COMMIT (by a deferred constraint trigger) is replayed
   too, as is one raised by a statement whether it escapes the app or the app answers it
   with a 5xx of its own; the replay gets the body the first attempt read; replays stop
   after ``retries``, and a body larger than ``retry_body_limit`` is not replayed.
3. A request that committed by hand before it failed is never replayed: it answers its
   error and its manual commit (and that commit's on_commit callback) is kept, once.
4. A ``BaseException`` (``gevent.Timeout``, ``SystemExit``) removes the Session at once,
   with or without ``retries=``; and with ``retries=`` the middlewares around ours still
   see what the app set in the environ or scope.

The apps are in ``tests/retry_apps.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import sessionmw
from tests import retry_apps
from tests.retry_apps import APPLICATION_NAME, create_schema
from tests.servers import answering, free_port, uvicorn_server, wait_until, werkzeug_server
from tests.wsgi_helpers import Server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PAIRS = 30
CONCURRENT_PAIRS = 10
RETRIES = 3
#: With ``retries=3``, at most this many of the ``2 * PAIRS`` requests may still end 5xx.
MAX_5XX = 2
#: With ``retries=0``, at least this many pairs must have overlapped (one 2xx, one 5xx).
MIN_CONFLICTS = PAIRS * 2 // 3
REQUEST_TIMEOUT = 20.0
LOAD_TIMEOUT = 40.0
CASE_TIMEOUT = 60

UVICORN = (
    "-m uvicorn --factory tests.retry_apps:{app} --host 127.0.0.1 --port {port} --log-level warning"
)
GUNICORN = (
    "-m gunicorn -w 1 -k gthread --threads 8 -b 127.0.0.1:{port} --log-level warning "
    "tests.retry_apps:flask_app()"
)
STACKS: dict[str, Callable[[int], list[str]]] = {
    "uvicorn-sync": lambda port: [PY, *UVICORN.format(app="starlette_sync_app", port=port).split()],
    "uvicorn-async": lambda port: [
        PY,
        *UVICORN.format(app="starlette_async_app", port=port).split(),
    ],
    "gunicorn-flask": lambda port: [PY, *GUNICORN.format(port=port).split()],
}


# -- serving --------------------------------------------------------------------------


@contextmanager
def serve(stack: str, url: str, retries: int, log: Path) -> Iterator[str]:
    """The stack in a process of its own; its stdout and stderr go to ``log``."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "SESSIONMW_RETRIES": str(retries),
        "PYTHONPATH": str(ROOT),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            STACKS[stack](port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"

    with answering(process, base, log) as url:
        yield url


@contextmanager
def serve_in_process(stack: str, url: str, retries: int) -> Iterator[str]:
    """The stack in this process: uvicorn in a thread, or Werkzeug's threaded server."""
    if stack == "flask":
        app = retry_apps.flask_app(url, retries)
        try:
            with werkzeug_server(app) as base:
                yield base
        finally:
            app.config["ENGINE"].dispose()
        return
    factory = retry_apps.starlette_async_app if "async" in stack else retry_apps.starlette_sync_app
    app = factory(url, retries, handle_db_errors=stack.endswith("-handled"))
    with uvicorn_server(app, on_stop=app.state.dispose) as base:
        yield base


class Warnings(logging.Handler):
    """The WARNINGs of the ``sessionmw`` logger, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def replays(self) -> list[str]:
        return [m for m in self.messages if m.startswith("replaying")]


@contextmanager
def sessionmw_warnings() -> Iterator[Warnings]:
    """Attached after the server started: uvicorn's logging setup would close it."""
    handler = Warnings()
    logger = logging.getLogger("sessionmw")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# -- checks shared by every case ------------------------------------------------------


def admin_engine(url: str) -> Engine:
    return create_engine(url, poolclass=NullPool)


def check_clean(base: str, engine: Engine) -> None:
    """The server's registry and pool drain to 0; PostgreSQL holds no prepared
    transaction and no connection of the app idle in a transaction."""

    def drained() -> bool:
        state = httpx.get(f"{base}/_state", timeout=5).json()
        return state == {"registry": 0, "checkedout": 0}

    wait_until(drained, timeout=15, what="the server's registry and pool to drain")
    with engine.connect() as conn:
        prepared = conn.execute(
            text("select gid from pg_prepared_xacts where database = current_database()")
        ).all()
        states = Counter(
            conn.execute(
                text("select state from pg_stat_activity where application_name = :name"),
                {"name": APPLICATION_NAME},
            ).scalars()
        )
    assert prepared == []
    assert not any(s and s.startswith("idle in transaction") for s in states), states


def attempts(base: str, callbacks: int = 0) -> dict[str, Any]:
    """What the server saw, once ``callbacks`` on_commit callbacks have run: they run
    after the response and after the request's Session was removed, so the client may
    be faster than they are."""

    def read() -> dict[str, Any]:
        return httpx.get(f"{base}/_attempts", timeout=5).json()  # type: ignore[no-any-return]

    wait_until(lambda: len(read()["callbacks"]) >= callbacks, timeout=10, what="the callbacks")
    return read()


def rows(engine: Engine, query: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(query))]


# -- 1. write skew at SERIALIZABLE ----------------------------------------------------


async def _send_pairs(base: str) -> list[dict[str, Any]]:
    """Both requests of each pair together, ``CONCURRENT_PAIRS`` pairs at a time; each
    request on a connection of its own (uvicorn closes one after an error)."""
    limit = asyncio.Semaphore(CONCURRENT_PAIRS)
    limits = httpx.Limits(max_connections=4 * CONCURRENT_PAIRS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as client:

        async def one(pair: int, doctor: str) -> dict[str, Any]:
            result: dict[str, Any] = {"id": f"{pair}{doctor}", "pair": pair, "doctor": doctor}
            try:
                response = await client.post(
                    f"/oncall/{pair}/{doctor}", params={"id": result["id"]}
                )
            except httpx.TransportError as exc:
                return {**result, "status": None, "error": repr(exc)}
            body = response.json() if response.is_success else None
            return {**result, "status": response.status_code, "body": body}

        async def both(pair: int) -> list[dict[str, Any]]:
            async with limit:
                return list(await asyncio.gather(one(pair, "a"), one(pair, "b")))

        pairs = await asyncio.gather(*(both(pair) for pair in range(PAIRS)))
    return [result for pair in pairs for result in pair]


def send_pairs(base: str) -> list[dict[str, Any]]:
    return asyncio.run(asyncio.wait_for(_send_pairs(base), LOAD_TIMEOUT))


def check_write_skew(
    results: list[dict[str, Any]], seen: dict[str, Any], engine: Engine, retries: int
) -> dict[str, Any]:
    """What holds with or without replays: the rows equal the 2xx answers, each effect is
    applied once, each callback runs once, for the attempt that committed."""
    statuses = Counter(r["status"] for r in results)
    assert set(statuses) <= {200, 500}, statuses  # no timeout, no other error
    ok = [r for r in results if r["status"] == 200]
    took = {(r["id"], r["body"]["attempt"]) for r in results if took_off(r)}
    assert all(r["body"]["id"] == r["id"] for r in ok)

    # The database state equals the 2xx answers: exactly the doctors of the requests that
    # answered "took off duty" are off duty, and every pair still has one on duty.
    oncall = rows(engine, "select pair, doctor, on_duty from oncall")
    off_in_db = {(pair, doctor) for pair, doctor, on_duty in oncall if not on_duty}
    off_answered = {(r["pair"], r["doctor"]) for r in results if took_off(r)}
    assert off_in_db == off_answered
    on_duty = Counter(pair for pair, _, duty in oncall if duty)
    assert all(on_duty[pair] >= 1 for pair in range(PAIRS)), on_duty

    # No effect applied twice, none of an attempt that did not commit.
    actions = rows(engine, "select request_id, attempt from actions")
    assert max(Counter(request_id for request_id, _ in actions).values(), default=1) == 1
    assert set(actions) == took

    # on_commit: once per committed request, only for the attempt that committed.
    logged = rows(engine, "select request_id, attempt from callbacks")
    assert sorted(logged) == sorted(took)
    assert sorted(map(tuple, seen["callbacks"])) == sorted(took)

    invocations: dict[str, int] = seen["invocations"]
    assert set(invocations) == {r["id"] for r in results}
    assert max(invocations.values()) <= retries + 1, invocations
    replays = sum(invocations.values()) - len(results)
    failed_attempts = replays + statuses[500]
    return {
        "statuses": dict(sorted(statuses.items())),
        "replays": replays,
        "replayed requests": sum(1 for n in invocations.values() if n > 1),
        "failed in handler": seen["failed_in_handler"],
        "failed at commit": failed_attempts - seen["failed_in_handler"],
        "callbacks": len(logged),
    }


def took_off(result: dict[str, Any]) -> bool:
    return result["status"] == 200 and bool(result["body"]["took_off"])


def by_pair(results: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    pairs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        pairs[result["pair"]].append(result)
    return pairs


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("stack", list(STACKS))
def test_write_skew_is_replayed(stack: str, pg_url: str, tmp_path: Path) -> None:
    engine = admin_engine(pg_url)
    create_schema(engine, PAIRS)
    log = tmp_path / "server.log"
    started = time.monotonic()
    with serve(stack, pg_url, RETRIES, log) as base:
        results = send_pairs(base)
        seen = attempts(base, callbacks=sum(1 for r in results if took_off(r)))
        check_clean(base, engine)
    elapsed = time.monotonic() - started
    server_log = log.read_text()
    try:
        summary = check_write_skew(results, seen, engine, RETRIES)
        print(f"\nRETRY | {stack} | retries={RETRIES} | {summary} | {elapsed:.1f} s")
        assert summary["statuses"].get(500, 0) <= MAX_5XX, summary
        assert summary["replays"] > 0, summary
        # With both answers 2xx, the outcome is a serial one: exactly one doctor of the
        # pair went off duty (the replayed request saw one on duty and did nothing).
        for pair, results_of_pair in by_pair(results).items():
            if all(r["status"] == 200 for r in results_of_pair):
                assert sum(map(took_off, results_of_pair)) == 1, (pair, results_of_pair)
        # One WARNING per replay.
        assert server_log.count("WARNING sessionmw: replaying ") == summary["replays"]
    except AssertionError:
        print(server_log[-6000:])
        raise
    finally:
        engine.dispose()


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("stack", list(STACKS))
def test_write_skew_without_retries(stack: str, pg_url: str, tmp_path: Path) -> None:
    engine = admin_engine(pg_url)
    create_schema(engine, PAIRS)
    log = tmp_path / "server.log"
    started = time.monotonic()
    with serve(stack, pg_url, 0, log) as base:
        results = send_pairs(base)
        seen = attempts(base, callbacks=sum(1 for r in results if took_off(r)))
        check_clean(base, engine)
    elapsed = time.monotonic() - started
    server_log = log.read_text()
    try:
        summary = check_write_skew(results, seen, engine, 0)
        shapes = Counter(
            "".join(sorted(str(r["status"]) for r in results_of_pair))
            for results_of_pair in by_pair(results).values()
        )
        print(f"\nRETRY | {stack} | retries=0 | {summary} | pairs {dict(shapes)} | {elapsed:.1f} s")
        assert summary["replays"] == 0
        assert "replaying" not in server_log
        # Each pair that overlapped: one 2xx that took its doctor off, one 5xx.  A pair
        # that did not overlap ran serially: two 2xx, one of which did nothing.
        assert shapes["200500"] >= MIN_CONFLICTS, shapes
        assert set(shapes) <= {"200500", "200200"}, shapes
        for results_of_pair in by_pair(results).values():
            assert sum(map(took_off, results_of_pair)) == 1, results_of_pair
    except AssertionError:
        print(server_log[-6000:])
        raise
    finally:
        engine.dispose()


# -- 2. a serialization failure at COMMIT ---------------------------------------------

#: Served in this process.  Flask answers an error of its view with a 500 of its own; the
#: ``-handled`` Starlette apps answer a database error of an endpoint with a 503 of their
#: own (an exception handler): the middleware sees a 5xx response, not an exception.
IN_PROCESS = ["starlette-sync", "starlette-async", "flask"]
HANDLED = ["starlette-sync-handled", "starlette-async-handled"]


def error_status(stack: str, at: str) -> int:
    """The answer to a database error raised in the handler or at the middleware's
    COMMIT (which no exception handler of the app sees)."""
    return 503 if stack.endswith("-handled") and at == "handler" else 500


def post_note(base: str, request_id: str, note: str) -> httpx.Response:
    return httpx.post(
        f"{base}/commit-fails",
        params={"id": request_id},
        json={"note": note},
        timeout=REQUEST_TIMEOUT,
    )


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("stack", IN_PROCESS + HANDLED)
def test_a_serialization_failure_in_a_statement_is_replayed(stack: str, pg_url: str) -> None:
    """The handler's first two attempts meet SQLSTATE 40001 in a statement: the
    exception escapes (or the app answers it with a 5xx of its own, which the client
    never sees); the third attempt commits."""
    engine = admin_engine(pg_url)
    create_schema(engine, pairs=0, statement_failures=2)
    with serve_in_process(stack, pg_url, RETRIES) as base, sessionmw_warnings() as caught:
        response = httpx.post(
            f"{base}/statement-fails", params={"id": "stmt"}, timeout=REQUEST_TIMEOUT
        )
        seen = attempts(base, callbacks=1)
        check_clean(base, engine)
    try:
        assert response.status_code == 200, response.text
        assert seen["invocations"] == {"stmt": 3}
        committed = [("stmt", response.json()["attempt"])]
        assert rows(engine, "select request_id, attempt from events") == committed
        assert rows(engine, "select request_id, attempt from callbacks") == committed
        replays = caught.replays()
        assert len(replays) == 2, caught.messages
        assert all("injected serialization failure in a statement" in m for m in replays)
    finally:
        engine.dispose()


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("stack", IN_PROCESS + HANDLED)
def test_a_serialization_failure_at_commit_is_replayed(stack: str, pg_url: str) -> None:
    """The first two COMMITs fail with SQLSTATE 40001 (a deferred constraint trigger);
    the handler returned 200 each time.  The request is replayed twice, with the body
    its first attempt read, and its third attempt commits: one row, one callback, for
    that attempt."""
    engine = admin_engine(pg_url)
    create_schema(engine, pairs=0, commit_failures=2)
    with serve_in_process(stack, pg_url, RETRIES) as base, sessionmw_warnings() as caught:
        first = post_note(base, "first", "the first note")
        second = post_note(base, "second", "the second note")
        seen = attempts(base, callbacks=2)
        check_clean(base, engine)
    try:
        assert first.status_code == 200, first.text
        assert second.status_code == 200, second.text
        assert seen["invocations"] == {"first": 3, "second": 1}
        committed = [("first", first.json()["attempt"]), ("second", second.json()["attempt"])]
        events = rows(engine, "select request_id, attempt, note from events order by request_id")
        assert events == [(*committed[0], "the first note"), (*committed[1], "the second note")]
        assert sorted(rows(engine, "select request_id, attempt from callbacks")) == committed
        assert sorted(map(tuple, seen["callbacks"])) == committed
        replays = caught.replays()
        assert len(replays) == 2, caught.messages
        assert all("injected serialization failure at COMMIT" in m for m in replays), replays
        assert "(replay 1 of 3)" in replays[0]
        assert "(replay 2 of 3)" in replays[1]
    finally:
        engine.dispose()


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("stack", IN_PROCESS)
def test_replays_stop_after_retries(stack: str, pg_url: str) -> None:
    """Every COMMIT fails: one attempt and three replays, then the 500 goes out;
    nothing is kept and no callback runs."""
    engine = admin_engine(pg_url)
    create_schema(engine, pairs=0, commit_failures=1000)
    with serve_in_process(stack, pg_url, RETRIES) as base, sessionmw_warnings() as caught:
        response = post_note(base, "doomed", "never saved")
        seen = attempts(base, callbacks=0)
        check_clean(base, engine)
    try:
        assert response.status_code == 500, response.text
        assert seen["invocations"] == {"doomed": RETRIES + 1}
        assert seen["callbacks"] == []
        assert rows(engine, "select * from events") == []
        assert rows(engine, "select * from callbacks") == []
        assert len(caught.replays()) == RETRIES, caught.messages
    finally:
        engine.dispose()


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("stack", IN_PROCESS)
def test_a_body_over_the_limit_is_not_replayed(stack: str, pg_url: str) -> None:
    """The app read a body larger than ``retry_body_limit`` (1 MiB): it was not kept,
    so the request cannot be replayed and the first failure is the answer."""
    engine = admin_engine(pg_url)
    create_schema(engine, pairs=0, commit_failures=1000)
    with serve_in_process(stack, pg_url, RETRIES) as base, sessionmw_warnings() as caught:
        response = post_note(base, "large", "x" * 1_100_000)
        seen = attempts(base, callbacks=0)
        check_clean(base, engine)
    try:
        assert response.status_code == 500, response.text
        assert seen["invocations"] == {"large": 1}
        assert rows(engine, "select * from events") == []
        assert caught.replays() == []
    finally:
        engine.dispose()


# -- 3. a request that committed by hand is not replayed ------------------------------


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("at", ["handler", "commit"])
@pytest.mark.parametrize("stack", IN_PROCESS + HANDLED)
def test_a_request_that_committed_is_not_replayed(stack: str, at: str, pg_url: str) -> None:
    """The handler commits a row by hand, then meets a serialization failure: in a
    statement of its own (``at=handler``) or at the middleware's COMMIT (``at=commit``).
    Replaying would commit the row twice: the request answers its error, once, and the
    row and its on_commit callback are kept once."""
    engine = admin_engine(pg_url)
    create_schema(engine, pairs=0)
    with serve_in_process(stack, pg_url, RETRIES) as base, sessionmw_warnings() as caught:
        response = httpx.post(
            f"{base}/manual-commit-then-fail",
            params={"id": "manual", "at": at},
            timeout=REQUEST_TIMEOUT,
        )
        seen = attempts(base, callbacks=1)
        check_clean(base, engine)
    try:
        assert response.status_code == error_status(stack, at), response.text
        assert seen["invocations"] == {"manual": 1}
        events = rows(engine, "select request_id, note from events")
        assert events == [("manual", "committed by hand")]
        assert rows(engine, "select * from doomed") == []
        attempt = rows(engine, "select attempt from events")[0][0]
        assert rows(engine, "select request_id, attempt from callbacks") == [("manual", attempt)]
        assert caught.replays() == []
    finally:
        engine.dispose()


# -- what ends an attempt that is not an Exception --------------------------------------


class Abort(BaseException):
    """Not an ``Exception``: like ``gevent.Timeout``, ``SystemExit`` or
    ``KeyboardInterrupt`` raised into a request."""


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("retries", [0, RETRIES])
@pytest.mark.parametrize("protocol", ["wsgi", "asgi"])
def test_a_base_exception_ends_the_request_at_once(
    protocol: str, retries: int, pg_url: str
) -> None:
    """A ``BaseException`` leaves the middleware with the request's Session removed and
    its connection back in the pool, with or without ``retries=``, while the exception
    is still propagating (its traceback holds the middleware's frames)."""
    engine = create_engine(pg_url, isolation_level="SERIALIZABLE")
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))
    state: list[tuple[int, int]] = []

    def held() -> None:
        state.append((len(Session.registry.registry), engine.pool.checkedout()))

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        Session.execute(text("select 1"))
        raise Abort

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        Session.execute(text("select 1"))
        raise Abort

    async def call_asgi(app: Any) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            pass

        scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
        await app(scope, receive, send)

    def serve_once() -> None:
        try:
            if protocol == "wsgi":
                Server().call(
                    sessionmw.WSGISessionMiddleware(
                        wsgi_app, Session, commit="on_success", retries=retries
                    ),
                    "/",
                )
            else:
                middleware = sessionmw.ASGISessionMiddleware(
                    asgi_app, Session, commit="on_success", retries=retries
                )
                asyncio.run(call_asgi(middleware))
        except Abort:
            held()  # while the exception propagates
            raise

    try:
        with pytest.raises(Abort):
            serve_once()
        assert state == [(0, 0)], "the Session outlived its request"
    finally:
        gc.collect()  # let a response that was never closed go, before the engine
        engine.dispose()


# -- what the middlewares around see ------------------------------------------------------


@pytest.mark.parametrize("retries", [0, RETRIES])
@pytest.mark.parametrize("protocol", ["wsgi", "asgi"])
def test_the_middleware_around_sees_what_the_app_set(
    protocol: str, retries: int, pg_url: str
) -> None:
    """Turning ``retries=`` on does not hide from the middlewares around ours what the
    app set in the request: an access log's ``REMOTE_USER``, the route template that
    Starlette's router puts in the scope for metrics, ``request.state`` set by auth."""
    engine = create_engine(pg_url)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))
    seen: dict[str, Any] = {}
    try:
        if protocol == "wsgi":

            def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
                environ["REMOTE_USER"] = "alice"
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok"]

            inner = sessionmw.WSGISessionMiddleware(wsgi_app, Session, retries=retries)

            def outer(environ: dict[str, Any], start_response: Any) -> Any:
                body = inner(environ, start_response)
                seen["user"] = environ.get("REMOTE_USER")
                return body

            Server().get(outer, "/")
        else:

            async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
                scope["route"] = "/items/{id}"
                scope["state"]["user"] = "alice"
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"ok"})

            middleware = sessionmw.ASGISessionMiddleware(asgi_app, Session, retries=retries)

            async def call() -> None:
                async def receive() -> dict[str, Any]:
                    return {"type": "http.request", "body": b"", "more_body": False}

                async def send(message: Any) -> None:
                    pass

                scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/items/1"}
                await middleware(scope, receive, send)
                seen["user"] = scope.get("state", {}).get("user")
                seen["route"] = scope.get("route")

            asyncio.run(call())
            assert seen["route"] == "/items/{id}"
        assert seen["user"] == "alice"
    finally:
        engine.dispose()
